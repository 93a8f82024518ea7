"""A group whose member changes after it formed forms again: a group stage still at work on
the old members is cancelled, and each group stage runs once per formation. And a worker
whose fan-in declaration differs from the installed one refuses to start."""

from __future__ import annotations

from typing import Any

import anyio
import psycopg
import pytest

from pgstagechain import FanIn, NotInstalledError, Pipeline, Worker, migrate
from pgstagechain._install import require_installed
from tests.apps import fan_in_app
from tests.apps.seed import add_jobs, create_tables
from tests.helpers import query, serving, value, wait_until

pytestmark = pytest.mark.anyio


def two_stage_pipeline(job: Any) -> Pipeline:
    pipeline = Pipeline(
        "reform",
        table="jobs_variants",
        key="job_variants_id",
        group_column="job_id",
        start="img_gen",
    )

    @pipeline.stage(after="img_gen")
    async def ocr_eval(ctx: Any) -> dict[str, str]:
        return {"variant": ctx.claim.row_key}

    pipeline.stage(after="ocr_eval", name="ad_copy_gen_kor", group=True)(job)
    return pipeline


async def group_runs(dsn: str) -> list[tuple[str, str | None]]:
    found = await query(
        dsn,
        "SELECT state, error FROM pgstagechain.runs WHERE stage = 'ad_copy_gen_kor' ORDER BY id",
    )
    return [(state, error) for state, error in found]


async def test_a_member_rerun_while_its_group_runs_cancels_that_run_and_the_group_runs_again(
    pgstagechain_dsn: str,
) -> None:
    dsn = pgstagechain_dsn
    create_tables(dsn)
    started, release = anyio.Event(), anyio.Event()
    seen: list[list[str]] = []

    async def job(ctx: Any) -> dict[str, Any]:
        seen.append(sorted(ctx.members))
        if len(seen) == 1:
            started.set()
            await release.wait()
        return {"members": sorted(ctx.members)}

    pipeline = two_stage_pipeline(job)
    await migrate(dsn, pipeline)
    async with serving(Worker(pipeline, dsn, scan_interval=0.5, lease=3)):
        add_jobs(dsn, jobs=1, variants=2)
        with anyio.fail_after(60):
            await started.wait()
        # member 101 is sent back through ocr_eval while its group's stage runs
        await query(
            dsn,
            "UPDATE jobs_variants SET current_step = 'img_gen' WHERE job_variants_id = 101",
        )

        async def ran_again() -> bool:
            return [s for s, _ in await group_runs(dsn)] == ["cancelled", "succeeded"]

        await wait_until(ran_again, "the group stage to be cancelled and to run again")
        release.set()
        await wait_until(
            lambda: _true(
                value(dsn, "SELECT count(*) = 0 FROM pgstagechain.runs WHERE state = 'running'")
            ),
            "the first run to end",
        )
    (cancelled, reason), (succeeded, _) = await group_runs(dsn)
    assert (cancelled, succeeded) == ("cancelled", "succeeded")
    reason = reason or ""
    assert "the group formed again (member 101 reached (ocr_eval, done)" in reason
    assert (
        await value(dsn, "SELECT status FROM pgstagechain.groups WHERE group_key = '1'") == "done"
    )
    assert seen == [["101", "102"], ["101", "102"]]


async def test_a_member_rerun_after_its_group_finished_runs_the_group_once_more(
    pgstagechain_dsn: str,
) -> None:
    dsn = pgstagechain_dsn
    create_tables(dsn)
    seen: list[str] = []

    async def job(ctx: Any) -> None:
        seen.append(ctx.key)

    pipeline = two_stage_pipeline(job)
    await migrate(dsn, pipeline)
    add_jobs(dsn, jobs=2, variants=2)
    await Worker(pipeline, dsn, scan_interval=0.5).run_until_idle()
    assert sorted(seen) == ["1", "2"]
    await query(dsn, "UPDATE jobs_variants SET current_step = 'img_gen' WHERE job_id = 1")
    await Worker(pipeline, dsn, scan_interval=0.5).run_until_idle()
    # both members re-ran: the group formed again once, when the last of them was done
    assert sorted(seen) == ["1", "1", "2"]
    assert [s for s, _ in await group_runs(dsn)] == ["succeeded"] * 3


async def test_a_worker_with_another_fan_in_refuses_to_start_until_migrate(
    pgstagechain_dsn: str,
) -> None:
    dsn = pgstagechain_dsn
    fan_in_app.create_tables(dsn)
    await migrate(dsn, fan_in_app.all_done)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await require_installed(conn, fan_in_app.all_done)
        for other in (fan_in_app.settled, fan_in_app.sized):
            with pytest.raises(NotInstalledError, match="changed since it was installed"):
                await require_installed(conn, other)
    await migrate(dsn, fan_in_app.settled)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await require_installed(conn, fan_in_app.settled)
    assert fan_in_app.settled[fan_in_app.GROUP_STAGES[0]].fan_in is FanIn.SETTLED


async def _true(awaitable: Any) -> bool:
    return bool(await awaitable)
