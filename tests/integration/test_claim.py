"""Verify-then-claim is one atomic statement: exactly one winner, losers get None."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import psycopg
import pytest

from pgstagechain import Worker, claim, complete, fail, migrate
from pgstagechain._connect import connect
from tests.apps.seed import ROW_STAGES, add_jobs, create_tables, seed_pipeline
from tests.helpers import listen_to_all

pytestmark = pytest.mark.anyio


async def noop(ctx: Any) -> None:
    return None


async def test_many_concurrent_claimers_one_winner(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    pipeline = seed_pipeline(noop)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=1)
    conns = [await connect(pgstagechain_dsn, autocommit=True) for _ in range(24)]
    outcomes: list[Any] = []
    start = anyio.Event()

    async def contend(conn: Any, n: int) -> None:
        await start.wait()
        outcomes.append(await claim(conn, pipeline, "vlm_analyze", 101, worker_id=f"w{n}"))

    try:
        async with anyio.create_task_group() as tg:
            for n, conn in enumerate(conns):
                tg.start_soon(contend, conn, n)
            await anyio.sleep(0.05)
            start.set()
    finally:
        for conn in conns:
            await conn.close()
    winners = [c for c in outcomes if c is not None]
    assert len(outcomes) == 24 and len(winners) == 1
    assert winners[0].attempt == 1 and winners[0].row == {
        "tenant_id": "tenant-1",
        "img_asset_id": "asset-1-1",
    }
    with psycopg.connect(pgstagechain_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pgstagechain.runs").fetchone() == (1,)
        assert conn.execute("SELECT current_step, status FROM jobs_variants").fetchone() == (
            "vlm_analyze",
            "running",
        )


async def test_claims_race_between_processes_in_threads(pgstagechain_dsn: str) -> None:
    """Blocking connections in threads, released by a barrier: still exactly one winner per row."""
    create_tables(pgstagechain_dsn)
    pipeline = seed_pipeline(noop)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=20, variants=1)
    sql_claim = (
        "UPDATE jobs_variants SET current_step = 'vlm_analyze', status = 'running'"
        " WHERE job_variants_id = %s AND current_step = 'img_gen' AND status = 'done' RETURNING 1"
    )
    barrier = threading.Barrier(8)
    wins: list[int] = []

    def contend() -> None:
        with psycopg.connect(pgstagechain_dsn, autocommit=True) as conn:
            for job in range(1, 21):
                barrier.wait()
                if conn.execute(sql_claim, (job * 100 + 1,)).fetchone():
                    wins.append(job)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == list(range(1, 21))


async def test_manual_claim_complete_drives_the_next_stage(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    pipeline = seed_pipeline(noop)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=1)
    async with await connect(pgstagechain_dsn) as conn:
        got = await claim(conn, pipeline, "vlm_analyze", 101)
        assert got is not None
        await conn.commit()
        assert await claim(conn, pipeline, "vlm_analyze", 101) is None
        await conn.execute(listen_to_all(pipeline))
        await conn.commit()
        await complete(conn, pipeline, got, {"score": 0.9})
        await conn.commit()
        note = await anext(conn.notifies(timeout=2))
        assert note.payload == '["r", "vlm_analyze", "101", "1"]'
        # the next stage can now be claimed; failing it without retry fails the row
        nxt = await claim(conn, pipeline, "yolo_detect", 101)
        assert nxt is not None
        assert await fail(conn, pipeline, nxt, "detector exploded")
        await conn.commit()
        cur = await conn.execute("SELECT current_step, status FROM jobs_variants")
        assert await cur.fetchone() == ("yolo_detect", "failed")
        cur = await conn.execute(
            "SELECT stage, state, error, result FROM pgstagechain.runs ORDER BY id"
        )
        assert await cur.fetchall() == [
            ("vlm_analyze", "succeeded", None, {"score": 0.9}),
            ("yolo_detect", "failed", "detector exploded", None),
        ]


async def test_group_forms_once_when_the_last_members_finish_together(
    pgstagechain_dsn: str,
) -> None:
    """Two connections finish the last two members of each group at the same instant."""
    create_tables(pgstagechain_dsn)
    pipeline = seed_pipeline(noop)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=40, variants=2, release=False)
    with psycopg.connect(pgstagechain_dsn, autocommit=True) as conn:
        conn.execute("UPDATE jobs_variants SET current_step = 'iou_eval', status = 'running'")
    barrier = threading.Barrier(2)

    def finish(variant: int) -> None:
        with psycopg.connect(pgstagechain_dsn) as conn:
            for job in range(1, 41):
                barrier.wait()
                conn.execute(
                    "UPDATE jobs_variants SET status = 'done' WHERE job_variants_id = %s",
                    (job * 100 + variant,),
                )
                conn.commit()

    threads = [threading.Thread(target=finish, args=(v,)) for v in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with psycopg.connect(pgstagechain_dsn) as conn:
        groups = conn.execute(
            "SELECT step, status, count(*) FROM pgstagechain.groups GROUP BY 1, 2"
        ).fetchall()
    assert groups == [("iou_eval", "done", 40)]
    stats = await Worker(pipeline, pgstagechain_dsn, scan_interval=1).run_until_idle()
    assert stats.claimed == 80 and stats.failed == 0
    with psycopg.connect(pgstagechain_dsn) as conn:
        per_group = conn.execute(
            "SELECT stage, count(*), count(DISTINCT row_key) FROM pgstagechain.runs GROUP BY 1 ORDER BY 1"
        ).fetchall()
    assert per_group == [("ad_copy_gen_kor", 40, 40), ("instagram_feed_gen", 40, 40)]


async def test_handler_writes_commit_with_completion_and_roll_back_on_error(
    pgstagechain_dsn: str,
) -> None:
    create_tables(pgstagechain_dsn)
    with psycopg.connect(pgstagechain_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE notes (variant bigint, stage text)")

    async def write(ctx: Any) -> dict[str, Any]:
        await ctx.conn.execute("INSERT INTO notes VALUES (%s, %s)", (ctx.key, ctx.stage))
        if ctx.stage == "planner" and ctx.key % 2:
            raise RuntimeError("odd variants fail at planner")
        return {"seen": list(ctx.results)}

    pipeline = seed_pipeline(write)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=2)
    stats = await Worker(pipeline, pgstagechain_dsn, scan_interval=1).run_until_idle()
    assert stats.failed == 1
    with psycopg.connect(pgstagechain_dsn) as conn:
        notes = conn.execute("SELECT variant, stage FROM notes WHERE stage = 'planner'").fetchall()
        assert notes == [(102, "planner")]  # 101's insert rolled back with its failure
        row = conn.execute(
            "SELECT current_step, status FROM jobs_variants WHERE job_variants_id = 101"
        ).fetchone()
        assert row == ("planner", "failed")
        error = conn.execute(
            "SELECT error FROM pgstagechain.runs WHERE state = 'failed'"
        ).fetchone()
        assert error is not None and "odd variants fail at planner" in error[0]
        seen = conn.execute(
            "SELECT result FROM pgstagechain.runs WHERE row_key = '102' AND stage = 'iou_eval'"
        ).fetchone()
        assert seen is not None
        # every earlier stage of the row is visible to the last one
        assert sorted(seen[0]["seen"]) == sorted(ROW_STAGES[:-1])
        # the job never forms a group: one member failed
        assert conn.execute("SELECT count(*) FROM pgstagechain.groups").fetchone() == (0,)


async def test_sync_handlers_results_and_group_members(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    loop_threads: set[str] = set()

    def row_handler(ctx: Any) -> dict[str, Any]:
        loop_threads.add(threading.current_thread().name)
        ctx.conn.execute("SELECT 1")  # a blocking connection in a worker thread
        if ctx.stage == "planner":
            return {"proposal_id": f"p-{ctx.key}"}
        if ctx.stage == "overlay":
            return {"overlay_id": f"o-{ctx.results['planner']['proposal_id']}"}
        return None

    def group_handler(ctx: Any) -> dict[str, Any]:
        overlays = sorted(m["overlay"]["overlay_id"] for m in ctx.members.values())
        return {"overlays": overlays, "tenant_rows": len(ctx.members)}

    pipeline = seed_pipeline(row_handler, group_handler)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=2, variants=3)
    await Worker(pipeline, pgstagechain_dsn, scan_interval=1).run_until_idle()
    assert threading.main_thread().name not in loop_threads
    with psycopg.connect(pgstagechain_dsn) as conn:
        rows = conn.execute(
            "SELECT row_key, result FROM pgstagechain.runs WHERE stage = 'ad_copy_gen_kor' ORDER BY 1"
        ).fetchall()
    assert rows == [
        ("1", {"overlays": ["o-p-101", "o-p-102", "o-p-103"], "tenant_rows": 3}),
        ("2", {"overlays": ["o-p-201", "o-p-202", "o-p-203"], "tenant_rows": 3}),
    ]
