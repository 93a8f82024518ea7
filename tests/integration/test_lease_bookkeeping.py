"""The heartbeat's bookkeeping: a run whose completion already committed is not "lost".

A sync stage that writes on ``ctx.conn`` commits its completion inside its thread; a
heartbeat that renews leases just then must not take that run for one whose lease was
taken over (a false warning, a cancelled task, wrong counters).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from pgstagechain import Pipeline, StageContext, Worker, migrate
from tests.helpers import query

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROWS = 600


async def test_no_false_lease_loss_for_sync_stages_that_commit_in_their_thread(
    pgstagechain_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    dsn = pgstagechain_dsn
    await query(
        dsn,
        "CREATE TABLE items (id bigint PRIMARY KEY, step text NOT NULL, status text NOT NULL);"
        " CREATE TABLE writes (stage text, key text)",
    )

    def writes(ctx: StageContext[Any]) -> dict[str, str]:  # a def stage: runs in a thread
        ctx.conn.execute("INSERT INTO writes VALUES (%s, %s)", (ctx.stage, ctx.claim.row_key))
        return {"key": ctx.claim.row_key}

    pipeline = Pipeline("heartbeat", table="items", key="id", step_column="step", start="new")
    pipeline.stage(after="new", name="first")(writes)
    pipeline.stage(after="first", name="second")(writes)
    await migrate(dsn, pipeline)
    await query(
        dsn, "INSERT INTO items SELECT k, 'new', 'done' FROM generate_series(1, %s) k", (ROWS,)
    )
    # A heartbeat every 0.05 s, while runs of a few milliseconds complete all the time.
    worker = Worker(pipeline, dsn, lease=0.15, concurrency=8, scan_interval=3600)
    with caplog.at_level(logging.WARNING, logger="pgstagechain"):
        stats = await worker.run_until_idle()

    false_alarms = [r.getMessage() for r in caplog.records if "lost its lease" in r.getMessage()]
    print(f"\n{stats}\nfalse lease-loss warnings: {len(false_alarms)}")
    [(finished, successes, duplicates, written)] = await query(
        dsn,
        "SELECT (SELECT count(*) FROM items WHERE (step, status) = ('second', 'done')),"
        " (SELECT count(*) FROM pgstagechain.runs WHERE state = 'succeeded'),"
        " (SELECT count(*) FROM (SELECT 1 FROM pgstagechain.runs WHERE state = 'succeeded'"
        "  GROUP BY stage, row_key HAVING count(*) > 1) d),"
        " (SELECT count(*) FROM writes)",
    )
    assert (finished, successes, duplicates, written) == (ROWS, 2 * ROWS, 0, 2 * ROWS)
    assert false_alarms == []
    assert stats.lease_lost == 0
    assert stats.succeeded == 2 * ROWS
