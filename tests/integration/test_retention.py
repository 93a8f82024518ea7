"""Ledger retention: what `prune` (and the workers' periodic pass) deletes, what it keeps,
checked against the rules computed here independently of the library's SQL."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from pgstagechain import ConfigurationError, Worker, admin, migrate
from tests.apps.retention_app import GROUP_STAGES, ROW_STAGES, TABLES, fails, make_pipeline
from tests.helpers import query, value, wait_until

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.apps.retention_app:pipeline"
DAY = dt.timedelta(days=1)


# -- the rules, written out for this pipeline (new → first → second → third → gather → publish)


def settled_row(position: tuple[str, str, str] | None, group: tuple[str, str] | None) -> bool:
    """A row is done with the pipeline when it is at rest and its group finished."""
    if position is None:
        return True
    step, status, _ = position
    at_rest = status == "failed" or (status == "done" and step == "third")
    return at_rest and settled_group(group, missing=False)


def settled_group(group: tuple[str, str] | None, *, missing: bool = True) -> bool:
    if group is None:
        return missing
    step, status = group
    return status == "failed" or (step, status) == ("publish", "done")


def keeps(
    run: dict[str, Any],
    row: tuple[str, str, str] | None,
    group: tuple[str, str] | None,
    *,
    now: dt.datetime,
    succeeded: dt.timedelta,
    failed: dt.timedelta,
) -> bool:
    """Whether the rules keep ``run``, given its row's position (step, status, batch) and
    its group's (step, status) at that moment."""
    if run["state"] == "running" or run["retry_at"] is not None:
        return True
    if run["stage"] in ROW_STAGES:
        settled = settled_row(row, group)
        row_failed = row is not None and row[1] == "failed"
        failed_step = row[0] if row_failed and row is not None else None
    elif run["stage"] in GROUP_STAGES:
        settled = settled_group(group)
        row_failed = group is not None and group[1] == "failed"
        failed_step = group[0] if row_failed and group is not None else None
    else:
        settled, row_failed, failed_step = True, False, None
    window = succeeded if run["state"] == "succeeded" and not row_failed else failed
    if run["finished_at"] >= now - window:
        return True
    return not settled or run["stage"] == failed_step


async def snapshot(dsn: str) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Every run of the pipeline, every row's position and every group's."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        await cur.execute(
            "SELECT id, stage, row_key, state, retry_at, finished_at FROM pgstagechain.runs"
            " WHERE pipeline = 'keeper' ORDER BY id"
        )
        runs = await cur.fetchall()
        await cur.execute("SELECT id::text, current_step, status, batch_id::text FROM items")
        rows = {
            r["id"]: (r["current_step"], r["status"], r["batch_id"]) for r in await cur.fetchall()
        }
        await cur.execute("SELECT group_key, step, status FROM pgstagechain.groups")
        groups = {g["group_key"]: (g["step"], g["status"]) for g in await cur.fetchall()}
    return runs, rows, groups


def expected_kept(
    runs: list[dict[str, Any]],
    rows: dict[str, Any],
    groups: dict[str, Any],
    **windows: Any,
) -> set[int]:
    kept = set()
    for run in runs:
        if run["stage"] in GROUP_STAGES:
            row, group = None, groups.get(run["row_key"])
        else:
            row = rows.get(run["row_key"])
            group = groups.get(row[2]) if row else None
        if keeps(run, row, group, **windows):
            kept.add(run["id"])
    return kept


# -- set-up


async def install(dsn: str, *, items: int, per_batch: int = 5, first: int = 1) -> Any:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(TABLES)
    pipeline = make_pipeline()
    await migrate(dsn, pipeline)
    await add_items(dsn, range(first, first + items), per_batch)
    return pipeline


async def add_items(dsn: str, keys: Any, per_batch: int = 5) -> None:
    await query(
        dsn,
        "INSERT INTO items (id, batch_id) SELECT k, 1000 + (k - 1) / %s FROM unnest(%s::bigint[]) k",
        (per_batch, list(keys)),
    )


async def backdate(dsn: str, by: dt.timedelta) -> None:
    """Make every run look ``by`` older: time passes without the test waiting for it."""
    await query(
        dsn,
        "UPDATE pgstagechain.runs SET started_at = started_at - %s, finished_at = finished_at - %s",
        (by, by),
    )


async def run_ids(dsn: str) -> set[int]:
    return {r[0] for r in await query(dsn, "SELECT id FROM pgstagechain.runs")}


async def db_now(dsn: str) -> dt.datetime:
    found: dt.datetime = await value(dsn, "SELECT clock_timestamp()")
    return found


def batch_of(key: int, per_batch: int = 5) -> int:
    """The group of row ``key`` (group keys never look like row keys here)."""
    return 1000 + (key - 1) // per_batch


def check_seen(seen: list[tuple[str, str, Any, Any]], keys: range, per_batch: int = 5) -> None:
    """What the later stages were given holds every earlier result it should."""
    by = {(key, stage): (given, failed) for key, stage, given, failed in seen}
    for key in keys:
        if fails(key):
            assert (str(key), "third") not in by
            continue
        given, _ = by[(str(key), "third")]
        assert given == {s: {"stage": s, "key": str(key)} for s in ("first", "second")}, key
    for batch in {batch_of(k, per_batch) for k in keys}:
        members = [k for k in keys if batch_of(k, per_batch) == batch]
        given, failed = by[(str(batch), "gather")]
        assert sorted(given) == sorted(str(k) for k in members if not fails(k)), batch
        for key, results in given.items():
            assert results == {s: {"stage": s, "key": key} for s in ROW_STAGES}, (batch, key)
        assert sorted(failed) == sorted(str(k) for k in members if fails(k)), batch
        assert all(error and "cannot pass second" in error for error in failed.values())
        published, _ = by[(str(batch), "publish")]
        assert list(published) == ["gather"], batch


# -- tests


async def test_later_stages_still_read_results_past_the_window(pgstagechain_dsn: str) -> None:
    dsn = pgstagechain_dsn
    pipeline = await install(dsn, items=3, first=11)  # batch 2: all the way through
    await Worker(pipeline, dsn, scan_interval=0.5).run_until_idle()
    await add_items(dsn, range(1, 11))  # batches 0 and 1: only the first two stages
    await Worker(pipeline, dsn, stages=["first", "second"], scan_interval=0.5).run_until_idle()
    await backdate(dsn, 10 * DAY)
    before = await snapshot(dsn)
    finished_batch = {r["id"] for r in before[0] if r["row_key"] in ("11", "12", "13", "1002")}
    assert len(finished_batch) == 3 * 3 + 2

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        report = await admin.prune(conn, pipeline, older_than=DAY)
    assert report.by_state == {"succeeded": 11}
    now = await db_now(dsn)
    assert await run_ids(dsn) == expected_kept(*before, now=now, succeeded=DAY, failed=DAY)
    assert not finished_batch & await run_ids(dsn)

    # the rows mid-chain go on: their later stages get every earlier result, and the
    # group gets row 7's error, though all of that is ten days old
    await Worker(pipeline, dsn, scan_interval=0.5).run_until_idle()
    seen = await query(dsn, "SELECT key, stage, given, failed FROM seen")
    check_seen([s for s in seen if s[0] not in ("11", "12", "13", "1002")], range(1, 11))

    # all done now; ten days on, the runs of succeeded rows go, row 7's stay for the
    # failed window, and once past it the run saying why it failed still stays
    await backdate(dsn, 10 * DAY)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        before = await snapshot(dsn)
        report = await admin.prune(conn, pipeline, older_than=DAY, failed_older_than=30 * DAY)
        now = await db_now(dsn)
        kept = expected_kept(*before, now=now, succeeded=DAY, failed=30 * DAY)
        assert await run_ids(dsn) == kept
        assert report.total == len(before[0]) - len(kept) > 0
        assert {(r["stage"], r["state"]) for r in before[0] if r["row_key"] == "7"} == {
            ("first", "succeeded"),
            ("second", "failed"),
        }
        assert {r["id"] for r in before[0] if r["row_key"] == "7"} <= kept

        before = await snapshot(dsn)
        await admin.prune(conn, pipeline, older_than=DAY, failed_older_than=2 * DAY)
        now = await db_now(dsn)
        assert await run_ids(dsn) == expected_kept(*before, now=now, succeeded=DAY, failed=2 * DAY)
        left = await query(
            dsn, "SELECT stage, state FROM pgstagechain.runs WHERE row_key = '7' ORDER BY id"
        )
        assert left == [("second", "failed")]
        failures = await admin.failures(conn, pipeline)
        assert [(f.key, f.stage) for f in failures] == [("7", "second")]
        assert failures[0].error and "cannot pass second" in failures[0].error


async def test_dry_run_deletes_nothing_and_counts_the_same(pgstagechain_dsn: str) -> None:
    dsn = pgstagechain_dsn
    pipeline = await install(dsn, items=20)
    await Worker(pipeline, dsn, scan_interval=0.5).run_until_idle()
    await backdate(dsn, 3 * DAY)
    ids = await run_ids(dsn)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        dry = await admin.prune(conn, pipeline, older_than=DAY, dry_run=True, batch=7)
        assert dry.dry_run and dry.total > 0
        assert await run_ids(dsn) == ids
        real = await admin.prune(conn, pipeline, older_than=DAY, batch=7)
    assert real.by_state == dry.by_state
    assert len(ids - await run_ids(dsn)) == real.total
    # three days on, with a one-day window for all: the runs of rows done with the
    # pipeline go, and of rows 7 and 14 (failed for good) only the run saying why stays
    assert real.by_state == {"succeeded": len(ids) - 2}
    left = await query(dsn, "SELECT row_key, stage, state FROM pgstagechain.runs ORDER BY id")
    assert sorted(left) == [("14", "second", "failed"), ("7", "second", "failed")]


async def test_prune_checks_its_arguments(pgstagechain_dsn: str) -> None:
    dsn = pgstagechain_dsn
    pipeline = await install(dsn, items=1)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        with pytest.raises(ConfigurationError, match="declares no retention"):
            await admin.prune(conn, pipeline)
        with pytest.raises(ConfigurationError, match="older_than must be a positive"):
            await admin.prune(conn, pipeline, older_than=-DAY)
        with pytest.raises(ConfigurationError, match="shorter than older_than"):
            await admin.prune(conn, pipeline, older_than=DAY, failed_older_than=DAY / 2)
        with pytest.raises(ConfigurationError, match="batch"):
            await admin.prune(conn, pipeline, older_than=DAY, batch=0)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        with pytest.raises(ConfigurationError, match="autocommit"):
            await admin.prune(conn, pipeline, older_than=DAY)


# -- under load: worker processes applying the retention while rows flow

AUDIT = """
CREATE TABLE deleted_runs AS SELECT * FROM pgstagechain.runs WITH NO DATA;
ALTER TABLE deleted_runs ADD COLUMN deleted_at timestamptz, ADD COLUMN row_position text[],
    ADD COLUMN group_position text[], ADD COLUMN deleted_by text;
CREATE FUNCTION audit_deleted_run() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO deleted_runs SELECT OLD.*, statement_timestamp(),
        (SELECT ARRAY[i.current_step, i.status, i.batch_id::text] FROM items i
         WHERE OLD.stage <> ALL(ARRAY['gather', 'publish']) AND i.id::text = OLD.row_key),
        (SELECT ARRAY[g.step, g.status] FROM pgstagechain.groups g
         WHERE g.pipeline = OLD.pipeline AND g.group_key = CASE
             WHEN OLD.stage = ANY(ARRAY['gather', 'publish']) THEN OLD.row_key
             ELSE (SELECT i.batch_id::text FROM items i WHERE i.id::text = OLD.row_key) END),
        current_setting('application_name');
    RETURN NULL;
END $$;
CREATE TRIGGER audit AFTER DELETE ON pgstagechain.runs
    FOR EACH ROW EXECUTE FUNCTION audit_deleted_run();
"""


CONCURRENCY = ("--concurrency", "8")


def start_worker(dsn: str, env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pgstagechain", "--dsn", dsn, "worker", APP, *CONCURRENCY],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=out,
            text=True,
        )


@pytest.mark.slow
async def test_retention_under_load_deletes_exactly_what_the_rules_say(
    pgstagechain_dsn: str, tmp_path: Path
) -> None:
    dsn = pgstagechain_dsn
    succeeded, failed = dt.timedelta(seconds=1), dt.timedelta(seconds=3)
    pipeline = await install(dsn, items=0)
    await query(dsn, AUDIT)
    env = {
        **os.environ,
        "RETENTION_APP_SECONDS": "1",
        "RETENTION_APP_FAILED_SECONDS": "3",
        "RETENTION_APP_EVERY": "0.3",
        "RETENTION_APP_BATCH": "40",
        "RETENTION_APP_GATE": "1",
    }
    env.pop("PGSTAGECHAIN_DSN", None)
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    workers = [start_worker(dsn, env, log) for log in logs]
    total = 600
    try:
        async with (
            anyio.create_task_group() as tg,
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
        ):
            done = anyio.Event()

            async def prune_meanwhile() -> None:
                while not done.is_set():
                    await admin.prune(
                        conn, pipeline, older_than=succeeded, failed_older_than=failed
                    )
                    await anyio.sleep(0.1)

            tg.start_soon(prune_meanwhile)
            for start in range(1, total + 1, 30):  # 30 rows (6 groups) at a time
                await add_items(dsn, range(start, start + 30))
                await anyio.sleep(0.2)

            async def alive() -> None:
                for w, log in zip(workers, logs, strict=True):
                    assert w.poll() is None, log.read_text()[-3000:]

            async def rows_wait_past_the_window() -> bool:
                await alive()
                old = await value(
                    dsn,
                    "SELECT count(*) FROM items i WHERE (i.current_step, i.status) ="
                    " ('second', 'done') AND EXISTS (SELECT 1 FROM pgstagechain.runs r"
                    " WHERE r.row_key = i.id::text AND r.stage = 'first'"
                    " AND r.finished_at < clock_timestamp() - %s)",
                    (failed,),
                )
                return int(old) >= 100

            # third is held shut: rows pile up mid-chain until their early results are
            # older than every window, while the workers' passes go on
            await wait_until(rows_wait_past_the_window, "rows waiting past the window")
            await query(dsn, "INSERT INTO gate DEFAULT VALUES")

            async def all_through() -> bool:
                await alive()
                groups = await value(
                    dsn,
                    "SELECT count(*) FROM pgstagechain.groups"
                    " WHERE (step, status) = ('publish', 'done')",
                )
                return int(groups) == total // 5

            await wait_until(all_through, "every group to be published", within=240)
            done.set()
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            w.wait(timeout=60)
    check_seen(await query(dsn, "SELECT key, stage, given, failed FROM seen"), range(1, total + 1))

    # every run deleted was deletable when it went, by the rules and the positions then
    deleted = await query(
        dsn,
        "SELECT id, stage, row_key, state, retry_at, finished_at, deleted_at, row_position,"
        " group_position, deleted_by FROM deleted_runs",
    )
    assert deleted
    wrong = []
    for id_, stage, row_key, state, retry_at, finished_at, at, row, group, _ in deleted:
        run = {"stage": stage, "state": state, "retry_at": retry_at, "finished_at": finished_at}
        if keeps(
            run,
            tuple(row) if row else None,
            tuple(group) if group else None,
            now=at,
            succeeded=succeeded,
            failed=failed,
        ):
            wrong.append((id_, stage, row_key, state, row, group))
    assert not wrong
    by_whom = Counter(d[-1] for d in deleted)
    assert by_whom["pgstagechain-retention"] > 0, by_whom  # the workers' own passes
    # and rows did wait mid-chain longer than the windows: their early results were old
    waited = await value(
        dsn,
        "WITH every_run AS (SELECT stage, row_key, started_at, finished_at FROM deleted_runs"
        " UNION ALL SELECT stage, row_key, started_at, finished_at FROM pgstagechain.runs)"
        " SELECT count(*) FROM every_run f JOIN every_run t USING (row_key)"
        " WHERE f.stage = 'first' AND t.stage = 'third' AND t.started_at > f.finished_at + %s",
        (failed,),
    )
    assert waited >= 100, waited

    # and, the load over, one more pass leaves exactly what the rules keep
    before = await snapshot(dsn)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        now = await db_now(dsn)
        hour = dt.timedelta(hours=1)
        tiny = dt.timedelta(milliseconds=1)
        await admin.prune(conn, pipeline, older_than=tiny, failed_older_than=hour)
    kept = expected_kept(*before, now=now, succeeded=tiny, failed=hour)
    assert await run_ids(dsn) == kept
    # what is left: the runs of the failed rows, and of failed runs, nothing else
    left = await query(
        dsn, "SELECT DISTINCT row_key FROM pgstagechain.runs WHERE state = 'succeeded'"
    )
    assert {k for (k,) in left} <= {str(k) for k in range(1, total + 1) if fails(k)}


def cli(dsn: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "PGSTAGECHAIN_DSN"}
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-m", "pgstagechain", "--dsn", dsn, *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_prune_command(pgstagechain_dsn: str) -> None:
    dsn = pgstagechain_dsn
    pipeline = await install(dsn, items=10)
    await Worker(pipeline, dsn, scan_interval=0.5).run_until_idle()
    await backdate(dsn, 3 * DAY)
    ids = await run_ids(dsn)

    dry = cli(dsn, "prune", APP, "--older-than", "2d", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would delete" in dry.stdout and "succeeded" in dry.stdout
    assert await run_ids(dsn) == ids
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        expected = await admin.prune(conn, pipeline, older_than=2 * DAY, dry_run=True)
    assert f"would delete {expected.total} run(s)" in dry.stdout
    for state, n in expected.by_state.items():
        assert f"{n} {state}" in dry.stdout

    done = cli(dsn, "prune", APP, "--older-than", "2d")
    assert done.returncode == 0, done.stderr
    assert f"deleted {expected.total} run(s)" in done.stdout
    assert len(ids - await run_ids(dsn)) == expected.total

    # the pipeline's own retention, from its declaration
    declared = cli(dsn, "prune", APP, "--dry-run", RETENTION_APP_SECONDS="3600")
    assert declared.returncode == 0, declared.stderr

    for bad, message in (
        (["--older-than", "3x"], "cannot read --older-than '3x'"),
        (["--older-than=-5d"], "cannot read --older-than '-5d'"),
        (["--older-than", "0s"], "more than zero"),
        (["--older-than", "2d", "--failed-older-than", "1d"], "shorter than"),
        ([], "declares no retention"),
    ):
        found = cli(dsn, "prune", APP, *bad)
        assert found.returncode == 2, (bad, found.stdout, found.stderr)
        assert message in found.stderr, (bad, found.stderr)
        assert found.stderr.count("\n") == 1  # one line, no traceback
    bad_env = cli(dsn, "prune", APP, RETENTION_APP_SECONDS="-1")
    assert bad_env.returncode == 2
    assert "Retention(finished=...) must be more than zero" in bad_env.stderr


TINY = ("--small", "100", "--size", "2000", "--iterations", "3", "--rate", "20")
TINY += ("--seconds", "4", "--window", "1", "--every", "0.5")


@pytest.mark.slow
def test_ledger_benchmark_reports_every_figure(pgstagechain_dsn: str) -> None:
    """benchmarks/ledger.py runs end to end at a tiny size; no timing is asserted."""
    done = subprocess.run(
        [sys.executable, "benchmarks/ledger.py", "--dsn", pgstagechain_dsn, *TINY],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report["sizes"]) == {"100", "2000"}
    for figures in report["sizes"].values():
        for name in ("claim", "complete", "pending", "expire"):
            found = figures["statements"][name]
            assert found["median_ms"] > 0 and found["buffers"] > 0
            assert not any("Seq Scan" in a for a in found["ledger_access"]), (name, found)
    steady = report["steady"]
    assert steady["rows_through"] > 0 and steady["samples_t_runs_bytes_heap_bytes"]
