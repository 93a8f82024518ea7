"""Pipelines that worker subprocesses run in the reliability and chaos tests.

Started from the repository root as::

    python -m pgstagechain --dsn DSN worker tests.apps.chaos_app:pipeline --lease 3 ...

``pipeline`` has the seed's ten stages, in every way a stage can run (see ``MODES``):
``async def`` and ``def`` handlers, with a connection (they record the execution in
``chaos_executions`` on ``ctx.conn``: the record commits with the completion or not at
all, so a duplicate execution shows in the database) and without one (their completions
are batched). Every handler returns its own key and stage, so a result stored on another
row's run shows in the ledger. Handlers fail on a fixed fraction of calls, chosen by a
hash of (stage, key, attempt) so that the same call fails in every process and a retry
can succeed; a few calls take longer than a server restart.

``sleepy`` has two row stages; its first attempt of ``vlm_analyze`` sleeps until killed.
"""

from __future__ import annotations

import os
import random
import time
import zlib
from collections.abc import Callable
from typing import Any

import anyio

from pgstagechain import Pipeline, Retry, StageContext
from tests.apps.seed import GROUP_STAGES, ROW_STAGES

#: Percentage of handler calls that raise (by hash of stage, key and attempt).
FAIL_PERCENT = int(os.environ.get("PGSTAGECHAIN_CHAOS_FAIL_PERCENT", "10"))
#: Upper bound of the handler's simulated work, in seconds.
WORK_SECONDS = float(os.environ.get("PGSTAGECHAIN_CHAOS_WORK", "0.02"))
#: Per mille of calls of the slow stages that take SLOW_SECONDS (longer than a restart).
SLOW_PER_MILLE = int(os.environ.get("PGSTAGECHAIN_CHAOS_SLOW_PER_MILLE", "15"))
SLOW_SECONDS = float(os.environ.get("PGSTAGECHAIN_CHAOS_SLOW", "2.5"))

#: How each stage runs: (async handler, holds a connection and writes on it, sometimes slow).
MODES: dict[str, tuple[bool, bool, bool]] = {
    "vlm_analyze": (True, False, False),
    "yolo_detect": (False, True, False),
    "planner": (True, True, False),
    "overlay": (False, False, False),
    "vlm_judge": (True, False, True),
    "ocr_eval": (False, True, True),
    "readability_eval": (True, True, False),
    "iou_eval": (False, False, True),
    "ad_copy_gen_kor": (True, True, False),
    "instagram_feed_gen": (False, False, False),
}
#: The stages whose handlers record their execution on ctx.conn.
RECORDING_STAGES = [name for name, (_, conn, _) in MODES.items() if conn]

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
RECORD = (
    "INSERT INTO chaos_executions (run_id, stage, row_key, attempt, worker_id)"
    " VALUES (%s, %s, %s, %s, %s)"
)


class InjectedFailure(RuntimeError):
    """A failure the chaos handler raises on purpose."""


def injected(stage: str, key: str, attempt: int) -> bool:
    """True when this call is one of the deterministic failures."""
    return zlib.crc32(f"{stage}:{key}:{attempt}".encode()) % 100 < FAIL_PERCENT


#: The first stage stands for a model call: long enough that the chaos test can crash the
#: server between a burst of claims and their first completion.
FIRST_STAGE_SECONDS = (0.3, 0.6)


def work_seconds(stage: str) -> float:
    if MODES[stage][2] and random.randrange(1000) < SLOW_PER_MILLE:
        return SLOW_SECONDS * random.uniform(0.8, 1.2)
    if stage == ROW_STAGES[0]:
        return random.uniform(*FIRST_STAGE_SECONDS)
    return random.uniform(0, WORK_SECONDS)


def outcome(ctx: StageContext[Any]) -> dict[str, Any]:
    """Fail if this call is one of the injected failures; else the result: whose it is."""
    if injected(ctx.stage, ctx.claim.row_key, ctx.attempt):
        raise InjectedFailure(f"injected failure: {ctx.stage} {ctx.claim.row_key} #{ctx.attempt}")
    return {"key": ctx.claim.row_key, "stage": ctx.stage, "attempt": ctx.attempt}


def record_args(ctx: StageContext[Any]) -> tuple[Any, ...]:
    return (ctx.run_id, ctx.stage, ctx.claim.row_key, ctx.attempt, ctx.worker_id)


async def chaos_handler(ctx: StageContext[Any]) -> dict[str, Any]:
    """An ``async def`` stage."""
    await anyio.sleep(work_seconds(ctx.stage))
    result = outcome(ctx)
    if ctx.conn is not None:
        await ctx.conn.execute(RECORD, record_args(ctx))
    return result


def chaos_sync_handler(ctx: StageContext[Any]) -> dict[str, Any]:
    """A ``def`` stage (it runs in a thread)."""
    time.sleep(work_seconds(ctx.stage))
    result = outcome(ctx)
    if ctx.conn is not None:
        ctx.conn.execute(RECORD, record_args(ctx))
    return result


def chaos_pipeline(name: str = "chaos") -> Pipeline:
    """The seed's ten stages, each run as ``MODES`` says."""
    built = Pipeline(
        name,
        table="jobs_variants",
        key="job_variants_id",
        group_column="job_id",
        extra_columns=["tenant_id", "img_asset_id"],
        start="img_gen",
    )
    retry = Retry(max_attempts=5, base_delay=0.05, max_delay=0.5)
    previous = "img_gen"
    for stage_name in [*ROW_STAGES, *GROUP_STAGES]:
        is_async, connection, _ = MODES[stage_name]
        handler: Callable[[StageContext[Any]], Any] = (
            chaos_handler if is_async else chaos_sync_handler
        )
        built.stage(
            after=previous,
            name=stage_name,
            group=stage_name in GROUP_STAGES,
            retry=retry,
            connection=connection,
        )(handler)
        previous = stage_name
    return built


pipeline = chaos_pipeline()


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
