"""The benchmark's pipeline: the seed's shape (row stages, then group stages) with no-op handlers.

Configured from the environment so that ``python -m pgstagechain worker
benchmarks.bench_app:pipeline`` and ``benchmarks/bench_worker.py`` build the same graph:

- ``BENCH_ROW_STAGES`` (default 8) and ``BENCH_GROUP_STAGES`` (default 2);
- ``BENCH_CONNECTION`` = ``0`` declares every stage ``connection=False`` (no pooled
  connection is held while the handler runs; completions are batched), ``1`` keeps the
  default ``connection=True`` path (the handler never reads ``ctx.conn``), ``2`` the
  same with a handler that writes one row on ``ctx.conn`` (its completion commits in
  that transaction).

Every handler records ``(stage, key, time.time())`` when it starts, in :data:`STARTS`,
so the benchmark can measure the latency from a completion to the next handler.
"""

from __future__ import annotations

import os
import time
from typing import Any

from pgstagechain import Pipeline

TABLE = "bench_variants"
START_STEP = "img_gen"

#: (stage, key, wall-clock start) of every handler call in this process, while RECORD is on
STARTS: list[tuple[str, str, float]] = []
#: off for the memory test: the records themselves would be what grows
RECORD = True

DDL = f"""
CREATE TABLE IF NOT EXISTS bench_jobs (
    job_id bigint PRIMARY KEY,
    tenant_id text NOT NULL
);
CREATE TABLE IF NOT EXISTS {TABLE} (
    job_variants_id bigint PRIMARY KEY,
    job_id bigint NOT NULL REFERENCES bench_jobs,
    img_asset_id text NOT NULL,
    tenant_id text NOT NULL,
    current_step text NOT NULL DEFAULT '{START_STEP}',
    status text NOT NULL DEFAULT 'running',
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS bench_writes (stage text NOT NULL, key text NOT NULL);
"""


def stage_names(row_stages: int, group_stages: int) -> tuple[list[str], list[str]]:
    return [f"row_{i + 1}" for i in range(row_stages)], [
        f"group_{i + 1}" for i in range(group_stages)
    ]


async def _noop(ctx: Any) -> None:
    if RECORD:
        STARTS.append((ctx.stage, str(ctx.key), time.time()))


async def _writes(ctx: Any) -> None:
    if RECORD:
        STARTS.append((ctx.stage, str(ctx.key), time.time()))
    await ctx.conn.execute("INSERT INTO bench_writes VALUES (%s, %s)", (ctx.stage, str(ctx.key)))


def build_pipeline(
    row_stages: int = 8,
    group_stages: int = 2,
    *,
    connection: bool = False,
    writes: bool = False,
    name: str = "bench",
) -> Pipeline:
    """The benchmark pipeline: ``row_stages`` per row, then ``group_stages`` per job;
    with ``writes``, every handler writes a row on its connection."""
    if row_stages < 1:
        raise ValueError("the benchmark pipeline needs at least one row stage")
    pipeline = Pipeline(
        name,
        table=TABLE,
        key="job_variants_id",
        group_column="job_id" if group_stages else None,
        extra_columns=["tenant_id", "img_asset_id"],
        start=START_STEP,
    )
    rows, groups = stage_names(row_stages, group_stages)
    handler = _writes if writes else _noop
    connection = connection or writes
    previous = START_STEP
    for stage_name in rows:
        pipeline.stage(after=previous, name=stage_name, connection=connection)(handler)
        previous = stage_name
    for stage_name in groups:
        pipeline.stage(after=previous, name=stage_name, group=True, connection=connection)(handler)
        previous = stage_name
    return pipeline


def pipeline() -> Pipeline:
    """The pipeline the environment describes (for ``pgstagechain worker``)."""
    return build_pipeline(
        int(os.environ.get("BENCH_ROW_STAGES", "8")),
        int(os.environ.get("BENCH_GROUP_STAGES", "2")),
        connection=os.environ.get("BENCH_CONNECTION", "0") == "1",
        writes=os.environ.get("BENCH_CONNECTION", "0") == "2",
    )
