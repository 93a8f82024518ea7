"""Cluster-wide stage limits, held by the database over several worker processes: never
more live runs than ``max_running`` (sampled from the ledger throughout), no slot leaked
by a killed worker, a freed slot taken at once rather than at the next scan, and a rate
held over ten seconds."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import psycopg
import pytest

from pgstagechain import migrate
from tests.apps import limits_app
from tests.helpers import WAIT_SECONDS, query, value, wait_until

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
        dsn, limits_app.slots, limits_app.single, limits_app.rated, limits_app.slots_expiring
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
        seen = await sample_until_finished(
            pgstagechain_dsn, "slots_expiring", "expiring_items", 8
        )
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
