"""Adding a stage after the last one: rows that finished before it existed never run it
silently; ``migrate`` says so first and lets the user choose."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import anyio
import psycopg
import pytest

from pgstagechain import ExistingRowsError, NotInstalledError, Pipeline, Worker, migrate

TABLE = """
CREATE TABLE invoices (
    id bigint PRIMARY KEY,
    step text NOT NULL DEFAULT 'new',
    status text NOT NULL DEFAULT 'done'
)
"""


def history(dsn: str) -> tuple[Pipeline, Pipeline, list[Any]]:
    """Three invoices sent with the first pipeline (send only), then archive appended."""
    archived: list[Any] = []
    old = Pipeline("invoices", table="invoices", key="id", step_column="step", start="new")
    new = Pipeline("invoices", table="invoices", key="id", step_column="step", start="new")
    for p in (old, new):
        p.stage(after="new", name="send")(lambda ctx: None)

    @new.stage(after="send")
    def archive(ctx: Any) -> None:
        archived.append(ctx.key)

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(TABLE)
    anyio.run(migrate, dsn, old)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO invoices (id) VALUES (1), (2), (3)")
    anyio.run(Worker(old, dsn, scan_interval=0.2).run_until_idle)
    assert steps(dsn) == [("send", "done", 3)]
    return old, new, archived


def steps(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT step, status, count(*) FROM invoices GROUP BY 1, 2 ORDER BY 1"
        ).fetchall()


def run(dsn: str, pipeline: Pipeline) -> None:
    anyio.run(Worker(pipeline, dsn, scan_interval=0.2).run_until_idle)


def test_migrate_refuses_to_choose_for_the_user(pgstagechain_dsn: str) -> None:
    _old, new, archived = history(pgstagechain_dsn)
    with pytest.raises(ExistingRowsError) as caught:
        anyio.run(migrate, pgstagechain_dsn, new)
    assert "3 at 'send'" in str(caught.value) and "backfill" in str(caught.value)
    assert caught.value.waiting == {"send": 3}
    # nothing changed: the old graph is still the installed one
    with pytest.raises(NotInstalledError, match="changed"):
        run(pgstagechain_dsn, new)
    assert archived == [] and steps(pgstagechain_dsn) == [("send", "done", 3)]


def test_only_new_rows_run_the_new_stage(pgstagechain_dsn: str) -> None:
    _old, new, archived = history(pgstagechain_dsn)
    anyio.run(lambda: migrate(pgstagechain_dsn, new, backfill=False))
    assert steps(pgstagechain_dsn) == [("archive", "done", 3)]  # past it, not run
    with psycopg.connect(pgstagechain_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO invoices (id) VALUES (4)")
    run(pgstagechain_dsn, new)
    assert archived == [4]
    with psycopg.connect(pgstagechain_dsn) as conn:
        assert conn.execute(
            "SELECT row_key FROM pgstagechain.runs WHERE stage = 'archive'"
        ).fetchall() == [("4",)]
    # and migrating again is a no-op that needs no choice
    anyio.run(migrate, pgstagechain_dsn, new)


def test_all_rows_run_the_new_stage_when_asked(pgstagechain_dsn: str) -> None:
    _old, new, archived = history(pgstagechain_dsn)
    anyio.run(lambda: migrate(pgstagechain_dsn, new, backfill=True))
    run(pgstagechain_dsn, new)
    assert sorted(archived) == [1, 2, 3]


def test_the_cli_says_what_it_would_do(pgstagechain_dsn: str, tmp_path: Any) -> None:
    history(pgstagechain_dsn)
    app = tmp_path / "invoices_app.py"
    app.write_text(
        "from pgstagechain import Pipeline\n"
        "pipeline = Pipeline('invoices', table='invoices', key='id', step_column='step',"
        " start='new')\n"
        "pipeline.stage(after='new', name='send')(lambda ctx: None)\n"
        "pipeline.stage(after='send', name='archive')(lambda ctx: None)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "pgstagechain", "--dsn", pgstagechain_dsn, "migrate"]
    refused = subprocess.run(
        [*command, "invoices_app:pipeline"], env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2
    assert "3 at 'send'" in refused.stderr and "--no-backfill" in refused.stderr
    done = subprocess.run(
        [*command, "invoices_app:pipeline", "--no-backfill"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "moved to (archive, done) without running them" in done.stderr
    assert steps(pgstagechain_dsn) == [("archive", "done", 3)]
