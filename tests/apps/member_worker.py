"""A worker process on the seed's pipeline, for tests with several processes: prints
``READY`` once it listens, then ``CHANNELS n`` each time the number of channels it listens
to changes, serves until SIGTERM, then writes its counters to ``--out``.

Handlers sleep ``--sleep`` seconds, so that a burst lasts long enough to lose a worker
in the middle of it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import attrs

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pgstagechain import Worker
from tests.apps.seed import seed_pipeline


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--scan-interval", type=float, default=3600.0)
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()

    async def handler(ctx: Any) -> None:
        if args.sleep:
            await anyio.sleep(args.sleep)

    worker = Worker(
        seed_pipeline(handler),
        args.dsn,
        scan_interval=args.scan_interval,
        lease=args.lease,
        concurrency=args.concurrency,
        shutdown_timeout=10.0,
    )

    async def run() -> None:
        async with anyio.create_task_group() as tg:

            async def stop_on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM) as received:
                    async for _ in received:
                        worker.stop()
                        return

            async def ready() -> None:
                await worker.wait_started()
                print("READY", flush=True)
                told = 0
                while True:  # a test's view of what the worker hears
                    listening = len(worker.listener.channels) if worker.listener else 0
                    if listening != told:
                        print(f"CHANNELS {listening}", flush=True)
                        told = listening
                    await anyio.sleep(0.01)

            tg.start_soon(stop_on_signal)
            tg.start_soon(ready)
            await worker.run()
            tg.cancel_scope.cancel()

    anyio.run(run)
    Path(args.out).write_text(json.dumps(attrs.asdict(worker.stats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
