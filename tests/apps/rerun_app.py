"""The seed's pipeline for the re-run tests: ``tests.apps.rerun_app:pipeline``.

Every run records, on ``ctx.conn`` (so exactly once per successful run), its run id and
the run ids of the earlier results it was given (``ctx.results``; for a group stage, its
members). A run waits while a row of ``hold`` names its key and stage, so a test can keep
a run in flight; a row whose ``img_asset_id`` starts with ``bad`` fails at overlay for good.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import psycopg

from pgstagechain import PermanentError, StageContext
from tests.apps.seed import create_tables as seed_tables
from tests.apps.seed import seed_pipeline

TABLES = """
CREATE TABLE rerun_seen (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    row_key text NOT NULL,
    stage text NOT NULL,
    run_id bigint NOT NULL,
    earlier jsonb NOT NULL
);
CREATE TABLE hold (row_key text NOT NULL, stage text NOT NULL, PRIMARY KEY (row_key, stage));
"""


def create_tables(dsn: str) -> None:
    seed_tables(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(TABLES)


async def _wait_while_held(ctx: StageContext[Any]) -> None:
    while True:
        cur = await ctx.conn.execute(
            "SELECT EXISTS (SELECT 1 FROM hold WHERE row_key = %s AND stage = %s)",
            (ctx.claim.row_key, ctx.stage),
        )
        found = await cur.fetchone()
        if not (found and found[0]):
            return
        await asyncio.sleep(0.05)


async def _record(ctx: StageContext[Any], earlier: dict[str, Any]) -> dict[str, Any]:
    await ctx.conn.execute(
        "INSERT INTO rerun_seen (row_key, stage, run_id, earlier) VALUES (%s, %s, %s, %s)",
        (ctx.claim.row_key, ctx.stage, ctx.run_id, json.dumps(earlier)),
    )
    return {"run_id": ctx.run_id}


async def row(ctx: StageContext[Any]) -> dict[str, Any]:
    await _wait_while_held(ctx)
    if ctx.stage == "overlay" and str(ctx.row.get("img_asset_id", "")).startswith("bad"):
        raise PermanentError(f"cannot overlay {ctx.row['img_asset_id']}: unreadable image")
    earlier = {stage: (result or {}).get("run_id") for stage, result in ctx.results.items()}
    return await _record(ctx, earlier)


async def group(ctx: StageContext[Any]) -> dict[str, Any]:
    await _wait_while_held(ctx)
    members = {
        key: {stage: (result or {}).get("run_id") for stage, result in results.items()}
        for key, results in ctx.members.items()
    }
    return await _record(ctx, members)


pipeline = seed_pipeline(row, group)
