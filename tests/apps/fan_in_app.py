"""Pipelines for the fan-in tests, one per policy, for worker subprocesses.

The seed's table, with two row stages and two group stages. A row stage fails every
attempt for the keys listed in ``doomed`` (so a test can make a member fail for good, then
heal it and retry it); each group stage records what it was given in ``fan_in_seen`` on
``ctx.conn``, so a record exists exactly once per successful run.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg

from pgstagechain import FanIn, Pipeline, Retry, StageContext

ROW_STAGES = ["vlm_analyze", "ocr_eval"]
GROUP_STAGES = ["ad_copy_gen_kor", "instagram_feed_gen"]
#: two attempts, quickly: a doomed member fails for good after both
RETRY = Retry(max_attempts=2, base_delay=0.05, max_delay=0.1)

TABLES = """
ALTER TABLE jobs_variants ADD COLUMN variant_count integer;
CREATE TABLE doomed (row_key text PRIMARY KEY);
CREATE TABLE fan_in_seen (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id text NOT NULL,
    stage text NOT NULL,
    run_id bigint NOT NULL,
    members jsonb NOT NULL,
    failed jsonb NOT NULL
);
"""


def create_tables(dsn: str) -> None:
    """The seed's tables (see tests.apps.seed) and this app's own."""
    from tests.apps.seed import create_tables as seed_tables

    seed_tables(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(TABLES)


async def variant(ctx: StageContext[Any]) -> dict[str, Any]:
    cur = await ctx.conn.execute(
        "SELECT EXISTS (SELECT 1 FROM doomed WHERE row_key = %s)", (ctx.claim.row_key,)
    )
    found = await cur.fetchone()
    if found and found[0] and ctx.stage == "ocr_eval":
        raise RuntimeError(f"OCR could not read variant {ctx.key}")
    return {"variant": ctx.claim.row_key, "stage": ctx.stage}


async def job(ctx: StageContext[Any]) -> dict[str, Any]:
    failed = {k: {"stage": f.stage, "error": f.error} for k, f in ctx.failed_members.items()}
    await ctx.conn.execute(
        "INSERT INTO fan_in_seen (job_id, stage, run_id, members, failed)"
        " VALUES (%s, %s, %s, %s::jsonb, %s::jsonb)",
        (ctx.key, ctx.stage, ctx.run_id, json.dumps(sorted(ctx.members)), json.dumps(failed)),
    )
    return {"members": len(ctx.members), "failed": len(failed)}


def make(fan_in: FanIn, *, sized: bool = False) -> Pipeline:
    pipeline = Pipeline(
        "fanin",
        table="jobs_variants",
        key="job_variants_id",
        group_column="job_id",
        group_size_column="variant_count" if sized else None,
        start="img_gen",
    )
    previous = "img_gen"
    for name in ROW_STAGES:
        pipeline.stage(after=previous, name=name, retry=RETRY)(variant)
        previous = name
    for n, name in enumerate(GROUP_STAGES):
        pipeline.stage(
            after=previous, name=name, group=True, fan_in=None if n else fan_in, retry=RETRY
        )(job)
        previous = name
    return pipeline


all_done = make(FanIn.ALL_DONE)
settled = make(FanIn.SETTLED)
fail_fast = make(FanIn.FAIL_FAST)
sized = make(FanIn.ALL_DONE, sized=True)
sized_settled = make(FanIn.SETTLED, sized=True)
