"""Pipelines that worker subprocesses run in the reliability and chaos tests.

Started from the repository root as::

    python -m pgstagechain --dsn DSN worker tests.chaos_app:pipeline --lease 3 ...

``pipeline`` has the seed's ten stages. Its handler fails on a fixed fraction of calls,
chosen by a hash of (stage, key, attempt) so that the same call fails in every process
and a retry can succeed, and records each successful execution in ``chaos_executions``
on the context's connection: the record commits with the completion or not at all, so a
duplicate execution shows up in the database.

``sleepy`` has two row stages; its first attempt of ``vlm_analyze`` sleeps until killed.
"""

from __future__ import annotations

import os
import random
import zlib
from typing import Any

import anyio

from pgstagechain import Pipeline, Retry, StageContext
from tests.seed import seed_pipeline

#: Percentage of handler calls that raise (by hash of stage, key and attempt).
FAIL_PERCENT = int(os.environ.get("PGSTAGECHAIN_CHAOS_FAIL_PERCENT", "10"))
#: Upper bound of the handler's simulated work, in seconds.
WORK_SECONDS = float(os.environ.get("PGSTAGECHAIN_CHAOS_WORK", "0.02"))

EXECUTIONS_TABLE = """
CREATE TABLE IF NOT EXISTS chaos_executions (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id bigint NOT NULL,
    stage text NOT NULL,
    row_key text NOT NULL,
    attempt integer NOT NULL,
    worker_id text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


class InjectedFailure(RuntimeError):
    """A failure the chaos handler raises on purpose."""


def injected(stage: str, key: str, attempt: int) -> bool:
    """True when this call is one of the deterministic failures."""
    return zlib.crc32(f"{stage}:{key}:{attempt}".encode()) % 100 < FAIL_PERCENT


async def chaos_handler(ctx: StageContext[Any]) -> dict[str, Any]:
    await anyio.sleep(random.uniform(0, WORK_SECONDS))
    if injected(ctx.stage, ctx.claim.row_key, ctx.attempt):
        raise InjectedFailure(f"injected failure: {ctx.stage} {ctx.claim.row_key} #{ctx.attempt}")
    await ctx.conn.execute(
        "INSERT INTO chaos_executions (run_id, stage, row_key, attempt, worker_id)"
        " VALUES (%s, %s, %s, %s, %s)",
        (ctx.run_id, ctx.stage, ctx.claim.row_key, ctx.attempt, ctx.worker_id),
    )
    return {"attempt": ctx.attempt}


pipeline = seed_pipeline(
    chaos_handler, name="chaos", retry=Retry(max_attempts=5, base_delay=0.05, max_delay=0.5)
)


sleepy = Pipeline(
    "sleepy",
    table="jobs_variants",
    key="job_variants_id",
    group_column="job_id",
    start="img_gen",
)


@sleepy.stage(after="img_gen", retry=Retry(max_attempts=3, base_delay=0.01))
async def vlm_analyze(ctx: StageContext[Any]) -> dict[str, Any]:
    if ctx.attempt == 1:
        await anyio.sleep(3600)  # until the process is killed
    return {"attempt": ctx.attempt}


@sleepy.stage(after="vlm_analyze")
async def yolo_detect(ctx: StageContext[Any]) -> None:
    return None
