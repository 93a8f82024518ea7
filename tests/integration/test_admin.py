"""The operating functions behind status/inspect/retry/cancel, called from Python."""

from __future__ import annotations

from typing import Any

import anyio
import psycopg
import pytest

from pgstagechain import ConfigurationError, Pipeline, Worker, claim, complete, fail, migrate
from pgstagechain.admin import CANCEL_REASON, cancel, history, retry, stage_order, status
from tests.apps.seed import ROW_STAGES, add_jobs, create_tables, seed_pipeline
from tests.helpers import holds, wait_until

pytestmark = pytest.mark.anyio


async def ok(ctx: Any) -> dict[str, str]:
    return {"stage": ctx.stage}


def test_stage_order_follows_the_chain_not_the_declaration() -> None:
    pipeline = Pipeline("scrambled", table="t", start="begin")
    pipeline.stage(after="b", name="c")(ok)
    pipeline.stage(after="begin", name="a")(ok)
    pipeline.stage(after="a", name="b")(ok)
    assert [s.name for s in stage_order(pipeline)] == ["a", "b", "c"]


async def test_status_counts_running_retrying_and_waiting_groups(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    pipeline = seed_pipeline(ok)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=2, variants=2)
    # job 1's rows go all the way to the fan-in; job 2's are only released
    await Worker(
        pipeline, pgstagechain_dsn, stages=ROW_STAGES[:1], scan_interval=1
    ).run_until_idle()
    async with await psycopg.AsyncConnection.connect(pgstagechain_dsn, autocommit=True) as conn:
        claims = [await claim(conn, pipeline, "yolo_detect", key) for key in (101, 102, 201)]
        assert all(claims)
        assert claims[2] is not None
        assert await fail(conn, pipeline, claims[2], "busy", retry_in=600)
        found = {s.stage: s for s in (await status(conn, pipeline)).stages}
    yolo = found["yolo_detect"]
    assert (yolo.waiting, yolo.running, yolo.retrying, yolo.done, yolo.failed) == (1, 3, 1, 0, 0)
    assert yolo.oldest_waiting is not None  # 202 finished vlm_analyze a moment ago
    assert found["vlm_analyze"].done == 4
    assert found["vlm_analyze"].runs.total == found["vlm_analyze"].runs.succeeded == 4
    assert found["vlm_analyze"].runs.p95_seconds is not None
    assert found["yolo_detect"].runs.failed == 1  # the failed attempt
    assert found["ad_copy_gen_kor"].waiting == 0

    async with await psycopg.AsyncConnection.connect(pgstagechain_dsn, autocommit=True) as conn:
        report = await cancel(conn, pipeline, key="201")
        assert (report.keys, report.runs_closed, report.retries_dropped) == (("201",), 0, 1)
        found = {s.stage: s for s in (await status(conn, pipeline)).stages}
    yolo = found["yolo_detect"]
    assert (yolo.waiting, yolo.running, yolo.retrying, yolo.done, yolo.failed) == (1, 2, 0, 0, 1)


async def test_cancel_while_a_worker_runs_the_stage(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    started = anyio.Event()
    release = anyio.Event()

    async def slow(ctx: Any) -> dict[str, str]:
        started.set()
        await release.wait()
        return {"late": "yes"}

    pipeline = seed_pipeline(slow)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=1)
    worker = Worker(pipeline, pgstagechain_dsn, stages=["vlm_analyze"], scan_interval=1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        with anyio.fail_after(30):
            await started.wait()
        async with await psycopg.AsyncConnection.connect(pgstagechain_dsn, autocommit=True) as conn:
            report = await cancel(conn, pipeline, stage="vlm_analyze")
            assert report.keys == ("101",)
            assert report.runs_closed == 1
            release.set()
            await wait_until(
                holds(lambda: worker.stats.lease_lost == 1), "the late completion to be refused"
            )
            worker.stop()
            found = await history(conn, pipeline, "101")
    assert (found.step, found.status) == ("vlm_analyze", "failed")
    assert [(r.state, r.error, r.result) for r in found.runs] == [
        ("cancelled", CANCEL_REASON, None)
    ]
    assert worker.stats.succeeded == 0


async def test_retry_after_cancel_starts_a_first_attempt_again(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    pipeline = seed_pipeline(ok)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=1)
    async with await psycopg.AsyncConnection.connect(pgstagechain_dsn, autocommit=True) as conn:
        got = await claim(conn, pipeline, "vlm_analyze", 101)
        assert got is not None
        await complete(conn, pipeline, got)
        got = await claim(conn, pipeline, "yolo_detect", 101)
        assert got is not None
        await cancel(conn, pipeline, key="101")
        assert await retry(conn, pipeline, key="101") == ["101"]
        assert await retry(conn, pipeline, key="101") == []  # no longer failed
        again = await claim(conn, pipeline, "yolo_detect", 101)
        assert again is not None
        assert again.attempt == 1
        found = await history(conn, pipeline, "101")
    assert [(r.stage, r.state) for r in found.runs] == [
        ("vlm_analyze", "succeeded"),
        ("yolo_detect", "cancelled"),
        ("yolo_detect", "running"),
    ]


async def test_targets_are_checked_before_touching_anything(pgstagechain_dsn: str) -> None:
    pipeline = seed_pipeline(ok)
    async with await psycopg.AsyncConnection.connect(pgstagechain_dsn, autocommit=True) as conn:
        with pytest.raises(ConfigurationError, match="exactly one of key, group or stage"):
            await retry(conn, pipeline)
        with pytest.raises(ConfigurationError, match="got key, stage"):
            await cancel(conn, pipeline, key="1", stage="overlay")
        with pytest.raises(ConfigurationError, match="has no stage 'nope'"):
            await retry(conn, pipeline, stage="nope")
