"""A stage run by hand (:func:`pgstagechain.contrib.run_stage`) fails the way a worker's
run does: the same error text and the same retry policy."""

from __future__ import annotations

from typing import Any

import anyio
import psycopg
import pytest

from pgstagechain import Pipeline, Retry, admin, migrate
from pgstagechain.contrib import run_stage
from tests.apps.seed import add_jobs, create_tables

pytestmark = pytest.mark.anyio


async def test_a_manual_run_that_times_out_is_recorded_as_a_worker_records_it(
    pgstagechain_dsn: str,
) -> None:
    create_tables(pgstagechain_dsn)
    pipeline = Pipeline("by_hand", table="jobs_variants", key="job_variants_id", start="img_gen")

    @pipeline.stage(after="img_gen", timeout=0.2, retry=Retry(max_attempts=2))
    async def stuck(ctx: Any) -> None:
        await anyio.Event().wait()  # never set: only the stage's time-out ends it

    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=1)
    done = await run_stage(pgstagechain_dsn, pipeline, "stuck", 101)
    assert (done.outcome, done.attempt) == ("retrying", 1)  # attempt 1 of 2
    async with await psycopg.AsyncConnection.connect(pgstagechain_dsn, autocommit=True) as conn:
        found = await admin.history(conn, pipeline, "101")
        status = await admin.status(conn, pipeline)
    (run,) = found.runs
    assert run.error == "TimeoutError: stage 'stuck' ran longer than 0.2s"
    assert run.retry_at is not None
    assert (status["stuck"].running, status["stuck"].retrying) == (1, 1)
