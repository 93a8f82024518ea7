"""Cluster-wide stage limits, held by the database over several worker processes: never
more live runs than ``max_running`` (sampled from the ledger throughout), no slot leaked
by a killed worker, a freed slot taken at once rather than at the next scan, and a rate
held over ten seconds."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from pgstagechain import (
    Pipeline,
    RecoveryScanner,
    Retry,
    Worker,
    admin,
    claim,
    complete,
    migrate,
    uninstall,
)
from pgstagechain._claim import cached_claimer
from tests.apps import limits_app
from tests.apps.seed import add_jobs, create_tables, seed_pipeline
from tests.helpers import WAIT_SECONDS, query, serving, value, wait_until

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.apps.limits_app"


@contextmanager
def workers(
    dsn: str, pipeline: str, count: int, *extra: str, env: dict[str, str] | None = None
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` worker processes serving ``pipeline`` (ids w0, w1, ...), stopped on exit;
    their logs are printed when the test fails."""
    environ = {**os.environ, **(env or {})}
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in range(count)]
        started = [
            subprocess.Popen(
                [
                    *(sys.executable, "-m", "pgstagechain", "--dsn", dsn, "worker"),
                    *(f"{APP}:{pipeline}", "--worker-id", f"w{i}", *extra),
                ],
                cwd=ROOT,
                env=environ,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
            for i, log in enumerate(logs)
        ]
        try:
            yield started
        finally:
            for proc in started:
                if proc.poll() is None:
                    proc.terminate()
            for proc, log in zip(started, logs, strict=True):
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace")[-4000:])


async def prepare(dsn: str, rows: int, table: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(limits_app.TABLES)
    await migrate(
        dsn,
        limits_app.slots,
        limits_app.single,
        limits_app.rated,
        limits_app.slots_expiring,
        limits_app.chained,
    )
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            f"INSERT INTO {table} SELECT g, 'new', 'done' FROM generate_series(1, %s) g",  # type: ignore[arg-type]
            (rows,),
        )


async def finished(dsn: str, table: str) -> int:
    return int(
        await value(
            dsn,
            f"SELECT count(*) FROM {table} WHERE current_step = 'after_work' AND status = 'done'",  # type: ignore[arg-type]
        )
    )


LIVE = (
    "SELECT count(*) FROM pgstagechain.runs"
    " WHERE pipeline = %s AND stage = 'work' AND state = 'running'"
)


async def sample_until_finished(dsn: str, pipeline: str, table: str, rows: int) -> list[int]:
    """The live runs of ``work`` in the ledger, sampled until every row finished."""
    seen: list[int] = []
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        with anyio.fail_after(WAIT_SECONDS * 2):
            while True:
                cur = await conn.execute(LIVE, (pipeline,))
                row = await cur.fetchone()
                assert row is not None
                seen.append(int(row[0]))
                if await finished(dsn, table) == rows:
                    return seen
                await anyio.sleep(0.01)


async def slots_taken(dsn: str, pipeline: str) -> int:
    return int(
        await value(
            dsn,
            "SELECT count(*) FROM pgstagechain.stage_slots WHERE pipeline = %s"
            " AND token IS NOT NULL",
            (pipeline,),
        )
    )


@pytest.mark.slow
async def test_max_running_holds_across_three_worker_processes(pgstagechain_dsn: str) -> None:
    await prepare(pgstagechain_dsn, 40, "slot_items")
    with workers(pgstagechain_dsn, "slots", 3, "--concurrency", "8"):
        seen = await sample_until_finished(pgstagechain_dsn, "slots", "slot_items", 40)
    assert max(seen) <= 2, f"more than 2 live runs of work: {max(seen)}"
    assert max(seen) == 2  # the limit was reached: both slots were used
    assert len(seen) > 20  # sampled throughout, not once
    ran = await query(
        pgstagechain_dsn,
        "SELECT worker_id, count(*) FROM pgstagechain.runs"
        " WHERE pipeline = 'slots' AND stage = 'work' AND state = 'succeeded' GROUP BY 1",
    )
    assert sum(n for _, n in ran) == 40
    assert len(ran) >= 2, f"one worker ran everything: {ran}"
    assert await slots_taken(pgstagechain_dsn, "slots") == 0


@pytest.mark.slow
async def test_rows_going_straight_on_into_a_limited_stage_respect_its_limit(
    pgstagechain_dsn: str,
) -> None:
    await prepare(pgstagechain_dsn, 30, "chained_items")
    with workers(pgstagechain_dsn, "chained", 2, "--concurrency", "8"):
        seen = await sample_until_finished(pgstagechain_dsn, "chained", "chained_items", 30)
    assert max(seen) <= 2, f"more than 2 live runs of work: {max(seen)}"
    assert max(seen) == 2
    assert await slots_taken(pgstagechain_dsn, "chained") == 0


@pytest.mark.slow
async def test_a_killed_worker_does_not_leak_its_slots(pgstagechain_dsn: str) -> None:
    # Handlers of 2 s and leases of 2 s: the worker killed holds its slots for certain,
    # and they come back once the survivor's scan finds its leases expired.
    await prepare(pgstagechain_dsn, 8, "expiring_items")
    common = ("--concurrency", "8", "--lease", "2", "--scan-interval", "1")
    slow = {"LIMITS_WORK_SECONDS": "2"}
    with workers(pgstagechain_dsn, "slots_expiring", 1, *common, env=slow) as (doomed,):

        async def holds_both() -> bool:
            return await slots_taken(pgstagechain_dsn, "slots_expiring") == 2

        await wait_until(holds_both, "the first worker holding both slots")
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
    stranded = await value(
        pgstagechain_dsn,
        "SELECT count(*) FROM pgstagechain.runs WHERE pipeline = 'slots_expiring'"
        " AND worker_id = 'w0' AND state = 'running'",
    )
    assert stranded == 2
    assert await slots_taken(pgstagechain_dsn, "slots_expiring") == 2  # held by the dead
    fast = {"LIMITS_WORK_SECONDS": "0.05"}
    with workers(pgstagechain_dsn, "slots_expiring", 1, *common, env=fast):
        seen = await sample_until_finished(pgstagechain_dsn, "slots_expiring", "expiring_items", 8)
    assert max(seen) <= 2
    expired = await value(
        pgstagechain_dsn,
        "SELECT count(*) FROM pgstagechain.runs WHERE pipeline = 'slots_expiring'"
        " AND worker_id = 'w0' AND state = 'expired'",
    )
    assert expired == 2
    assert await slots_taken(pgstagechain_dsn, "slots_expiring") == 0


@pytest.mark.slow
async def test_a_freed_slot_is_taken_without_waiting_for_a_scan(pgstagechain_dsn: str) -> None:
    # One slot, two worker processes, scans ten minutes apart: every row after the first
    # is claimed only because the end of the run before announced its slot.
    await prepare(pgstagechain_dsn, 12, "single_items")
    with workers(pgstagechain_dsn, "single", 2, "--concurrency", "8", "--scan-interval", "600"):
        seen = await sample_until_finished(pgstagechain_dsn, "single", "single_items", 12)
    assert max(seen) == 1
    assert await slots_taken(pgstagechain_dsn, "single") == 0


@pytest.mark.slow
async def test_a_rate_of_twenty_a_second_holds_over_ten_seconds(pgstagechain_dsn: str) -> None:
    await prepare(pgstagechain_dsn, 300, "rated_items")
    with workers(pgstagechain_dsn, "rated", 3, "--concurrency", "8"):

        async def ten_seconds_of_starts() -> bool:
            spread = await value(
                pgstagechain_dsn,
                "SELECT extract(epoch FROM max(started_at) - min(started_at))"
                " FROM pgstagechain.runs WHERE pipeline = 'rated' AND stage = 'work'",
            )
            return spread is not None and spread > 11

        await wait_until(ten_seconds_of_starts, "eleven seconds of rated starts")
    starts = [
        t
        for (t,) in await query(
            pgstagechain_dsn,
            "SELECT extract(epoch FROM started_at) FROM pgstagechain.runs"
            " WHERE pipeline = 'rated' AND stage = 'work' ORDER BY started_at",
        )
    ]
    first = float(starts[0])
    # any ten seconds: the first (with the bucket's burst) and one a second later
    for offset in (0.0, 1.0):
        window = [t for t in starts if first + offset <= float(t) < first + offset + 10]
        assert 180 <= len(window) <= 220, f"{len(window)} starts in 10 s from +{offset}s"


# -- in one process ------------------------------------------------------------------------


async def limits_rows(dsn: str, pipeline: str) -> list[tuple[object, ...]]:
    return await query(
        dsn,
        "SELECT l.stage, l.max_running, l.max_per_second, l.burst,"
        " (SELECT count(*) FROM pgstagechain.stage_slots s"
        "  WHERE s.pipeline = l.pipeline AND s.stage = l.stage)"
        " FROM pgstagechain.stage_limits l WHERE l.pipeline = %s ORDER BY 1",
        (pipeline,),
    )


def single_items(**limits: object) -> Pipeline:
    """The ``single`` pipeline as another version of the code declares it."""
    return limits_app.limited("single", "single_items", limits_app.work, **limits)


async def test_migrate_writes_the_declared_limits_and_changes_them(pgstagechain_dsn: str) -> None:
    await prepare(pgstagechain_dsn, 0, "single_items")
    assert await limits_rows(pgstagechain_dsn, "single") == [("work", 1, None, None, 1)]
    await migrate(pgstagechain_dsn, single_items(max_running=3, max_per_second=5))
    assert await limits_rows(pgstagechain_dsn, "single") == [("work", 3, 5.0, 1.0, 3)]
    await migrate(pgstagechain_dsn, single_items(max_per_second=50, burst=10))
    assert await limits_rows(pgstagechain_dsn, "single") == [("work", None, 50.0, 10.0, 0)]
    await migrate(pgstagechain_dsn, single_items())
    assert await limits_rows(pgstagechain_dsn, "single") == []
    await migrate(pgstagechain_dsn, single_items(max_running=2))
    async with await psycopg.AsyncConnection.connect(pgstagechain_dsn, autocommit=True) as conn:
        await uninstall(conn, single_items(max_running=2))
    assert await limits_rows(pgstagechain_dsn, "single") == []


async def test_status_shows_each_stage_limits_and_where_they_stand(pgstagechain_dsn: str) -> None:
    await prepare(pgstagechain_dsn, 3, "slot_items")
    await migrate(pgstagechain_dsn, single_items(max_running=2, max_per_second=4, burst=3))
    async with await psycopg.AsyncConnection.connect(pgstagechain_dsn, autocommit=True) as conn:
        held = await claim(conn, limits_app.slots, "work", 1)
        assert held is not None
        found = await admin.status(conn, limits_app.slots)
        assert found["work"].limits == admin.StageLimits(
            max_running=2, live=1, max_per_second=None, burst=None, tokens=None
        )
        assert found["after_work"].limits is None
        as_json = found.to_json()["stages"]
        assert as_json[0]["limits"] == {
            "max_running": 2,
            "live": 1,
            "max_per_second": None,
            "burst": None,
            "tokens": None,
        }
        assert as_json[1]["limits"] is None
        rated = (await admin.live(conn, single_items(max_running=2)))["work"].limits
        assert rated is not None
        assert (rated.max_running, rated.live, rated.max_per_second) == (2, 0, 4.0)
        assert rated.tokens == pytest.approx(3.0)  # a new bucket starts full
        assert rated.describe() == "0/2 live, 4/s (3.0 tokens)"


async def test_a_hand_claim_obeys_the_limit_and_a_cancelled_run_frees_its_slot(
    pgstagechain_dsn: str,
) -> None:
    await prepare(pgstagechain_dsn, 3, "slot_items")
    async with await psycopg.AsyncConnection.connect(pgstagechain_dsn, autocommit=True) as conn:
        first = await claim(conn, limits_app.slots, "work", 1)
        second = await claim(conn, limits_app.slots, "work", 2)
        assert first is not None and second is not None
        assert await claim(conn, limits_app.slots, "work", 3) is None  # both slots taken
        # each run knows its slot, and each slot its run
        held_slots = await query(
            pgstagechain_dsn,
            "SELECT r.row_key, r.slot FROM pgstagechain.runs r JOIN pgstagechain.stage_slots s"
            " ON s.pipeline = r.pipeline AND s.stage = r.stage AND s.slot = r.slot"
            " AND s.run_id = r.id AND s.token = r.token ORDER BY 1",
        )
        assert held_slots in ([("1", 1), ("2", 2)], [("1", 2), ("2", 1)])
        await admin.cancel(conn, limits_app.slots, key="1")
        # the operator's cancel frees the run's slot in the same transaction: no scan needed
        assert await slots_taken(pgstagechain_dsn, "slots") == 1
        third = await claim(conn, limits_app.slots, "work", 3)
        assert third is not None
        # so does a re-run that cancels a live run
        report = await admin.rerun(conn, limits_app.slots, stage="work", keys=["3"])
        assert report.runs_cancelled == 1
        assert await slots_taken(pgstagechain_dsn, "slots") == 1  # the second's
        third = await claim(conn, limits_app.slots, "work", 3)
        assert third is not None
        # a run closed some other way (here by hand, in SQL) keeps its slot until the scan
        await conn.execute(
            "UPDATE pgstagechain.runs SET state = 'cancelled'"
            " WHERE row_key = '2' AND stage = 'work' AND state = 'running'"
        )
        assert await slots_taken(pgstagechain_dsn, "slots") == 2
        scanned = await RecoveryScanner(limits_app.slots, pgstagechain_dsn).scan()
        assert scanned.freed_slots == 1
        assert await slots_taken(pgstagechain_dsn, "slots") == 1  # the third's
        await complete(conn, limits_app.slots, third)
        assert await slots_taken(pgstagechain_dsn, "slots") == 0


async def test_a_running_worker_warns_when_the_database_holds_other_limits(
    pgstagechain_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    await prepare(pgstagechain_dsn, 0, "single_items")
    worker = Worker(limits_app.single, pgstagechain_dsn, scan_interval=0.1)
    with caplog.at_level(logging.WARNING, logger="pgstagechain.worker"):
        async with serving(worker):
            # the worker wrote its own limits when it started
            assert await limits_rows(pgstagechain_dsn, "single") == [("work", 1, None, None, 1)]
            await migrate(pgstagechain_dsn, single_items(max_running=4))  # a newer version

            async def warned() -> bool:
                return "differ from this code's" in caplog.text

            await wait_until(warned, "a warning about the limits")
            claimer = cached_claimer(limits_app.single)
            assert claimer is not None
            assert claimer.limits["work"].max_running == 4  # the database's are obeyed
    assert (
        "stage 'work': database has max_running=4, this worker's code declares max_running=1"
    ) in caplog.text


async def test_retries_and_group_stages_go_through_their_limits(pgstagechain_dsn: str) -> None:
    # Every row's first attempt at overlay fails; overlay and both group stages are limited.
    create_tables(pgstagechain_dsn)
    attempts: dict[str, int] = {}

    async def handler(ctx: Any) -> None:
        if ctx.stage == "overlay":
            attempts[ctx.key] = attempts.get(ctx.key, 0) + 1
            if attempts[ctx.key] == 1:
                raise RuntimeError("first attempt fails")

    pipeline = seed_pipeline(handler, retry=Retry(max_attempts=2, base_delay=0.01))
    pipeline["overlay"].max_running = 2
    pipeline["ad_copy_gen_kor"].max_running = 1
    pipeline["instagram_feed_gen"].max_per_second = 50.0
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, 3, 4)
    worker = Worker(pipeline, pgstagechain_dsn, concurrency=8)
    await worker.run_until_idle()
    found = await query(
        pgstagechain_dsn,
        "SELECT stage, state, count(*) FROM pgstagechain.runs"
        " WHERE stage IN ('overlay', 'ad_copy_gen_kor', 'instagram_feed_gen') GROUP BY 1, 2",
    )
    assert sorted(found) == [
        ("ad_copy_gen_kor", "succeeded", 3),
        ("instagram_feed_gen", "succeeded", 3),
        ("overlay", "failed", 12),
        ("overlay", "succeeded", 12),
    ]
    assert await slots_taken(pgstagechain_dsn, "feedly") == 0
    tokens = await value(
        pgstagechain_dsn,
        "SELECT tokens FROM pgstagechain.stage_limits WHERE stage = 'instagram_feed_gen'",
    )
    assert tokens < 5.0  # the group claims spent tokens of the bucket (5 when full)


async def test_a_row_goes_straight_on_into_a_limited_stage_with_a_free_slot(
    pgstagechain_dsn: str,
) -> None:
    await prepare(pgstagechain_dsn, 1, "chained_items")
    stats = await Worker(limits_app.chained, pgstagechain_dsn).run_until_idle()
    assert await finished(pgstagechain_dsn, "chained_items") == 1
    assert stats.chained == 2  # first -> work (a slot taken) -> after_work (freed)
    assert stats.claimed == 3
    assert await slots_taken(pgstagechain_dsn, "chained") == 0


async def test_the_status_command_shows_the_limits(pgstagechain_dsn: str) -> None:
    await prepare(pgstagechain_dsn, 1, "slot_items")

    def status(*more: str) -> str:
        done = subprocess.run(
            [
                *(sys.executable, "-m", "pgstagechain", "--dsn", pgstagechain_dsn),
                *("status", f"{APP}:slots", *more),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "COLUMNS": "200"},
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    table = await anyio.to_thread.run_sync(status)
    assert "limits" in table and "0/2 live" in table
    found = json.loads(await anyio.to_thread.run_sync(status, "--json"))
    by_stage = {s["name"]: s["limits"] for s in found["stages"]}
    assert by_stage["work"] == {
        "max_running": 2,
        "live": 0,
        "max_per_second": None,
        "burst": None,
        "tokens": None,
    }
    assert by_stage["after_work"] is None
