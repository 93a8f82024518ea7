"""Rows go straight on to the next stage on the worker that finished the previous one."""

from __future__ import annotations

import json
from typing import Any

import anyio
import psycopg
import pytest

from pgstagechain import Pipeline, Worker, migrate
from tests.apps.seed import GROUP_STAGES, ROW_STAGES, add_jobs, create_tables, seed_pipeline
from tests.helpers import listen_to_all

pytestmark = pytest.mark.anyio


async def noop(ctx: Any) -> None:
    return None


async def test_middle_stages_need_no_notification(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    pipeline = seed_pipeline(noop)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=3, variants=3, release=False)
    async with await psycopg.AsyncConnection.connect(pgstagechain_dsn, autocommit=True) as ears:
        await ears.execute(listen_to_all(pipeline))
        with psycopg.connect(pgstagechain_dsn, autocommit=True) as conn:
            conn.execute("UPDATE jobs_variants SET status = 'done'")
        stats = await Worker(pipeline, pgstagechain_dsn, scan_interval=1).run_until_idle()
        heard = [json.loads(n.payload) async for n in ears.notifies(timeout=0.5)]
    # 9 rows released, then each of the 3 groups formed, and done at the last group stage;
    # every row stage after the first, and every group stage after the first, was reached
    # without a notification.
    # (and the worker said it joined, then left: see Membership)
    assert sorted((kind, step) for kind, step, _, _ in heard if kind != "w") == sorted(
        [("r", "img_gen")] * 9 + [("g", step) for step in ["iou_eval", GROUP_STAGES[-1]]] * 3
    )
    assert [step for kind, step, _, _ in heard if kind == "w"] == ["joined", "left"]
    assert stats.chained == 9 * (len(ROW_STAGES) - 1) + 3 * (len(GROUP_STAGES) - 1)
    assert stats.claimed == 9 * len(ROW_STAGES) + 3 * len(GROUP_STAGES)
    with psycopg.connect(pgstagechain_dsn) as conn:
        assert (
            conn.execute(
                "SELECT count(*), count(DISTINCT (stage, row_key)) FROM pgstagechain.runs"
            ).fetchone()
            == (9 * len(ROW_STAGES) + 3 * len(GROUP_STAGES),) * 2
        )


async def test_rows_are_handed_over_between_workers_serving_different_stages(
    pgstagechain_dsn: str,
) -> None:
    create_tables(pgstagechain_dsn)
    pipeline = seed_pipeline(noop)
    await migrate(pgstagechain_dsn, pipeline)
    first, second = ROW_STAGES[:4], ROW_STAGES[4:] + GROUP_STAGES
    cpu = Worker(pipeline, pgstagechain_dsn, stages=first, worker_id="cpu", scan_interval=1)
    gpu = Worker(pipeline, pgstagechain_dsn, stages=second, worker_id="gpu", scan_interval=1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(cpu.run)
        tg.start_soon(gpu.run)
        await cpu.wait_started()
        await gpu.wait_started()
        add_jobs(pgstagechain_dsn, jobs=4, variants=2)
        with anyio.fail_after(60):
            while True:
                with psycopg.connect(pgstagechain_dsn) as conn:
                    done = conn.execute(
                        "SELECT count(*) FROM pgstagechain.groups"
                        " WHERE step = %s AND status = 'done'",
                        (GROUP_STAGES[-1],),
                    ).fetchone()
                if done == (4,):
                    break
                await anyio.sleep(0.05)
        cpu.stop()
        gpu.stop()
    with psycopg.connect(pgstagechain_dsn) as conn:
        by_worker = dict(
            conn.execute(
                "SELECT worker_id, array_agg(DISTINCT stage ORDER BY stage)"
                " FROM pgstagechain.runs GROUP BY 1"
            ).fetchall()
        )
        runs = conn.execute(
            "SELECT count(*), count(DISTINCT (stage, row_key)) FROM pgstagechain.runs"
            " WHERE state = 'succeeded'"
        ).fetchone()
    assert by_worker == {"cpu": sorted(first), "gpu": sorted(second)}
    assert runs == (8 * len(ROW_STAGES) + 4 * len(GROUP_STAGES),) * 2
    assert cpu.stats.chained == 8 * (len(first) - 1)
    # 4 jobs: their groups go from the first group stage to the second on the same worker
    assert gpu.stats.chained == 8 * (len(ROW_STAGES) - len(first) - 1) + 4 * (len(GROUP_STAGES) - 1)


async def test_chained_stages_see_every_earlier_result(pgstagechain_dsn: str) -> None:
    """Completion and the next claim are one statement, which cannot read the result it
    stores: the worker adds it. Every stage must still see all earlier results."""
    create_tables(pgstagechain_dsn)
    pipeline = Pipeline(
        "results",
        table="jobs_variants",
        key="job_variants_id",
        group_column="job_id",
        start="img_gen",
    )
    seen: dict[tuple[str, int], dict[str, Any]] = {}

    def record(ctx: Any, value: Any) -> Any:
        seen[(ctx.stage, ctx.key)] = dict(ctx.results)
        return value

    @pipeline.stage(after="img_gen", connection=False)
    async def first(ctx: Any) -> Any:
        return record(ctx, {"first": ctx.key})

    @pipeline.stage(after="first", connection=False)
    async def second(ctx: Any) -> Any:
        return record(ctx, None)  # returns nothing: no entry for it later

    @pipeline.stage(after="second", connection=False)
    async def third(ctx: Any) -> Any:
        return record(ctx, [ctx.results["first"]["first"], "third"])

    @pipeline.stage(after="third", connection=False)
    async def fourth(ctx: Any) -> Any:
        return record(ctx, None)

    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=3, variants=4)
    stats = await Worker(pipeline, pgstagechain_dsn, scan_interval=1).run_until_idle()
    keys = [job * 100 + v for job in (1, 2, 3) for v in range(1, 5)]
    assert stats.chained == len(keys) * 3  # the results did not stop the chain
    for key in keys:
        assert seen[("first", key)] == {}
        assert seen[("second", key)] == {"first": {"first": key}}
        assert seen[("third", key)] == {"first": {"first": key}}
        assert seen[("fourth", key)] == {"first": {"first": key}, "third": [key, "third"]}


async def test_chained_group_stages_keep_members_and_see_earlier_results(
    pgstagechain_dsn: str,
) -> None:
    create_tables(pgstagechain_dsn)

    async def row(ctx: Any) -> Any:
        return {"variant": ctx.key} if ctx.stage == "iou_eval" else None

    async def group(ctx: Any) -> Any:
        return {
            "members": sorted(ctx.members),
            "variants": sorted(m["iou_eval"]["variant"] for m in ctx.members.values()),
            "seen": ctx.results,
        }

    pipeline = seed_pipeline(row, group)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=2, variants=3)
    stats = await Worker(pipeline, pgstagechain_dsn, scan_interval=1).run_until_idle()
    assert stats.chained == 6 * (len(ROW_STAGES) - 1) + 2 * (len(GROUP_STAGES) - 1)
    with psycopg.connect(pgstagechain_dsn) as conn:
        results = dict(
            conn.execute(
                "SELECT row_key || '/' || stage, result FROM pgstagechain.runs"
                " WHERE stage = ANY(%s)",
                (GROUP_STAGES,),
            ).fetchall()
        )
    for job in (1, 2):
        variants = [job * 100 + v for v in (1, 2, 3)]
        first = {"members": [str(v) for v in variants], "variants": variants, "seen": {}}
        assert results[f"{job}/{GROUP_STAGES[0]}"] == first
        assert results[f"{job}/{GROUP_STAGES[1]}"] == {**first, "seen": {GROUP_STAGES[0]: first}}
