"""Hostile notifications against a real worker: anyone who may NOTIFY on the pipeline's
channel can send anything up to 8,000 bytes. At worst the payload is counted as malformed
and logged; the worker goes on, and real work still runs to the end afterwards."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import anyio
import anyio.from_thread
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgstagechain import StageContext, Worker, migrate
from tests.apps.seed import ROW_STAGES, add_jobs, create_tables, seed_pipeline
from tests.unit.test_events_fuzz import json_values

pytestmark = pytest.mark.slow

STEPS = ["img_gen", *ROW_STAGES, "ad_copy_gen_kor", "instagram_feed_gen", "nowhere"]

#: payloads that reached every worker as a crash (named in the report that found them)
NAMED_SQL = [
    "SELECT pg_notify(%(channel)s, repeat('[', 7999))",
    "SELECT pg_notify(%(channel)s, repeat('{\"a\":', 1599))",
    """SELECT pg_notify(%(channel)s, '["r","img_gen","\\ud800",null]')""",
    """SELECT pg_notify(%(channel)s, '["r","img_gen","101","\\udc00"]')""",
    """SELECT pg_notify(%(channel)s, '["g","iou_eval","\\ud83d",null]')""",
    """SELECT pg_notify(%(channel)s, '["r","img_gen",{"a":{"b":[1,{"c":null}]}},null]')""",
    """SELECT pg_notify(%(channel)s, '["r","img_gen",[["101"]],"1"]')""",
    """SELECT pg_notify(%(channel)s, '["r","img_gen","10\\u00001",null]')""",
    """SELECT pg_notify(%(channel)s, '["r","img_gen","101","\\u0000"]')""",
    """SELECT pg_notify(%(channel)s, '["r","img_gen","abc","1"]')""",
    """SELECT pg_notify(%(channel)s, '["r","img_gen","1e999","1"]')""",
    """SELECT pg_notify(%(channel)s, '["r","img_gen","' || repeat('9', 1000) || '",null]')""",
    """SELECT pg_notify(%(channel)s, '["r","img_gen",' || repeat('9', 5000) || ',null]')""",
    """SELECT pg_notify(%(channel)s, '["r","img_gen","101",1e999]')""",
    """SELECT pg_notify(%(channel)s, '["t","img_gen","\\ud800",null]')""",
    """SELECT pg_notify(%(channel)s, '["t","\\ud800","1",null]')""",
]

#: text PostgreSQL can carry in a notification (no NUL, valid UTF-8)
sendable_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"))
keys = (
    st.sampled_from(["101", "102", "201", "202", "999999", "-1", "0", "1e3", " 101", "101 "])
    | sendable_text
)
forged = st.tuples(
    st.sampled_from(["r", "g", "t"]),
    st.sampled_from(STEPS),
    keys | json_values,
    st.none() | st.sampled_from(["1", "2"]) | json_values,
).map(list)
payloads = (
    st.one_of(forged, json_values).map(json.dumps)  # ascii: surrogates and NULs escaped
    | sendable_text
    | st.builds(lambda n, c: c * n, st.integers(1, 7999), st.sampled_from(["[", "{", '["r",']))
).filter(lambda p: len(p.encode()) < 8000)


def wait_for(condition: Callable[[], bool], what: str, alive: Future[Any], within: float) -> None:
    """Poll ``condition``; fail at once if the worker stopped, or after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if alive.done():
            raise AssertionError(f"the worker stopped while waiting for {what}") from (
                alive.exception()
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for: {what}")
        time.sleep(0.05)


def test_hostile_notifications_never_stop_a_worker(pgstagechain_dsn: str) -> None:
    dsn = pgstagechain_dsn
    create_tables(dsn)
    ran: list[tuple[str, str]] = []

    def handler(ctx: StageContext[Any]) -> dict[str, str]:
        ran.append((ctx.stage, ctx.claim.row_key))
        return {"key": ctx.claim.row_key}

    pipeline = seed_pipeline(handler, name="hostile")
    anyio.run(migrate, dsn, pipeline)
    add_jobs(dsn, jobs=2, variants=2, release=False)
    with psycopg.connect(dsn, autocommit=True) as conn:  # job 2 failed for good
        conn.execute(
            "UPDATE jobs_variants SET current_step = 'overlay', status = 'failed' WHERE job_id = 2"
        )
    # Each named payload must be tried: with a concurrency of 4, two keys within 10 ms
    # would count as a burst, which is claimed as ready rows, the keys left untried.
    worker = Worker(pipeline, dsn, scan_interval=0.5, concurrency=40)
    sent = 0

    with (
        anyio.from_thread.start_blocking_portal() as portal,
        psycopg.connect(dsn, autocommit=True) as conn,
    ):
        alive = portal.start_task_soon(worker.run)
        portal.call(worker.wait_started)
        # Keys announced while a scan is due are left to the scan, untried: the named ones
        # must each be tried, so they come after the start-up scans.
        wait_for(lambda: worker.idle, "the start-up scans", alive, within=20)

        for statement in NAMED_SQL:
            conn.execute(statement, {"channel": pipeline.channel})
            sent += 1
            wait_for(
                lambda count=sent: worker.stats.notifications >= count,
                f"the worker to read {statement}",
                alive,
                within=20,
            )
        # Every one is malformed: unparsable, or a key no bigint column holds.
        wait_for(
            lambda: worker.stats.malformed >= len(NAMED_SQL),
            "the named payloads to be counted as malformed",
            alive,
            within=20,
        )
        named_malformed = worker.stats.malformed

        @settings(
            max_examples=80,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        @given(payloads)
        def send(payload: str) -> None:
            nonlocal sent
            conn.execute("SELECT pg_notify(%s, %s)", (pipeline.channel, payload))
            sent += 1
            assert not alive.done(), f"the worker stopped after {payload[:200]!r}"

        send()
        wait_for(
            lambda: worker.stats.notifications >= sent and worker.in_flight == 0,
            "every notification to be read",
            alive,
            within=60,
        )
        print(f"\n{sent} hostile notifications: {worker.stats}")
        assert worker.stats.malformed > named_malformed

        # The worker still serves: a real chain runs to the end.
        conn.execute("UPDATE jobs_variants SET status = 'done' WHERE job_id = 1")

        def finished() -> bool:
            [(done,)] = conn.execute(
                "SELECT count(*) FROM pgstagechain.groups"
                " WHERE step = 'instagram_feed_gen' AND status = 'done'"
            ).fetchall()
            return bool(done)

        wait_for(finished, "the real chain to finish", alive, within=60)
        portal.call(worker.stop)
        alive.result(timeout=60)

    assert sorted(set(ran)) == sorted(ran)  # nothing ran twice
    assert {key for _, key in ran} == {"101", "102", "1"}  # job 2 (failed) never ran
    assert len(ran) == 2 * len(ROW_STAGES) + 2
