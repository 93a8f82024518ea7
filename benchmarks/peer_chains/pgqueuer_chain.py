"""The benchmark chain on pgqueuer: one entrypoint per stage, each job enqueues the next.

Run as a script, this is the worker process (``QueueManager.run`` on an asyncpg
connection, under uvloop as ``pgq run`` does); imported, it gives peers.py the schema
install, the release of first-stage jobs and the SQL that tells when the chains are through.

The handler enqueues the next stage's job through a pool (``AsyncpgPoolDriver``), in its
own autocommit statement; pgqueuer then records the job's completion in a batched
statement of its own (deleting the job, logging ``successful``).
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
from psycopg.conninfo import conninfo_to_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pgqueuer import AsyncpgDriver, AsyncpgPoolDriver, Job, Queries, QueueManager

from benchmarks.peer_chains import recording

NAME = "pgqueuer"
#: true while any job of the chains is queued or running
PENDING_SQL = "SELECT EXISTS (SELECT 1 FROM pgqueuer)"
#: jobs completed, and when the last one was logged
FINISHED_SQL = (
    "SELECT count(*), extract(epoch FROM max(created))::float8"
    " FROM pgqueuer_log WHERE status = 'successful'"
)


def connect_kwargs(dsn: str) -> dict[str, Any]:
    """asyncpg takes keywords, not a libpq key=value string."""
    params = conninfo_to_dict(dsn)
    kwargs: dict[str, Any] = {"database": params.get("dbname")}
    for key in ("host", "port", "user", "password"):
        if params.get(key):
            kwargs[key] = params[key]
    return kwargs


async def install(dsn: str) -> None:
    conn = await asyncpg.connect(**connect_kwargs(dsn))
    try:
        await Queries(AsyncpgDriver(conn)).install()
    finally:
        await conn.close()


async def release(dsn: str, batches: list[list[int]], interval: float) -> list[float]:
    """Enqueue each batch of chains' first jobs in one statement, one batch every
    ``interval`` seconds; returns when each enqueue was acknowledged."""
    conn = await asyncpg.connect(**connect_kwargs(dsn))
    acked = []
    try:
        queries = Queries(AsyncpgDriver(conn))
        next_at = time.monotonic()
        for batch in batches:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval
            await queries.enqueue(
                ["stage_1"] * len(batch), [str(key).encode() for key in batch], [0] * len(batch)
            )
            acked.append(time.time())
    finally:
        await conn.close()
    return acked


async def work() -> None:
    args = recording.worker_arguments(__doc__.split("\n\n")[0])
    conn = await asyncpg.connect(**connect_kwargs(args.dsn))
    pool = await asyncpg.create_pool(
        min_size=1, max_size=args.pool_size, **connect_kwargs(args.dsn)
    )
    assert pool is not None
    enqueue = Queries(AsyncpgPoolDriver(pool))
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    def stage_handler(stage: int) -> Any:
        async def handle(job: Job) -> None:
            assert job.payload is not None
            key = int(job.payload)
            recording.started(stage, key)
            if stage < args.stages:
                sent = time.time()
                await enqueue.enqueue(f"stage_{stage + 1}", job.payload)
                recording.enqueued(stage + 1, key, sent)

        return handle

    for stage in range(1, args.stages + 1):
        qm.entrypoint(f"stage_{stage}")(stage_handler(stage))

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, qm.shutdown.set)
    running = asyncio.create_task(
        qm.run(batch_size=args.batch_size, max_concurrent_tasks=args.concurrency)
    )
    # Ready once a notification makes the round trip through the worker's listener.
    while not running.done():
        try:
            await qm.listener_healthy(timeout=timedelta(seconds=0.5))
            break
        except Exception:  # not listening yet
            continue
    recording.ready()
    await running
    await pool.close()
    await conn.close()
    recording.write(args.out)


if __name__ == "__main__":
    import uvloop

    uvloop.run(work())
