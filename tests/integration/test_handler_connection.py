"""A handler's connection (``ctx.conn``, ``connection=True``): checked out only when the
handler reads it; what the handler writes there commits with its completion, which goes
straight on to the next stage, or rolls back with a refused completion."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from pgstagechain import Pipeline, StageContext, Worker, migrate
from tests.helpers import query

pytestmark = pytest.mark.anyio

ROWS = 40
STAGES = ("first", "second", "third")
INSERT = "INSERT INTO writes VALUES (%s, %s, %s)"


async def items_pipeline(dsn: str, handler: Callable[[Any], Any]) -> Pipeline:
    """Three stages running ``handler`` over ``ROWS`` rows released at once."""
    await query(
        dsn,
        "CREATE TABLE items (id bigint PRIMARY KEY, step text NOT NULL, status text NOT NULL);"
        " CREATE TABLE writes (stage text, key text, run_id bigint)",
    )
    pipeline = Pipeline("conns", table="items", key="id", step_column="step", start="new")
    previous = "new"
    for name in STAGES:
        pipeline.stage(after=previous, name=name)(handler)
        previous = name
    await migrate(dsn, pipeline)
    await query(
        dsn, "INSERT INTO items SELECT k, 'new', 'done' FROM generate_series(1, %s) k", (ROWS,)
    )
    return pipeline


def checkouts(records: list[logging.LogRecord]) -> int:
    """Connections requested from any pool (psycopg_pool logs each request)."""
    return sum(r.getMessage().startswith("connection requested") for r in records)


async def test_a_handler_that_never_reads_its_connection_checks_none_out(
    pgstagechain_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def ignores_its_connection(ctx: StageContext[Any]) -> None:
        return None

    pipeline = await items_pipeline(pgstagechain_dsn, ignores_its_connection)
    worker = Worker(pipeline, pgstagechain_dsn, concurrency=20, pool_size=4, scan_interval=3600)
    with caplog.at_level(logging.INFO, logger="psycopg.pool"):
        stats = await worker.run_until_idle()
    assert stats.succeeded == ROWS * len(STAGES)
    # Completed through the batcher, straight on to the next stage, as connection=False.
    assert stats.chained == ROWS * (len(STAGES) - 1)
    # One connection per run before; now at most one kept ready per slot of the pool.
    assert checkouts(caplog.records) <= 4


async def test_async_writes_commit_with_the_completion_that_goes_straight_on(
    pgstagechain_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def writes(ctx: StageContext[Any]) -> None:
        await ctx.conn.execute(INSERT, (ctx.stage, ctx.claim.row_key, ctx.run_id))

    pipeline = await items_pipeline(pgstagechain_dsn, writes)
    worker = Worker(pipeline, pgstagechain_dsn, concurrency=20, pool_size=4, scan_interval=3600)
    with caplog.at_level(logging.INFO, logger="psycopg.pool"):
        stats = await worker.run_until_idle()
    assert stats.chained == ROWS * (len(STAGES) - 1)
    assert await written_by_succeeded_runs(pgstagechain_dsn) == (ROWS * len(STAGES),) * 3
    # Connections that went back clean are handed to the next handler without the pool.
    assert checkouts(caplog.records) <= 4


async def test_sync_writes_commit_with_the_completion_that_goes_straight_on(
    pgstagechain_dsn: str,
) -> None:
    def writes(ctx: StageContext[Any]) -> None:  # a def stage: runs in a thread
        ctx.conn.execute(INSERT, (ctx.stage, ctx.claim.row_key, ctx.run_id))

    pipeline = await items_pipeline(pgstagechain_dsn, writes)
    stats = await Worker(
        pipeline, pgstagechain_dsn, concurrency=8, scan_interval=3600
    ).run_until_idle()
    # A sync handler's completion in its own transaction claims the next stage as well.
    assert stats.chained == ROWS * (len(STAGES) - 1)
    assert await written_by_succeeded_runs(pgstagechain_dsn) == (ROWS * len(STAGES),) * 3


async def written_by_succeeded_runs(dsn: str) -> tuple[int, int, int]:
    """(writes, succeeded runs, writes made by a succeeded run of that very stage and row)."""
    [found] = await query(
        dsn,
        "SELECT (SELECT count(*) FROM writes),"
        " (SELECT count(*) FROM pgstagechain.runs WHERE state = 'succeeded'),"
        " (SELECT count(*) FROM writes w JOIN pgstagechain.runs r ON r.id = w.run_id"
        "  AND r.stage = w.stage AND r.row_key = w.key AND r.state = 'succeeded')",
    )
    return found


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_writes_roll_back_when_the_completion_is_refused(
    pgstagechain_dsn: str, kind: str
) -> None:
    dsn = pgstagechain_dsn
    # As if the lease ran out and recovery closed the run while its handler worked.
    expire = "UPDATE pgstagechain.runs SET state = 'expired' WHERE id = %s"

    expired: list[int] = []

    def unlucky(ctx: StageContext[Any]) -> bool:
        """Once only: the row is run again afterwards."""
        if expired or ctx.stage != "second" or ctx.claim.row_key != "7":
            return False
        expired.append(ctx.run_id)
        return True

    async def writes_async(ctx: StageContext[Any]) -> None:
        await ctx.conn.execute(INSERT, (ctx.stage, ctx.claim.row_key, ctx.run_id))
        if unlucky(ctx):
            await query(dsn, expire, (ctx.run_id,))

    def writes_sync(ctx: StageContext[Any]) -> None:
        ctx.conn.execute(INSERT, (ctx.stage, ctx.claim.row_key, ctx.run_id))
        if unlucky(ctx):
            with psycopg.connect(dsn, autocommit=True) as other:
                other.execute(expire, (ctx.run_id,))

    pipeline = await items_pipeline(dsn, writes_async if kind == "async" else writes_sync)
    stats = await Worker(pipeline, dsn, concurrency=8, scan_interval=3600).run_until_idle()
    assert stats.lease_lost == 1
    assert await query(
        dsn,
        "SELECT r.state, (SELECT count(*) FROM writes w WHERE w.run_id = r.id)"
        " FROM pgstagechain.runs r WHERE r.id = %s",
        (expired[0],),
    ) == [("expired", 0)]
    # The refused run's write rolled back with it; every write left is a succeeded run's.
    writes, _, matched = await written_by_succeeded_runs(dsn)
    assert writes == matched > 0


async def test_ctx_conn_is_the_handlers_only_while_it_runs(pgstagechain_dsn: str) -> None:
    kept: list[StageContext[Any]] = []

    async def keeps_its_context(ctx: StageContext[Any]) -> None:
        kept.append(ctx)
        assert ctx.conn is ctx.conn  # the same connection on every read

    pipeline = await items_pipeline(pgstagechain_dsn, keeps_its_context)
    await Worker(pipeline, pgstagechain_dsn, scan_interval=3600).run_until_idle()
    with pytest.raises(RuntimeError, match="after its handler returned"):
        _ = kept[0].conn
