"""The benchmark chain on procrastinate: one task per stage, each job defers the next.

Run as a script, this is the worker process (``App.run_worker_async`` with a
``PsycopgConnector``); imported, it gives peers.py the schema install, the release of
first-stage jobs and the SQL that tells when the chains are through.

The task defers the next stage's job with ``defer_async`` through the app's connection
pool, in its own transaction; the worker then marks the job ``succeeded`` in another.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import procrastinate

from benchmarks.peer_chains import recording

NAME = "procrastinate"
#: true while any job of the chains is waiting or running
PENDING_SQL = "SELECT EXISTS (SELECT 1 FROM procrastinate_jobs WHERE status IN ('todo', 'doing'))"
#: jobs completed, and when the last one was marked so
FINISHED_SQL = (
    "SELECT (SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'),"
    " (SELECT extract(epoch FROM max(at))::float8 FROM procrastinate_events"
    "  WHERE type = 'succeeded')"
)


def make_app(dsn: str, pool_size: int = 2) -> procrastinate.App:
    return procrastinate.App(
        connector=procrastinate.PsycopgConnector(conninfo=dsn, min_size=1, max_size=pool_size)
    )


async def install(dsn: str) -> None:
    app = make_app(dsn)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


async def release(dsn: str, batches: list[list[int]], interval: float) -> list[float]:
    """Defer each batch of chains' first jobs in one call, one batch every ``interval``
    seconds; returns when each was acknowledged."""
    app = make_app(dsn)
    acked = []
    async with app.open_async():
        first = app.configure_task(name="stage_1")
        next_at = time.monotonic()
        for batch in batches:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval
            await first.batch_defer_async(*({"key": key} for key in batch))
            acked.append(time.time())
    return acked


async def listening(dsn: str) -> bool:
    """Whether a connection of this database has issued LISTEN (the worker's listener)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity"
            " WHERE datname = current_database() AND query ILIKE 'LISTEN%%')"
        )
        row = await cursor.fetchone()
    return bool(row and row[0])


async def work() -> None:
    args = recording.worker_arguments(__doc__.split("\n\n")[0])
    app = make_app(args.dsn, args.pool_size)
    tasks: dict[int, Any] = {}

    def stage_task(stage: int) -> Any:
        async def handle(key: int) -> None:
            recording.started(stage, key)
            if stage < args.stages:
                sent = time.time()
                await tasks[stage + 1].defer_async(key=key)
                recording.enqueued(stage + 1, key, sent)

        return handle

    for stage in range(1, args.stages + 1):
        tasks[stage] = app.task(name=f"stage_{stage}")(stage_task(stage))

    async with app.open_async():
        # stops on SIGTERM / SIGINT (procrastinate's own signal handlers)
        running = asyncio.create_task(app.run_worker_async(concurrency=args.concurrency))
        while not running.done() and not await listening(args.dsn):
            await asyncio.wait({running}, timeout=0.05)
        recording.ready()
        await running
    recording.write(args.out)


if __name__ == "__main__":
    # imported by name, not run as __main__, where procrastinate warns about its App
    from benchmarks.peer_chains import procrastinate_chain

    asyncio.run(procrastinate_chain.work())
