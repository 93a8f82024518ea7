"""Re-runs and backfills: ``pgstagechain rerun`` and ``admin.rerun`` with real workers.

A selection of finished rows goes back to the step before a stage: exactly those rows run
that stage and every later one again (their first runs stay in the history), their groups
form again once, a row or group in flight is cancelled (or skipped) as documented, a dry
run changes nothing, and bad input gets a clear error and the documented exit status."""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg
import pytest

from pgstagechain import ConfigurationError, Worker, admin, migrate
from pgstagechain.dashboard import WRITE_HEADER, dashboard_app
from tests.apps import rerun_app
from tests.apps.rerun_app import pipeline
from tests.apps.seed import GROUP_STAGES, ROW_STAGES, add_jobs
from tests.helpers import uvicorn_serving, wait_for
from tests.integration.test_dashboard import CHROMIUM, TOKEN, browser, open_page

__all__ = ["browser"]  # the headless browser fixture, shared with the dashboard's tests

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.apps.rerun_app:pipeline"
LAST_ROW, LAST_GROUP = ROW_STAGES[-1], GROUP_STAGES[-1]


def cli(dsn: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PGSTAGECHAIN_DSN"}
    return subprocess.run(
        [sys.executable, "-m", "pgstagechain", "--dsn", dsn, *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def rows(dsn: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(statement, params).fetchall()


def succeeded(dsn: str, stage: str) -> Counter[str]:
    """Successful runs of a stage per row (group) key."""
    return Counter(
        dict(
            rows(
                dsn,
                "SELECT row_key, count(*) FROM pgstagechain.runs"
                " WHERE stage = %s AND state = 'succeeded' GROUP BY 1",
                (stage,),
            )
        )
    )


def states(dsn: str, key: str, stage: str) -> list[str]:
    found = rows(
        dsn,
        "SELECT state FROM pgstagechain.runs WHERE row_key = %s AND stage = %s ORDER BY id",
        (key, stage),
    )
    return [s for (s,) in found]


def settled(dsn: str, expected_rows: int) -> bool:
    """Every row at (last row stage, done), every group done at the last group stage,
    nothing running, and no row, group or retry waiting."""
    (found,) = rows(
        dsn,
        "SELECT (SELECT count(*) FROM jobs_variants WHERE current_step = %s AND status = 'done'),"
        " (SELECT count(*) FROM jobs_variants),"
        " (SELECT count(*) FROM pgstagechain.groups WHERE step = %s AND status = 'done'),"
        " (SELECT count(DISTINCT job_id) FROM jobs_variants),"
        " (SELECT count(*) FROM pgstagechain.runs WHERE state = 'running' OR retry_at IS NOT NULL)",
        (LAST_ROW, LAST_GROUP),
    )
    at_end, total, groups_done, groups, live = found
    return total == expected_rows == at_end and groups_done == groups and live == 0


def snapshot(dsn: str) -> tuple[Any, ...]:
    """Everything a re-run could change."""
    return (
        rows(dsn, "SELECT job_variants_id, current_step, status FROM jobs_variants ORDER BY 1"),
        rows(dsn, "SELECT group_key, step, status FROM pgstagechain.groups ORDER BY 1"),
        rows(dsn, "SELECT id, state, retry_at, error FROM pgstagechain.runs ORDER BY id"),
    )


@pytest.fixture
def installed(pgstagechain_dsn: str) -> str:
    rerun_app.create_tables(pgstagechain_dsn)
    anyio.run(migrate, pgstagechain_dsn, pipeline)
    return pgstagechain_dsn


@pytest.fixture
def workers(installed: str) -> Iterator[Any]:
    """Start real worker processes on demand; stop them at the end."""
    started: list[subprocess.Popen[str]] = []

    def start(count: int = 1) -> None:
        for _ in range(count):
            started.append(
                subprocess.Popen(
                    [sys.executable, "-m", "pgstagechain", "--dsn", installed, "worker", APP],
                    cwd=ROOT,
                    env=dict(os.environ),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
            )

    yield start
    for process in started:
        process.send_signal(signal.SIGTERM)
    for process in started:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def later_stages(stage: str) -> tuple[list[str], list[str]]:
    at = ROW_STAGES.index(stage)
    return ROW_STAGES[:at], ROW_STAGES[at:]


@pytest.mark.slow
def test_a_middle_stage_reruns_for_100_of_1000_rows_named_by_key(
    installed: str, workers: Any
) -> None:
    dsn = installed
    workers(2)
    add_jobs(dsn, jobs=100, variants=10)
    wait_for(lambda: settled(dsn, 1000), "1,000 rows through every stage", within=600)
    # 100 rows: five variants of each of the first 20 jobs (so 20 groups are affected)
    chosen = sorted(str(j * 100 + v) for j in range(1, 21) for v in range(1, 6))
    groups = {str(j) for j in range(1, 21)}
    before = snapshot(dsn)

    preview = cli(
        dsn,
        "rerun",
        APP,
        "--stage",
        "planner",
        "--keys-file",
        "-",
        "--dry-run",
        "--json",
        stdin="\n".join(chosen),
    )
    assert preview.returncode == 0, preview.stderr
    planned = json.loads(preview.stdout)
    assert planned["dry_run"] and planned["rerun"] == 100 and planned["skipped_count"] == 0
    assert sorted(planned["keys"]) == chosen and set(planned["groups"]) == groups
    assert snapshot(dsn) == before  # the dry run changed nothing

    done = cli(dsn, "rerun", APP, "--stage", "planner", "--keys-file", "-", stdin="\n".join(chosen))
    assert done.returncode == 0, done.stderr
    assert "re-ran stage planner and the stages after it for 100 rows" in done.stdout
    assert (
        "groups: 20 taken apart, each forms again once its re-run members are back" in done.stdout
    )
    wait_for(lambda: settled(dsn, 1000), "the re-run rows through every stage", within=600)

    every = {str(j * 100 + v) for j in range(1, 101) for v in range(1, 11)}
    earlier, again = later_stages("planner")
    for stage in earlier:
        assert succeeded(dsn, stage) == Counter(dict.fromkeys(every, 1)), stage
    for stage in again:
        expected = Counter({k: 2 if k in chosen else 1 for k in every})
        assert succeeded(dsn, stage) == expected, stage
    all_groups = {str(j) for j in range(1, 101)}
    for stage in GROUP_STAGES:  # once more per affected group, not once per member
        expected = Counter({g: 2 if g in groups else 1 for g in all_groups})
        assert succeeded(dsn, stage) == expected, stage
    assert rows(dsn, "SELECT count(*) FROM pgstagechain.runs WHERE state <> 'succeeded'") == [(0,)]

    # ctx.results in the second pass held the newest results: the second planner run
    newest = dict(
        rows(
            dsn,
            "SELECT row_key, max(id)::text FROM pgstagechain.runs WHERE stage = 'planner'"
            " GROUP BY 1",
        )
    )
    seen = rows(
        dsn,
        "SELECT DISTINCT ON (row_key) row_key, earlier->>'planner' FROM rerun_seen"
        " WHERE stage = 'overlay' ORDER BY row_key, id DESC",
    )
    assert {k: v for k, v in seen} == newest
    member_views = rows(
        dsn,
        "SELECT DISTINCT ON (row_key) row_key, earlier FROM rerun_seen"
        " WHERE stage = 'ad_copy_gen_kor' ORDER BY row_key, id DESC",
    )
    for _group, members in member_views:
        for key, results in members.items():
            assert results["planner"] == int(newest[key])

    async def history() -> admin.History:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            return await admin.history(conn, pipeline, chosen[0])

    found = anyio.run(history)
    assert [r.stage for r in found.runs].count("planner") == 2  # both passes in the history
    assert [r.stage for r in found.runs].count("yolo_detect") == 1


@pytest.mark.slow
def test_a_backfill_by_since_then_by_group_and_status(installed: str, workers: Any) -> None:
    dsn = installed
    workers(2)
    add_jobs(dsn, jobs=90, variants=10)
    wait_for(lambda: settled(dsn, 900), "the first 900 rows", within=600)
    (cut,) = rows(dsn, "SELECT clock_timestamp()")[0]
    add_jobs(dsn, jobs=10, variants=10, first_job=91)
    wait_for(lambda: settled(dsn, 1000), "the last 100 rows", within=600)

    done = cli(dsn, "rerun", APP, "--stage", "overlay", "--since", cut.isoformat(), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    late = {str(j * 100 + v) for j in range(91, 101) for v in range(1, 11)}
    assert set(report["keys"]) == late and report["skipped_count"] == 0
    assert set(report["groups"]) == {str(j) for j in range(91, 101)}
    wait_for(lambda: settled(dsn, 1000), "the re-run rows", within=600)
    every = {str(j * 100 + v) for j in range(1, 101) for v in range(1, 11)}
    earlier, again = later_stages("overlay")
    for stage in earlier:
        assert set(succeeded(dsn, stage).values()) == {1}, stage
    for stage in again:
        assert succeeded(dsn, stage) == Counter({k: 2 if k in late else 1 for k in every})
    for stage in GROUP_STAGES:
        assert succeeded(dsn, stage) == Counter({str(j): 2 if j > 90 else 1 for j in range(1, 101)})

    # by group and status: a dry run counts, the real one does it
    before = snapshot(dsn)
    ocr_before = succeeded(dsn, "ocr_eval")
    preview = cli(
        dsn,
        "rerun",
        APP,
        "--stage",
        "ocr_eval",
        "--group",
        "7",
        "--group",
        "8",
        "--status",
        "done",
        "--dry-run",
    )
    assert preview.returncode == 0, preview.stderr
    assert "dry run, nothing changed: would re-run stage ocr_eval" in preview.stdout
    assert "for 20 rows" in preview.stdout
    assert snapshot(dsn) == before
    done = cli(
        dsn, "rerun", APP, "--stage", "ocr_eval", "--group", "7", "--group", "8", "--status", "done"
    )
    assert done.returncode == 0, done.stderr
    wait_for(lambda: settled(dsn, 1000), "the two groups again", within=600)
    ocr = succeeded(dsn, "ocr_eval") - ocr_before
    assert ocr == Counter({str(j * 100 + v): 1 for j in (7, 8) for v in range(1, 11)})
    assert succeeded(dsn, LAST_GROUP)["7"] == 2 and succeeded(dsn, LAST_GROUP)["6"] == 1


def live_run(dsn: str, key: str, stage: str) -> bool:
    return bool(
        rows(
            dsn,
            "SELECT 1 FROM pgstagechain.runs WHERE row_key = %s AND stage = %s"
            " AND state = 'running'",
            (key, stage),
        )
    )


async def _rerun(dsn: str, **options: Any) -> admin.RerunReport:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        return await admin.rerun(conn, pipeline, **options)


@pytest.mark.slow
def test_rows_and_groups_in_flight_are_cancelled_or_skipped(installed: str, workers: Any) -> None:
    dsn = installed
    with psycopg.connect(dsn, autocommit=True) as conn:
        # row 101 stops in vlm_judge (after planner); group 2 in its first group stage
        conn.execute("INSERT INTO hold VALUES ('101', 'vlm_judge'), ('2', 'ad_copy_gen_kor')")
    workers(1)
    add_jobs(dsn, jobs=2, variants=3)
    wait_for(lambda: live_run(dsn, "101", "vlm_judge"), "row 101 in vlm_judge")
    wait_for(lambda: live_run(dsn, "2", "ad_copy_gen_kor"), "group 2 in ad_copy_gen_kor")

    before = snapshot(dsn)
    preview = anyio.run(lambda: _rerun(dsn, stage="planner", keys=["101", "201"], dry_run=True))
    assert preview.keys == ("101", "201") and preview.in_flight == ("101",)
    assert preview.runs_cancelled == 2  # 101's vlm_judge, group 2's ad_copy_gen_kor
    assert preview.groups == ("1", "2") and preview.groups_stopped == ("2",)
    assert snapshot(dsn) == before

    skipped = cli(dsn, "rerun", APP, "--stage", "planner", "--keys", "101", "--skip-in-flight")
    assert skipped.returncode == 1
    assert "skipped, in flight at the stage or after it" in skipped.stdout
    assert "nothing to re-run" in skipped.stderr
    assert snapshot(dsn) == before

    with psycopg.connect(dsn, autocommit=True) as conn:  # 201's second pass waits in overlay
        conn.execute("INSERT INTO hold VALUES ('201', 'overlay')")
    done = cli(dsn, "rerun", APP, "--stage", "planner", "--keys", "101,201")
    assert done.returncode == 0, done.stderr
    assert "in flight, cancelled first: 1 row: 101" in done.stdout
    assert "runs cancelled (rows and groups): 2 running, 0 pending retries" in done.stdout
    assert "1 of them had a group stage at work or about to start, stopped: 2" in done.stdout
    (cancelled_row,) = rows(
        dsn,
        "SELECT id, error FROM pgstagechain.runs WHERE row_key = '101' AND stage = 'vlm_judge'"
        " AND state = 'cancelled'",
    )
    assert cancelled_row[1] == "cancelled: re-run from stage planner by operator"
    # group 2 is taken apart while its member is away, and does not form without it
    wait_for(lambda: live_run(dsn, "201", "overlay"), "row 201 in its second overlay")
    assert rows(dsn, "SELECT count(*) FROM pgstagechain.groups WHERE group_key = '2'") == [(0,)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM hold")
    wait_for(lambda: settled(dsn, 6), "everything through, once released", within=300)

    assert states(dsn, "101", "vlm_judge") == ["cancelled", "succeeded"]
    # the cancelled run's writes on ctx.conn were rolled back with its refused completion
    assert rows(dsn, "SELECT count(*) FROM rerun_seen WHERE run_id = %s", (cancelled_row[0],)) == [
        (0,)
    ]
    assert states(dsn, "2", "ad_copy_gen_kor") == ["cancelled", "succeeded"]
    assert states(dsn, "2", "instagram_feed_gen") == ["succeeded"]
    assert states(dsn, "1", "ad_copy_gen_kor") == ["succeeded"]  # formed once, after 101
    assert states(dsn, "201", "planner") == ["succeeded", "succeeded"]
    assert states(dsn, "202", "planner") == ["succeeded"]


def run_until_idle(dsn: str) -> None:
    """A worker in this process until nothing is left to do (in a thread of its own: the
    browser's API runs an event loop in this one)."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(anyio.run, Worker(pipeline, dsn, scan_interval=0.5).run_until_idle).result()


def test_group_stages_the_first_stage_and_rows_that_never_reached_the_stage(
    installed: str,
) -> None:
    dsn = installed
    add_jobs(dsn, jobs=2, variants=2)
    add_jobs(dsn, jobs=1, variants=2, first_job=3, release=False)  # never released
    run_until_idle(dsn)
    assert settled(dsn, 6) is False  # job 3 sits at (img_gen, running)

    # the last group stage, for one group: the group goes back one group stage
    report = anyio.run(lambda: _rerun(dsn, stage=LAST_GROUP, groups=["1"]))
    assert report.group and report.keys == ("1",) and report.after == GROUP_STAGES[0]
    run_until_idle(dsn)
    assert succeeded(dsn, LAST_GROUP) == Counter({"1": 2, "2": 1})
    assert succeeded(dsn, GROUP_STAGES[0]) == Counter({"1": 1, "2": 1})
    assert set(succeeded(dsn, LAST_ROW).values()) == {1}  # no member ran again

    # the first group stage, by group key: back to (last row stage, done), both run again
    report = anyio.run(lambda: _rerun(dsn, stage=GROUP_STAGES[0], keys=["2", "9"]))
    assert report.keys == ("2",) and report.after == LAST_ROW
    assert report.skipped == {"not_found": ("9",)}  # group 9 never formed
    run_until_idle(dsn)
    assert succeeded(dsn, GROUP_STAGES[0]) == Counter({"1": 1, "2": 2})
    assert succeeded(dsn, LAST_GROUP) == Counter({"1": 2, "2": 2})

    # the first stage: back to the start step; every stage runs again, the group once
    report = anyio.run(lambda: _rerun(dsn, stage=ROW_STAGES[0], keys=["101", "102", "301", "999"]))
    assert report.keys == ("101", "102") and report.after == "img_gen"
    assert report.skipped == {"not_reached": ("301",), "not_found": ("999",)}
    run_until_idle(dsn)
    for stage in ROW_STAGES:
        assert succeeded(dsn, stage) == Counter({"101": 2, "102": 2, "201": 1, "202": 1})
    assert succeeded(dsn, GROUP_STAGES[0]) == Counter({"1": 2, "2": 2})
    assert succeeded(dsn, LAST_GROUP) == Counter({"1": 3, "2": 2})
    assert (
        rows(dsn, "SELECT current_step, status FROM jobs_variants WHERE job_id = 3")
        == [("img_gen", "running")] * 2
    )

    # a failed row: re-run from a stage before the one it failed at
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE jobs_variants SET img_asset_id = 'bad' WHERE job_variants_id = 201")
    anyio.run(lambda: _rerun(dsn, stage="planner", keys=["201"]))
    run_until_idle(dsn)
    assert rows(dsn, "SELECT current_step, status FROM jobs_variants WHERE job_variants_id = 201")[
        0
    ] == ("overlay", "failed")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE jobs_variants SET img_asset_id = 'fixed' WHERE job_variants_id = 201")
    report = anyio.run(lambda: _rerun(dsn, stage="planner", status="failed"))
    assert report.keys == ("201",)
    run_until_idle(dsn)
    assert states(dsn, "201", "overlay") == ["succeeded", "failed", "succeeded"]


def test_bad_input_gets_a_clear_error_and_exit_status(installed: str) -> None:
    dsn = installed
    add_jobs(dsn, jobs=1, variants=2)
    run_until_idle(dsn)
    before = snapshot(dsn)
    cases = [
        (["--stage", "nope", "--all"], 2, "pipeline 'feedly' has no stage 'nope'"),
        (["--stage", "planner"], 2, "name the rows to re-run"),
        (["--stage", "planner", "--keys", " , "], 2, "--keys / --keys-file name no key"),
        (["--stage", "planner", "--all", "--keys", "101"], 2, "all_rows re-runs every row"),
        (["--stage", "planner", "--status", "bogus"], 2, "status 'bogus' is not one of"),
        (["--stage", "planner", "--keys", "101,abc"], 2, "'abc' is not a valid bigint"),
        (["--stage", "planner", "--since", "yesterday"], 2, "neither an ISO 8601 time"),
        (["--stage", "planner", "--since", "2h", "--until", "3h"], 2, "is not before until"),
        (["--stage", "planner", "--keys-file", "/no/such/file"], 2, "cannot read --keys-file"),
        (["--stage", "planner", "--keys", "999"], 1, "nothing to re-run"),
        (["--stage", "planner", "--group", "5"], 1, "nothing to re-run"),
    ]
    for options, status, message in cases:
        found = cli(dsn, "rerun", APP, *options)
        assert found.returncode == status, (options, found.stdout, found.stderr)
        assert message in found.stderr, (options, found.stderr)
    unknown = cli(dsn, "rerun", "tests.apps.rerun_app:nope", "--stage", "planner", "--all")
    assert unknown.returncode == 2 and "has no attribute 'nope'" in unknown.stderr
    missing = cli(dsn, "rerun", "tests.apps.no_such_app:pipeline", "--stage", "planner", "--all")
    assert missing.returncode == 2 and "cannot import" in missing.stderr
    with pytest.raises(ConfigurationError, match="the key list is empty"):
        anyio.run(lambda: _rerun(dsn, stage="planner", keys=[]))
    with pytest.raises(ConfigurationError, match="needs a time zone"):
        anyio.run(lambda: _rerun(dsn, stage="planner", since=dt.datetime(2020, 1, 1)))
    assert snapshot(dsn) == before


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
def test_the_dashboard_previews_a_rerun_then_does_it_on_confirmation(
    installed: str, browser: Any
) -> None:
    dsn = installed
    add_jobs(dsn, jobs=2, variants=3)
    run_until_idle(dsn)
    before = snapshot(dsn)
    app = dashboard_app(pipeline, dsn, writes=True, token=TOKEN, cache_seconds=0)
    with uvicorn_serving(app) as (url, _):
        page, errors = open_page(browser, f"{url}/#token={TOKEN}")
        button = page.wait_for_selector('#stages tr[data-stage="overlay"] [data-action="rerun"]')
        button.click()
        assert page.text_content("#rerun-stage") == "overlay"
        assert page.is_disabled("#rerun-confirm")
        page.select_option("#rerun-which", "keys")
        page.fill("#rerun-keys", "101, 102, 999")
        page.click("#rerun-preview")
        shown = page.wait_for_selector('#rerun-result .rerun-count[data-dry-run="true"]')
        assert shown.get_attribute("data-count") == "2"
        assert "would re-run stage overlay" in (shown.text_content() or "")
        skipped = page.text_content('#rerun-result [data-reason="not_found"]') or ""
        assert "skipped 1" in skipped and "999" in skipped
        assert page.text_content("#rerun-confirm") == "Re-run 2 rows"
        assert snapshot(dsn) == before  # the preview changed nothing

        # changing the selection asks for a new preview
        page.fill("#rerun-keys", "101")
        assert page.is_disabled("#rerun-confirm")
        page.fill("#rerun-keys", "101,102")
        page.click("#rerun-preview")
        page.wait_for_selector('#rerun-result .rerun-count[data-dry-run="true"][data-count="2"]')
        page.click("#rerun-confirm")
        page.wait_for_selector('#rerun-result .rerun-count[data-dry-run="false"][data-count="2"]')
        assert (
            rows(
                dsn,
                "SELECT current_step, status FROM jobs_variants WHERE job_variants_id IN (101, 102)",
            )
            == [("planner", "done")] * 2
        )

        # the same protection as retry and cancel
        body = {"stage": "overlay", "keys": ["201"], "dry_run": False}
        good = {WRITE_HEADER: "1", "Authorization": f"Bearer {TOKEN}"}
        assert httpx.get(f"{url}/api/rerun").status_code == 405
        assert (
            httpx.post(f"{url}/api/rerun", json=body, headers={WRITE_HEADER: "1"}).status_code
            == 401
        )
        assert (
            httpx.post(
                f"{url}/api/rerun", json=body, headers={"Authorization": good["Authorization"]}
            ).status_code
            == 403
        )
        assert (
            httpx.post(
                f"{url}/api/rerun", json=body, headers={**good, "Origin": "http://evil.example"}
            ).status_code
            == 403
        )
        bad = httpx.post(f"{url}/api/rerun", json={**body, "stage": "nope"}, headers=good)
        assert bad.status_code == 400 and "has no stage 'nope'" in bad.json()["error"]
        assert errors == []
    read_only = dashboard_app(pipeline, dsn, cache_seconds=0)
    with uvicorn_serving(read_only) as (url, _):
        refused = httpx.post(f"{url}/api/rerun", json=body, headers=good)
        assert refused.status_code == 403
    assert rows(dsn, "SELECT current_step FROM jobs_variants WHERE job_variants_id = 201") == [
        (LAST_ROW,)
    ]
    run_until_idle(dsn)
    assert succeeded(dsn, "overlay") == Counter(
        {"101": 2, "102": 2, "103": 1, "201": 1, "202": 1, "203": 1}
    )


def test_rows_a_worker_holds_are_tried_again_then_reported_busy(
    installed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgstagechain import _rerun as rerun_module

    dsn = installed
    add_jobs(dsn, jobs=2, variants=2)
    run_until_idle(dsn)
    monkeypatch.setattr(rerun_module, "PASSES", 3)
    with psycopg.connect(dsn) as holder:
        # a worker's transaction holds row 101; another member is forming group 2
        holder.execute("SELECT 1 FROM jobs_variants WHERE job_variants_id = 101 FOR UPDATE")
        holder.execute("SELECT pg_advisory_xact_lock(hashtextextended('feedly:2', 0))")
        report = anyio.run(lambda: _rerun(dsn, stage="planner", keys=["101", "102", "201"]))
        assert report.keys == ("102",)
        assert report.skipped == {"busy": ("101", "201")}
        holder.rollback()
    report = anyio.run(lambda: _rerun(dsn, stage="planner", keys=["101", "201"]))
    assert report.keys == ("101", "201") and report.skipped == {}
    run_until_idle(dsn)
    assert succeeded(dsn, "planner") == Counter({"101": 2, "102": 2, "201": 2, "202": 1})
    assert succeeded(dsn, LAST_GROUP) == Counter({"1": 2, "2": 2})


@pytest.mark.slow
def test_reruns_while_the_pipeline_is_busy_leave_every_row_and_group_consistent(
    installed: str, workers: Any
) -> None:
    dsn = installed
    workers(2)
    add_jobs(dsn, jobs=50, variants=10)
    picks = random.Random(14)
    reports = []

    def runs_done() -> int:
        return int(rows(dsn, "SELECT count(*) FROM pgstagechain.runs")[0][0])

    plan = ["overlay", "vlm_analyze", "iou_eval", "planner", GROUP_STAGES[0], "yolo_detect"]
    plan += [LAST_GROUP, "ocr_eval", GROUP_STAGES[0]]
    for n, stage in enumerate(plan):
        # each re-run while workers are busy: a few hundred more runs since the last one
        floor = runs_done() + 300
        wait_for(
            lambda: runs_done() >= floor or settled(dsn, 500),  # noqa: B023
            "the workers to get on",
        )
        options: dict[str, Any] = {}
        if stage in GROUP_STAGES:
            formed = wait_for(
                lambda: [g for (g,) in rows(dsn, "SELECT group_key FROM pgstagechain.groups")],
                "some groups to form",
            )
            options["keys"] = picks.sample(formed, min(5, len(formed)))
        elif n == 1:
            options["status"] = "running"  # every row in flight anywhere: cancel and re-run
        else:
            options["keys"] = [
                str(j * 100 + v) for j in picks.sample(range(1, 51), 8) for v in (1, 2, 3)
            ]
        reports.append(anyio.run(functools.partial(_rerun, dsn, stage=stage, **options)))
    assert sum(len(r.keys) for r in reports) > 0
    print(
        [
            (
                r.stage,
                len(r.keys),
                len(r.in_flight),
                r.runs_cancelled,
                r.retries_dropped,
                {k: len(v) for k, v in r.skipped.items()},
                len(r.groups_stopped),
            )
            for r in reports
        ]
    )
    wait_for(lambda: settled(dsn, 500), "every row and group through, re-runs included", within=600)

    # the last pass of every row ran its stages in chain order, on each other's results
    latest = {
        (key, stage): run_id
        for key, stage, run_id in rows(
            dsn,
            "SELECT row_key, stage, max(id) FROM pgstagechain.runs WHERE state = 'succeeded'"
            " GROUP BY 1, 2",
        )
    }
    keys = {k for k, s in latest if s == LAST_ROW}
    assert len(keys) == 500
    for key in keys:
        ids = [latest[(key, s)] for s in ROW_STAGES]
        assert ids == sorted(ids), key
    # each group's last formation came after its last member was back, on the members'
    # newest results; its group stages ran exactly once since then (more for the groups a
    # re-run of a group stage named)
    named = {g for r in reports if r.group for g in r.keys}
    members: dict[str, list[str]] = {}
    for key, job in rows(dsn, "SELECT job_variants_id::text, job_id::text FROM jobs_variants"):
        members.setdefault(job, []).append(key)
    assert len(members) - len(named) >= 25
    for group, keys_of in members.items():
        last_member = max(latest[(k, LAST_ROW)] for k in keys_of)
        since = dict(
            rows(
                dsn,
                "SELECT stage, count(*) FROM pgstagechain.runs WHERE row_key = %s"
                " AND stage = ANY(%s) AND state = 'succeeded' AND id > %s GROUP BY 1",
                (group, GROUP_STAGES, last_member),
            )
        )
        if group in named:
            assert set(since) == set(GROUP_STAGES), group
        else:
            assert since == dict.fromkeys(GROUP_STAGES, 1), group
        assert latest[(group, LAST_GROUP)] > latest[(group, GROUP_STAGES[0])] > last_member
        (seen,) = rows(
            dsn,
            "SELECT earlier FROM rerun_seen WHERE row_key = %s AND stage = %s"
            " ORDER BY id DESC LIMIT 1",
            (group, GROUP_STAGES[0]),
        )[0]
        assert {k: v[LAST_ROW] for k, v in seen.items()} == {
            k: latest[(k, LAST_ROW)] for k in keys_of
        }
    assert rows(dsn, "SELECT count(*) FROM pgstagechain.runs WHERE state = 'running'") == [(0,)]


def test_a_pipeline_keyed_by_text_without_groups(pgstagechain_dsn: str) -> None:
    from tests.apps import hostile_app

    dsn = pgstagechain_dsn
    hostile_app.create_table(dsn)
    notes = hostile_app.pipeline
    anyio.run(migrate, dsn, notes)
    names = ["<script>x</script>", "it's", "a,b", " spaced ", "plain"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in names:
            conn.execute("INSERT INTO notes (name) VALUES (%s)", (name,))

    def drain() -> None:
        with ThreadPoolExecutor(1) as pool:
            pool.submit(anyio.run, Worker(notes, dsn, scan_interval=0.5).run_until_idle).result()

    async def rerun(**options: Any) -> admin.RerunReport:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            return await admin.rerun(conn, notes, stage="read_note", **options)

    drain()
    report = anyio.run(functools.partial(rerun, keys=names[:3], dry_run=True))
    assert sorted(report.keys) == sorted(names[:3]) and report.groups == ()
    report = anyio.run(functools.partial(rerun, status="failed", batch_size=2))
    assert sorted(report.keys) == sorted(names)  # three pages of two
    drain()
    assert succeeded(dsn, "read_note") == Counter()  # it fails every time
    failed = Counter(dict(rows(dsn, "SELECT row_key, count(*) FROM pgstagechain.runs GROUP BY 1")))
    assert failed == Counter(dict.fromkeys(names, 2))
    with pytest.raises(ConfigurationError, match="has no group column"):
        anyio.run(functools.partial(rerun, groups=["1"]))


def test_status_names_of_a_pipeline_with_its_own_statuses(pgstagechain_dsn: str) -> None:
    from pgstagechain import Pipeline, Statuses

    dsn = pgstagechain_dsn
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE items (id int PRIMARY KEY, batch int NOT NULL,"
            " step text NOT NULL DEFAULT 'new', state text NOT NULL DEFAULT 'ok')"
        )
    items = Pipeline(
        "items",
        table="items",
        start="new",
        step_column="step",
        status_column="state",
        group_column="batch",
        statuses=Statuses(done="ok", running="busy", failed="bad"),
    )

    @items.stage(after="new")
    async def check(ctx: Any) -> None:
        return None

    @items.stage(after="check", group=True)
    async def bundle(ctx: Any) -> None:
        return None

    anyio.run(migrate, dsn, items)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO items (id, batch) SELECT i, i % 2 FROM generate_series(1, 4) i")

    def drain() -> None:
        with ThreadPoolExecutor(1) as pool:
            pool.submit(anyio.run, Worker(items, dsn, scan_interval=0.5).run_until_idle).result()

    async def rerun(**options: Any) -> admin.RerunReport:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            return await admin.rerun(conn, items, **options)

    drain()
    report = anyio.run(functools.partial(rerun, stage="bundle", status="ok"))
    assert sorted(report.keys) == ["0", "1"]  # the groups' own "done", asked for as "ok"
    report = anyio.run(functools.partial(rerun, stage="check", status="ok", keys=[1]))
    # group 1 waits for its bundle again: taken apart, it forms once, when row 1 is back
    assert report.keys == ("1",) and report.groups == ("1",) and report.groups_stopped == ("1",)
    drain()
    assert succeeded(dsn, "check") == Counter({"1": 2, "2": 1, "3": 1, "4": 1})
    assert succeeded(dsn, "bundle") == Counter({"0": 2, "1": 2})
    with pytest.raises(ConfigurationError, match="status 'done' is not one of busy, ok, bad"):
        anyio.run(functools.partial(rerun, stage="check", status="done"))


def test_a_rerun_stage_that_now_returns_none_replaces_its_first_result(
    pgstagechain_dsn: str,
) -> None:
    """Later stages see the newest pass: a stage whose re-run returns None no longer
    hands on what its first run returned (its first run stays in the history)."""
    from tests.apps import second_pass_app

    dsn = pgstagechain_dsn
    second_pass_app.create_tables(dsn)
    photos = second_pass_app.pipeline
    anyio.run(migrate, dsn, photos)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO found SELECT i, i FROM generate_series(1, 4) i")
        conn.execute("INSERT INTO photos (id) SELECT generate_series(1, 4)")

    def drain() -> None:
        with ThreadPoolExecutor(1) as pool:
            pool.submit(anyio.run, Worker(photos, dsn, scan_interval=0.5).run_until_idle).result()

    def given() -> dict[int, dict[str, Any]]:
        found = rows(
            dsn, "SELECT DISTINCT ON (photo) photo, results FROM described ORDER BY photo, id DESC"
        )
        return {photo: results for photo, results in found}

    drain()
    assert given() == {i: {"detect": {"boxes": i}} for i in range(1, 5)}
    # the detector changed: photos 1 and 2 have nothing now, 3 has another count
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE found SET boxes = NULL WHERE id <= 2")
        conn.execute("UPDATE found SET boxes = 30 WHERE id = 3")

    async def rerun() -> admin.RerunReport:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            return await admin.rerun(conn, photos, stage="detect", keys=["1", "2", "3"])

    assert sorted(anyio.run(rerun).keys) == ["1", "2", "3"]
    drain()
    assert given() == {
        1: {},  # as on a first pass that returned None
        2: {},
        3: {"detect": {"boxes": 30}},
        4: {"detect": {"boxes": 4}},  # not re-run
    }
    # both passes stay in the history
    counts = dict(
        rows(
            dsn,
            "SELECT row_key, count(*) FROM pgstagechain.runs"
            " WHERE stage = 'detect' AND state = 'succeeded' GROUP BY 1",
        )
    )
    assert counts == {"1": 2, "2": 2, "3": 2, "4": 1}

    async def detect_runs(key: str) -> list[admin.RunRecord]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            found = await admin.history(conn, photos, key)
        return [run for run in found.runs if run.stage == "detect"]

    first, second = anyio.run(detect_runs, "1")
    assert first.result == {"boxes": 1} and first.superseded_at is not None
    assert second.result is None and second.superseded_at is None
    (only,) = anyio.run(detect_runs, "4")
    assert only.superseded_at is None
    shown = cli(dsn, "inspect", "tests.apps.second_pass_app:pipeline", "1")
    assert shown.returncode == 0, shown.stderr
    assert "superseded by a re-run" in shown.stdout
