"""A claim proves itself by its token: a run id that comes round again (after a server
crash lost the sequence's advance) never lets an old claim act on the new run."""

from __future__ import annotations

import secrets
from typing import Any

import anyio
import attrs
import psycopg
import pytest

from pgstagechain import LeaseLostError, claim, complete, fail, migrate
from pgstagechain._claim import claimer_for
from pgstagechain._connect import connect
from tests.apps.seed import add_jobs, create_tables, seed_pipeline

pytestmark = pytest.mark.anyio


async def noop(ctx: Any) -> None:
    return None


async def wait_for_lock_wait(dsn: str, pid: int) -> None:
    """Return once backend ``pid`` waits for a lock; fail after ten seconds."""
    with anyio.fail_after(10):
        async with await connect(dsn, autocommit=True) as conn:
            while True:
                cur = await conn.execute(
                    "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
                )
                if await cur.fetchone() == ("Lock",):
                    return
                await anyio.sleep(0.01)


def run_state(dsn: str, run_id: int) -> tuple[str, Any]:
    with psycopg.connect(dsn) as conn:
        found = conn.execute(
            "SELECT state, result FROM pgstagechain.runs WHERE id = %s", (run_id,)
        ).fetchone()
    assert found is not None
    return found


async def test_claims_carry_distinct_tokens_stored_with_their_runs(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    pipeline = seed_pipeline(noop)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=2, variants=2)
    async with await connect(pgstagechain_dsn, autocommit=True) as conn:
        claims = [await claim(conn, pipeline, "vlm_analyze", key) for key in (101, 102, 201)]
    assert all(c is not None for c in claims)
    tokens = {c.token for c in claims if c is not None}
    assert len(tokens) == 3
    with psycopg.connect(pgstagechain_dsn) as conn:
        stored = conn.execute(
            "SELECT id, token, series FROM pgstagechain.runs ORDER BY id"
        ).fetchall()
    assert {(c.run_id, c.token, c.series) for c in claims if c is not None} == set(stored)


async def test_an_old_claim_with_the_same_run_id_cannot_touch_the_new_run(
    pgstagechain_dsn: str,
) -> None:
    """What a stale handler holds after a crash: the id of a run that is now another
    claim's. Completing, failing, renewing or releasing with it changes nothing."""
    create_tables(pgstagechain_dsn)
    pipeline = seed_pipeline(noop)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=1)
    async with await connect(pgstagechain_dsn, autocommit=True) as conn:
        live = await claim(conn, pipeline, "vlm_analyze", 101)
        assert live is not None
        stale = attrs.evolve(live, token=secrets.randbits(62))

        with pytest.raises(LeaseLostError):
            async with conn.transaction():
                await complete(conn, pipeline, stale, {"row": "someone else's"})
        assert await fail(conn, pipeline, stale, "stale failure") is False

        claimer = await claimer_for(conn, pipeline)
        cur = await conn.execute(
            claimer.text("renew_leases"),
            {"run_ids": [live.run_id], "tokens": [stale.token], "lease": 600},
        )
        assert await cur.fetchall() == []
        released = await claimer.expire(
            conn, [stale], reason="released by a stale claim", free=True
        )
        assert released == []
        assert run_state(pgstagechain_dsn, live.run_id) == ("running", None)

        # the live claim itself still completes, with its own result
        await complete(conn, pipeline, live, {"row": 101})
    assert run_state(pgstagechain_dsn, live.run_id) == ("succeeded", {"row": 101})


async def test_retries_keep_the_series_and_draw_a_new_token(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    pipeline = seed_pipeline(noop)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=1)
    async with await connect(pgstagechain_dsn, autocommit=True) as conn:
        first = await claim(conn, pipeline, "vlm_analyze", 101)
        assert first is not None and first.series == first.token
        assert await fail(conn, pipeline, first, "try again", retry_in=0.0) is True
        claimer = await claimer_for(conn, pipeline)
        (second,) = await claimer.claim(conn, "vlm_analyze", worker_id="w", retries=True)
    assert second.attempt == 2
    assert second.series == first.series and second.token != first.token


async def test_a_row_no_run_holds_is_sent_back_once_even_by_two_scanners_at_once(
    pgstagechain_dsn: str,
) -> None:
    """A row at (stage, running) with no run (a claim lost in a crash, an edit by hand)
    goes back to (previous step, done) with a run in its history that says why; two
    scans at the same moment repair it once."""
    create_tables(pgstagechain_dsn)
    pipeline = seed_pipeline(noop)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=1)
    with psycopg.connect(pgstagechain_dsn) as conn:
        conn.execute(
            "UPDATE jobs_variants SET current_step = 'yolo_detect', status = 'running'"
            " WHERE job_variants_id = 101"
        )
    first = await connect(pgstagechain_dsn)
    second = await connect(pgstagechain_dsn, autocommit=True)
    try:
        claimer = await claimer_for(first, pipeline)
        repaired = await claimer.expire(first)  # not committed yet: the row stays locked
        outcome: list[Any] = []

        async def scan_too() -> None:
            outcome.append(await claimer.expire(second))

        async with anyio.create_task_group() as tg:
            tg.start_soon(scan_too)
            await wait_for_lock_wait(pgstagechain_dsn, second.info.backend_pid)
            assert outcome == []
            await first.commit()
    finally:
        await first.close()
        await second.close()
    assert repaired == [("yolo_detect", "101", False, True)]
    assert outcome == [[]]
    with psycopg.connect(pgstagechain_dsn) as conn:
        assert conn.execute(
            "SELECT current_step, status FROM jobs_variants WHERE job_variants_id = 101"
        ).fetchone() == ("vlm_analyze", "done")
        runs = conn.execute(
            "SELECT stage, state, worker_id, error FROM pgstagechain.runs"
        ).fetchall()
    assert len(runs) == 1
    stage, state, worker, error = runs[0]
    assert (stage, state, worker) == ("yolo_detect", "expired", "pgstagechain-recovery")
    assert "no run held it" in error and "(vlm_analyze, done)" in error
