"""The ``pgstagechain`` command, run as a subprocess against a real database."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgstagechain import LeaseLostError, Worker, claim, complete, fail, migrate
from tests.apps.cli_app import pipeline
from tests.apps.seed import GROUP_STAGES, ROW_STAGES, add_jobs, create_tables

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.apps.cli_app:pipeline"


def cli(dsn: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PGSTAGECHAIN_DSN"}
    return subprocess.run(
        [sys.executable, "-m", "pgstagechain", "--dsn", dsn, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def position(dsn: str, key: int) -> tuple[str, str]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT current_step, status FROM jobs_variants WHERE job_variants_id = %s", (key,)
        ).fetchone()
    assert row is not None
    return row[0], row[1]


def group_position(dsn: str, group: str) -> tuple[str, str] | None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT step, status FROM pgstagechain.groups WHERE pipeline = %s AND group_key = %s",
            (pipeline.name, group),
        ).fetchone()
    return (row[0], row[1]) if row else None


async def run_chain(dsn: str, bad: tuple[int, ...] = ()) -> None:
    """Three jobs of two variants; the ``bad`` variants fail at overlay for good."""
    create_tables(dsn)
    await migrate(dsn, pipeline)
    add_jobs(dsn, jobs=3, variants=2, release=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for key in bad:
            conn.execute(
                "UPDATE jobs_variants SET img_asset_id = 'bad-' || job_variants_id"
                " WHERE job_variants_id = %s",
                (key,),
            )
        conn.execute("UPDATE jobs_variants SET status = 'done'")
    await Worker(pipeline, dsn, scan_interval=1).run_until_idle()


def by_stage(output: str) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in json.loads(output)["stages"]}


async def test_status_reports_every_stage_in_chain_order(pgstagechain_dsn: str) -> None:
    await run_chain(pgstagechain_dsn, bad=(101,))
    done = cli(pgstagechain_dsn, "status", APP, "--json")
    assert done.returncode == 0, done.stderr
    found = by_stage(done.stdout)
    assert list(found) == ROW_STAGES + GROUP_STAGES
    assert found["vlm_analyze"]["done"] == 6
    assert found["vlm_analyze"]["runs"]["succeeded"] == 6
    assert found["vlm_analyze"]["runs"]["p50_seconds"] is not None
    assert found["overlay"]["failed"] == 1
    assert found["overlay"]["done"] == 5
    assert found["iou_eval"]["done"] == 5
    # job 1 cannot fan in (one variant failed); jobs 2 and 3 went all the way
    assert found["ad_copy_gen_kor"]["waiting"] == 0
    assert found["ad_copy_gen_kor"]["done"] == 2
    assert found["instagram_feed_gen"]["done"] == 2
    assert found["instagram_feed_gen"]["level"] == "group"

    table = cli(pgstagechain_dsn, "status", APP)
    assert table.returncode == 0, table.stderr
    for name in ROW_STAGES + GROUP_STAGES:
        assert name in table.stdout
    assert "oldest waiting" in table.stdout


async def test_status_counts_waiting_rows_and_their_age(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=2, variants=2)
    found = by_stage(cli(pgstagechain_dsn, "status", APP, "--json").stdout)
    assert found["vlm_analyze"]["waiting"] == 4
    assert found["vlm_analyze"]["oldest_waiting_seconds"] is None  # set from outside: no trace
    assert found["yolo_detect"]["waiting"] == 0
    # one row through vlm_analyze by hand: it now waits for yolo_detect, with an age
    async with await psycopg.AsyncConnection.connect(pgstagechain_dsn, autocommit=True) as conn:
        got = await claim(conn, pipeline, "vlm_analyze", 101)
        assert got is not None
        await complete(conn, pipeline, got, {"ok": True})
    found = by_stage(cli(pgstagechain_dsn, "status", APP, "--json").stdout)
    assert found["vlm_analyze"]["waiting"] == 3
    assert found["vlm_analyze"]["done"] == 1
    assert found["yolo_detect"]["waiting"] == 1
    assert found["yolo_detect"]["oldest_waiting_seconds"] is not None
    assert found["yolo_detect"]["oldest_waiting_seconds"] >= 0


def test_status_watch_refreshes_until_interrupted(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    anyio.run(migrate, pgstagechain_dsn, pipeline)
    env = {k: v for k, v in os.environ.items() if k != "PGSTAGECHAIN_DSN"}
    with subprocess.Popen(
        [
            *(sys.executable, "-m", "pgstagechain", "--dsn", pgstagechain_dsn, "status", APP),
            *("--watch", "--interval", "0.2"),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            seen: list[str] = []
            tables = 0
            deadline = time.monotonic() + 60
            while tables < 2 and time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    break
                seen.append(line)
                tables += "instagram_feed_gen" in line
            assert tables >= 2, "".join(seen)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


async def test_inspect_shows_history_errors_and_group(pgstagechain_dsn: str) -> None:
    await run_chain(pgstagechain_dsn, bad=(101,))
    shown = cli(pgstagechain_dsn, "inspect", APP, "101")
    assert shown.returncode == 0, shown.stderr
    assert "(overlay, failed)" in shown.stdout
    assert "cannot overlay bad-101: unreadable image" in shown.stdout
    assert "PermanentError" in shown.stdout  # the full traceback follows the table

    as_json = json.loads(cli(pgstagechain_dsn, "inspect", APP, "101", "--json").stdout)
    assert [r["stage"] for r in as_json["runs"]] == ROW_STAGES[:4]
    assert [r["state"] for r in as_json["runs"]] == ["succeeded"] * 3 + ["failed"]
    assert as_json["runs"][0]["result"] == {"stage": "vlm_analyze", "key": "101"}
    assert as_json["group_key"] == "1"
    assert as_json["group_step"] is None  # job 1 never fanned in

    member = json.loads(cli(pgstagechain_dsn, "inspect", APP, "201", "--json").stdout)
    assert member["group_step"] == "instagram_feed_gen"
    assert [r["stage"] for r in member["group_runs"]] == GROUP_STAGES

    group = cli(pgstagechain_dsn, "inspect", APP, "2", "--group")
    assert group.returncode == 0, group.stderr
    assert "group 2 of pipeline feedly: (instagram_feed_gen, done)" in group.stdout
    assert "ad_copy_gen_kor" in group.stdout


async def test_status_and_inspect_show_a_group_stalled_by_a_failed_member(
    pgstagechain_dsn: str,
) -> None:
    await run_chain(pgstagechain_dsn, bad=(101,))
    status = cli(pgstagechain_dsn, "status", APP)
    assert status.returncode == 0, status.stderr
    assert "1 stalled" in status.stdout
    assert "groups with members failed for good" in status.stdout
    as_json = by_stage(cli(pgstagechain_dsn, "status", APP, "--json").stdout)
    assert as_json["ad_copy_gen_kor"]["stalled"] == 1
    assert as_json["instagram_feed_gen"]["stalled"] == 0

    group = cli(pgstagechain_dsn, "inspect", APP, "1", "--group")
    assert group.returncode == 0, group.stderr
    assert "group 1 of pipeline feedly: (no position)" in group.stdout
    assert "group 1 is stalled: 1 of" in group.stdout
    assert "101 at overlay (" in group.stdout and "unreadable image" in group.stdout
    member = json.loads(cli(pgstagechain_dsn, "inspect", APP, "102", "--json").stdout)
    assert member["issue"]["state"] == "stalled"
    assert member["issue"]["failed_members"]["101"]["stage"] == "overlay"


async def test_inspect_names_a_missing_or_malformed_key(pgstagechain_dsn: str) -> None:
    await run_chain(pgstagechain_dsn)
    missing = cli(pgstagechain_dsn, "inspect", APP, "999")
    assert missing.returncode == 2
    assert "no row with job_variants_id = '999'" in missing.stderr
    malformed = cli(pgstagechain_dsn, "inspect", APP, "abc")
    assert malformed.returncode == 2
    assert "'abc' is not a valid bigint for key column public.jobs_variants.job_variants_id" in (
        malformed.stderr
    )
    no_group = cli(pgstagechain_dsn, "inspect", APP, "77", "--group")
    assert no_group.returncode == 2
    assert "has no group '77'" in no_group.stderr


async def test_retry_one_row_runs_its_failed_stage_again(pgstagechain_dsn: str) -> None:
    await run_chain(pgstagechain_dsn, bad=(101,))
    assert position(pgstagechain_dsn, 101) == ("overlay", "failed")
    with psycopg.connect(pgstagechain_dsn, autocommit=True) as conn:
        conn.execute("UPDATE jobs_variants SET img_asset_id = 'fixed' WHERE job_variants_id = 101")

    done = cli(pgstagechain_dsn, "retry", APP, "--key", "101")
    assert done.returncode == 0, done.stderr
    assert "retrying 1 row(s) of pipeline feedly: 101" in done.stdout
    assert position(pgstagechain_dsn, 101) == ("planner", "done")

    await Worker(pipeline, pgstagechain_dsn, scan_interval=1).run_until_idle()
    assert position(pgstagechain_dsn, 101) == ("iou_eval", "done")
    assert group_position(pgstagechain_dsn, "1") == ("instagram_feed_gen", "done")

    again = cli(pgstagechain_dsn, "retry", APP, "--key", "101")
    assert again.returncode == 1
    assert "row 101 is at (iou_eval, done), not failed" in again.stderr


async def test_retry_every_failed_row_of_a_stage(pgstagechain_dsn: str) -> None:
    await run_chain(pgstagechain_dsn, bad=(101, 202))
    refused = cli(pgstagechain_dsn, "retry", APP, "--stage", "overlay")
    assert refused.returncode != 0
    assert "--all-failed" in refused.stderr

    done = cli(pgstagechain_dsn, "retry", APP, "--stage", "overlay", "--all-failed")
    assert done.returncode == 0, done.stderr
    assert "retrying 2 row(s) of pipeline feedly: 101, 202" in done.stdout
    assert position(pgstagechain_dsn, 101) == ("planner", "done")
    assert position(pgstagechain_dsn, 202) == ("planner", "done")
    assert position(pgstagechain_dsn, 102) == ("iou_eval", "done")  # untouched

    none_left = cli(pgstagechain_dsn, "retry", APP, "--stage", "vlm_judge", "--all-failed")
    assert none_left.returncode == 0
    assert "no failed row(s) at stage vlm_judge" in none_left.stdout


async def test_cancel_running_run_rejects_the_late_completion(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=2)
    async with await psycopg.AsyncConnection.connect(pgstagechain_dsn, autocommit=True) as conn:
        running = await claim(conn, pipeline, "vlm_analyze", 101)
        assert running is not None

        done = cli(pgstagechain_dsn, "cancel", APP, "--key", "101")
        assert done.returncode == 0, done.stderr
        assert "cancelled 1 of pipeline feedly: 101 (1 running run(s) closed" in done.stdout
        assert position(pgstagechain_dsn, 101) == ("vlm_analyze", "failed")

        with pytest.raises(LeaseLostError):
            async with conn.transaction():
                await complete(conn, pipeline, running, {"late": True})
        assert position(pgstagechain_dsn, 101) == ("vlm_analyze", "failed")
        cur = await conn.execute(
            "SELECT state, error FROM pgstagechain.runs WHERE id = %s", (running.run_id,)
        )
        assert await cur.fetchone() == ("cancelled", "cancelled by operator")

    nothing = cli(pgstagechain_dsn, "cancel", APP, "--key", "102")
    assert nothing.returncode == 1
    assert "row 102 is at (img_gen, done), not in progress" in nothing.stderr


async def test_cancel_drops_a_pending_retry(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=2)
    async with await psycopg.AsyncConnection.connect(pgstagechain_dsn, autocommit=True) as conn:
        first = await claim(conn, pipeline, "vlm_analyze", 101)
        assert first is not None
        assert await fail(conn, pipeline, first, "model server busy", retry_in=600)
    assert position(pgstagechain_dsn, 101) == ("vlm_analyze", "running")

    done = cli(pgstagechain_dsn, "cancel", APP, "--stage", "vlm_analyze")
    assert done.returncode == 0, done.stderr
    assert "0 running run(s) closed, 1 pending retry dropped" in done.stdout
    assert position(pgstagechain_dsn, 101) == ("vlm_analyze", "failed")
    with psycopg.connect(pgstagechain_dsn) as conn:
        row = conn.execute(
            "SELECT state, retry_at, error FROM pgstagechain.runs WHERE id = %s", (first.run_id,)
        ).fetchone()
    assert row == ("failed", None, "model server busy\ncancelled by operator")

    # and the operator changes their mind: retry puts it back at (img_gen, done)
    back = cli(pgstagechain_dsn, "retry", APP, "--stage", "vlm_analyze", "--all-failed")
    assert back.returncode == 0, back.stderr
    assert position(pgstagechain_dsn, 101) == ("img_gen", "done")


async def test_cancel_and_retry_a_group(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=2)
    await Worker(pipeline, pgstagechain_dsn, stages=ROW_STAGES, scan_interval=1).run_until_idle()
    assert group_position(pgstagechain_dsn, "1") == ("iou_eval", "done")
    async with await psycopg.AsyncConnection.connect(pgstagechain_dsn, autocommit=True) as conn:
        assert await claim(conn, pipeline, "ad_copy_gen_kor", "1") is not None

    done = cli(pgstagechain_dsn, "cancel", APP, "--group", "1")
    assert done.returncode == 0, done.stderr
    assert group_position(pgstagechain_dsn, "1") == ("ad_copy_gen_kor", "failed")

    back = cli(pgstagechain_dsn, "retry", APP, "--group", "1")
    assert back.returncode == 0, back.stderr
    assert "retrying 1 group(s) of pipeline feedly: 1" in back.stdout
    assert group_position(pgstagechain_dsn, "1") == ("iou_eval", "done")

    await Worker(pipeline, pgstagechain_dsn, scan_interval=1).run_until_idle()
    assert group_position(pgstagechain_dsn, "1") == ("instagram_feed_gen", "done")


async def test_errors_name_the_problem_and_never_the_password(pgstagechain_dsn: str) -> None:
    missing_module = cli(pgstagechain_dsn, "status", "tests.no_such_app:pipeline")
    assert missing_module.returncode != 0
    assert "cannot import 'tests.no_such_app'" in missing_module.stderr

    unknown_stage = cli(pgstagechain_dsn, "retry", APP, "--stage", "nope", "--all-failed")
    assert unknown_stage.returncode == 2
    assert "has no stage 'nope'" in unknown_stage.stderr

    # the schema is there but this pipeline was never migrated
    create_tables(pgstagechain_dsn)
    not_installed = cli(pgstagechain_dsn, "retry", APP, "--key", "1")
    assert not_installed.returncode == 2
    assert "pipeline 'feedly' is not installed" in not_installed.stderr

    secret = "s3cret-Pa55word"
    unreachable = make_conninfo(
        pgstagechain_dsn, host="127.0.0.1", port="1", password=secret, connect_timeout="3"
    )
    refused = cli(unreachable, "status", APP)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error:")
    assert "port=1" in refused.stderr
    assert secret not in refused.stderr + refused.stdout


def bare_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The command with no --dsn and no PGSTAGECHAIN_DSN, plus ``env``."""
    clean = {k: v for k, v in os.environ.items() if k != "PGSTAGECHAIN_DSN" and k[:2] != "PG"}
    return subprocess.run(
        [sys.executable, "-m", "pgstagechain", *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("tests.apps.cli_app:pipelin", "module 'tests.apps.cli_app' has no attribute 'pipelin'"),
        ("tests.no_such_app:pipeline", "cannot import 'tests.no_such_app'"),
        ("tests.apps.cli_app", "expected MODULE:PIPELINE"),
        (
            "tests.apps.seed:ROW_STAGES",
            "tests.apps.seed:ROW_STAGES is a list, not a pgstagechain Pipeline",
        ),
    ],
)
def test_a_pipeline_that_cannot_be_loaded_is_a_usage_error(
    pgstagechain_dsn: str, spec: str, problem: str
) -> None:
    for command in (["status", spec], ["migrate", spec], ["worker", spec]):
        done = cli(pgstagechain_dsn, *command)
        assert done.returncode == 2, (command, done.stderr)
        assert problem in one_error_line(done)


def test_a_module_that_raises_on_import_shows_its_traceback(
    pgstagechain_dsn: str, tmp_path: Path
) -> None:
    (tmp_path / "broken_app.py").write_text("pipeline = undefined_name\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pgstagechain",
            "--dsn",
            pgstagechain_dsn,
            "status",
            "broken_app:pipeline",
        ],
        cwd=tmp_path,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 70
    assert "Traceback" in done.stderr
    assert "NameError: name 'undefined_name' is not defined" in done.stderr


def test_retry_stage_without_all_failed_is_a_usage_error(pgstagechain_dsn: str) -> None:
    done = cli(pgstagechain_dsn, "retry", APP, "--stage", "overlay")
    assert done.returncode == 2
    assert "--stage needs --all-failed" in one_error_line(done)


def test_without_a_dsn_the_error_says_libpq_defaults_were_used() -> None:
    done = bare_cli("status", APP, PGHOST="127.0.0.1", PGPORT="1", PGCONNECT_TIMEOUT="3")
    assert done.returncode == 2
    line = one_error_line(done)
    assert "(database )" not in line
    assert "no --dsn or PGSTAGECHAIN_DSN given; libpq defaults with PGHOST=127.0.0.1 PGPORT=1" in (
        line
    )


def test_a_library_error_from_the_worker_is_one_line_and_status_2(pgstagechain_dsn: str) -> None:
    # no table and no migrate: the worker refuses to start
    done = cli(pgstagechain_dsn, "worker", APP)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert "feedly" in errors[0]


def test_help_is_plain_text_and_lists_the_exit_statuses() -> None:
    done = bare_cli("--help")
    assert done.returncode == 0
    assert "``" not in done.stdout
    assert ":class:" not in done.stdout
    for line in (
        "0    done",
        "1    retry or cancel",
        "2    usage, configuration or database error",
        "70   unexpected failure",
    ):
        assert line in done.stdout
    assert bare_cli().returncode == 2  # no command: usage error


def test_docs_state_the_exit_statuses_the_command_uses() -> None:
    from pgstagechain import cli as module

    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    for code in (
        module.EXIT_OK,
        module.EXIT_NOTHING_MATCHED,
        module.EXIT_ERROR,
        module.EXIT_INTERNAL,
        module.EXIT_INTERRUPTED,
    ):
        assert f"| `{code}` |" in text, f"exit status {code} is not in docs/cli.md"
