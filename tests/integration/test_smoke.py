from __future__ import annotations

import psycopg
import pytest

from pgstagechain import Worker, migrate
from tests.apps.seed import GROUP_STAGES, ROW_STAGES, add_jobs, create_tables, seed_pipeline

pytestmark = pytest.mark.anyio


async def test_seed_chain_runs_end_to_end(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    seen: list[tuple[str, str]] = []

    async def handler(ctx):  # type: ignore[no-untyped-def]
        seen.append((ctx.stage, str(ctx.key)))
        return {"stage": ctx.stage}

    pipeline = seed_pipeline(handler)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=3, variants=2)
    stats = await Worker(pipeline, pgstagechain_dsn, scan_interval=1).run_until_idle()
    assert stats.failed == 0
    with psycopg.connect(pgstagechain_dsn) as conn:
        rows = conn.execute(
            "SELECT current_step, status, count(*) FROM jobs_variants GROUP BY 1, 2"
        ).fetchall()
        assert rows == [("iou_eval", "done", 6)]
        groups = conn.execute(
            "SELECT step, status, count(*) FROM pgstagechain.groups GROUP BY 1, 2"
        ).fetchall()
        assert groups == [("instagram_feed_gen", "done", 3)]
    assert len(seen) == 6 * len(ROW_STAGES) + 3 * len(GROUP_STAGES)
