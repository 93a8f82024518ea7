"""One benchmark worker process: ``Worker.run()`` on the benchmark pipeline until SIGTERM.

Prints ``READY <pid>`` once it is connected and listening. On SIGTERM it drains and
writes a JSON file (``--out``) with the handler start times, the times at which this
process saw its batched completions commit, and the worker's counters.

The commit times come from a thin wrapper around the worker's batched completion call
(``Claimer.complete_many``): the wrapper reads the clock when the autocommit statement
has returned, i.e. when the commit is acknowledged. It is measurement only; when the
internal name is not there, the benchmark falls back to the server's ``finished_at``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import attrs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_app
from pgstagechain import Worker, tune_gc

ACKS: dict[str, float] = {}  # by the run's claim token
#: where a notification hand-over spends its time: see instrument_hops
HOPS: dict[str, list[Any]] = {"notes": [], "wakes": [], "claims": []}


def instrument_completions() -> bool:
    try:
        from pgstagechain._claim import Claimer
    except ImportError:
        return False
    original = getattr(Claimer, "complete_many", None)
    if original is None:
        return False

    async def complete_many(self: Any, *args: Any, **kwargs: Any) -> Any:
        outcome = await original(self, *args, **kwargs)
        now = time.time()
        completed = outcome[0] if isinstance(outcome, tuple) else outcome
        for token in completed:
            ACKS[str(token)] = now
        return outcome

    Claimer.complete_many = complete_many  # type: ignore[method-assign]
    return True


def instrument_hops() -> bool:
    """Timestamps along a notification hand-over, taken by wrapping the worker's parts
    (measurement only; nothing is wrapped unless recording):

    - ``notes``: (time, payload) when the listener hands a notification to the hints;
    - ``wakes``: when the dispatcher starts a pass (it was woken);
    - ``claims``: (sent, returned, stage, [row keys]) of every claim statement.
    """
    try:
        from pgstagechain._claim import Claimer
        from pgstagechain._dispatch import Dispatcher
        from pgstagechain._hints import Hints
    except ImportError:
        return False
    on_notify = Hints.on_notify
    dispatch_once = Dispatcher.dispatch_once
    claim = Claimer.claim_within_limits  # what the dispatcher calls (claim calls it too)
    notes, wakes, claims = HOPS["notes"], HOPS["wakes"], HOPS["claims"]

    def noted(self: Any, channel: str, payload: str) -> None:
        notes.append((time.time(), payload))
        on_notify(self, channel, payload)

    async def woke(self: Any, *args: Any, **kwargs: Any) -> Any:
        wakes.append(time.time())
        return await dispatch_once(self, *args, **kwargs)

    async def claimed(self: Any, conn: Any, stage: str, **kwargs: Any) -> Any:
        sent = time.time()
        got = await claim(self, conn, stage, **kwargs)
        claims.append((sent, time.time(), stage, [c.row_key for c in got[0]]))
        return got

    Hints.on_notify = noted  # type: ignore[method-assign]
    Dispatcher.dispatch_once = woke  # type: ignore[method-assign]
    Claimer.claim_within_limits = claimed  # type: ignore[method-assign]
    return True


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--row-stages", type=int, default=8)
    parser.add_argument("--group-stages", type=int, default=2)
    parser.add_argument("--connection", type=int, choices=(0, 1, 2), default=0, help="2: writes")
    parser.add_argument("--concurrency", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--scan-interval", type=float, default=10.0)
    parser.add_argument("--no-record", action="store_true", help="skip timestamp records")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    bench_app.RECORD = not args.no_record
    instrumented = not args.no_record and instrument_completions()
    if not args.no_record:
        instrument_hops()
    pipeline = bench_app.build_pipeline(
        args.row_stages,
        args.group_stages,
        connection=bool(args.connection),
        writes=args.connection == 2,
    )
    worker = Worker(
        pipeline,
        args.dsn,
        concurrency=args.concurrency,
        batch_size=args.batch_size,
        scan_interval=args.scan_interval,
        shutdown_timeout=10.0,
    )

    async def run() -> None:
        async with anyio.create_task_group() as tg:

            async def signals() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
                    async for _ in received:
                        worker.stop()
                        return

            async def ready() -> None:
                await worker.wait_started()
                print(f"READY {os.getpid()}", flush=True)

            tg.start_soon(signals)
            tg.start_soon(ready)
            await worker.run()
            tg.cancel_scope.cancel()

    tune_gc()  # as `pgstagechain worker` does
    anyio.run(run)
    if args.no_record:
        bench_app.STARTS.clear()
        ACKS.clear()
        for records in HOPS.values():
            records.clear()
    Path(args.out).write_text(
        json.dumps(
            {
                "pid": os.getpid(),
                "instrumented": instrumented,
                "starts": bench_app.STARTS,
                "acks": list(ACKS.items()),
                "hops": HOPS,
                "stats": attrs.asdict(worker.stats),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
