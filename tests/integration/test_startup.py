"""Start-up against a database that refuses us: fail fast and clearly, or retry within a bound."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import anyio
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgstagechain import (
    DatabaseAccessError,
    NotInstalledError,
    StartupTimeoutError,
    Worker,
    migrate,
)
from pgstagechain.testing.plugin import TestServer
from tests.apps.noop_app import pipeline
from tests.apps.seed import add_jobs, create_tables

HANG_GUARD = 60.0  # a bound for a test that hangs, never a speed assertion
PASSWORD_ROLE = "pgsc_password_role"


def with_params(dsn: str, **params: str) -> str:
    return make_conninfo(dsn, **params)


@pytest.fixture
def password_dsn(pgstagechain_server: TestServer, pgstagechain_dsn: str) -> Iterator[str]:
    """A DSN of a role the server authenticates with a password (the test server trusts
    everyone else)."""
    if pgstagechain_server.cluster is None:
        pytest.skip("needs the test's own server to change pg_hba.conf")
    with psycopg.connect(pgstagechain_server.dsn, autocommit=True) as conn:
        hba = conn.execute("SHOW hba_file").fetchone()[0]  # type: ignore[index]
        exists = conn.execute(
            "SELECT 1 FROM pg_roles WHERE rolname = %s", (PASSWORD_ROLE,)
        ).fetchone()
        if not exists:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'right'").format(
                    sql.Identifier(PASSWORD_ROLE)
                )
            )
        rule = f"host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n"
        with open(hba) as f:
            text = f.read()
        if rule not in text:
            with open(hba, "w") as f:
                f.write(rule + text)
            conn.execute("SELECT pg_reload_conf()")
    dsn = with_params(pgstagechain_dsn, user=PASSWORD_ROLE, password="wrong")
    deadline = time.monotonic() + HANG_GUARD
    while True:  # the reload is asynchronous: wait until the rule is in force
        try:
            psycopg.connect(dsn).close()
        except psycopg.OperationalError as exc:
            if "password authentication failed" in str(exc):
                break
        assert time.monotonic() < deadline, "pg_hba.conf reload did not take effect"
        time.sleep(0.05)
    yield dsn


def run_until_idle(worker: Worker) -> None:
    async def main() -> None:
        with anyio.fail_after(HANG_GUARD):
            await worker.run_until_idle()

    anyio.run(main)


def test_wrong_database_name_fails_at_once(pgstagechain_dsn: str) -> None:
    dsn = with_params(pgstagechain_dsn, dbname="nosuchdb", password="hunter2")
    worker = Worker(pipeline, dsn, startup_timeout=HANG_GUARD * 2)
    with pytest.raises(DatabaseAccessError) as caught:
        run_until_idle(worker)
    message = str(caught.value)
    assert 'database "nosuchdb" does not exist' in message
    assert "hunter2" not in message and "password=***" in message
    assert worker.stats.db_errors == 1  # not retried


def test_wrong_password_fails_at_once(password_dsn: str) -> None:
    worker = Worker(pipeline, password_dsn, startup_timeout=HANG_GUARD * 2)
    with pytest.raises(DatabaseAccessError) as caught:
        run_until_idle(worker)
    assert "password authentication failed" in caught.value.problem
    assert "wrong" not in str(caught.value)


def test_missing_password_fails_at_once(password_dsn: str) -> None:
    params = conninfo_to_dict(password_dsn)
    del params["password"]
    dsn = make_conninfo("", **params)
    env_password = os.environ.pop("PGPASSWORD", None)
    try:
        worker = Worker(pipeline, dsn, startup_timeout=HANG_GUARD * 2)
        with pytest.raises(DatabaseAccessError, match="no password supplied"):
            run_until_idle(worker)
    finally:
        if env_password is not None:
            os.environ["PGPASSWORD"] = env_password


def test_missing_role_fails_at_once(pgstagechain_dsn: str) -> None:
    worker = Worker(pipeline, with_params(pgstagechain_dsn, user="ghost"))
    with pytest.raises(DatabaseAccessError, match='role "ghost" does not exist'):
        run_until_idle(worker)


def test_role_without_privilege_on_the_schema_fails_at_once(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    anyio.run(migrate, pgstagechain_dsn, pipeline)
    with psycopg.connect(pgstagechain_dsn, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS pgsc_outsider")
        conn.execute("CREATE ROLE pgsc_outsider LOGIN")
        conn.execute("REVOKE ALL ON SCHEMA pgstagechain FROM PUBLIC")
    worker = Worker(pipeline, with_params(pgstagechain_dsn, user="pgsc_outsider"))
    with pytest.raises(DatabaseAccessError, match="permission denied for schema pgstagechain"):
        run_until_idle(worker)


def test_pipeline_not_installed_fails_at_once(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    with pytest.raises(NotInstalledError, match="not installed"):
        run_until_idle(Worker(pipeline, pgstagechain_dsn))


def test_unreachable_server_is_retried_until_the_startup_timeout() -> None:
    with socket_closed_port() as port:
        dsn = f"host=127.0.0.1 port={port} dbname=x connect_timeout=2"
        worker = Worker(pipeline, dsn, startup_timeout=2.0)
        with pytest.raises(StartupTimeoutError, match="Connection refused") as caught:
            run_until_idle(worker)
    assert worker.stats.db_errors > 1  # it kept trying until the bound
    assert isinstance(caught.value, TimeoutError)


def test_database_dropped_while_running_ends_run_with_the_error(
    pgstagechain_server: TestServer,
) -> None:
    name = pgstagechain_server.create_database()
    dsn = pgstagechain_server.dsn_for(name)
    create_tables(dsn)
    anyio.run(migrate, dsn, pipeline)
    worker = Worker(pipeline, dsn)
    caught: list[BaseException] = []

    async def main() -> None:
        with anyio.fail_after(HANG_GUARD):
            async with anyio.create_task_group() as tg:
                tg.start_soon(drop_when_started)
                try:
                    await worker.run()
                except BaseException as exc:  # what run() itself raises, unwrapped
                    caught.append(exc)

    async def drop_when_started() -> None:
        await worker.wait_started()
        await anyio.to_thread.run_sync(pgstagechain_server.drop_database, name)

    try:
        anyio.run(main)
    finally:
        pgstagechain_server.drop_database(name)
    assert len(caught) == 1
    assert isinstance(caught[0], DatabaseAccessError), repr(caught[0])
    assert "does not exist" in str(caught[0])


def test_cli_worker_exits_with_the_problem(pgstagechain_dsn: str) -> None:
    dsn = with_params(pgstagechain_dsn, dbname="nosuchdb", password="hunter2")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pgstagechain",
            "--dsn",
            dsn,
            "worker",
            "tests.apps.noop_app:pipeline",
        ],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
        env=dict(os.environ),
    )
    assert done.returncode != 0
    assert 'database "nosuchdb" does not exist' in done.stderr
    assert "hunter2" not in done.stderr + done.stdout
    assert "retrying" not in done.stderr


def test_a_running_worker_still_works(pgstagechain_dsn: str) -> None:
    """The fast failure does not touch the ordinary path."""
    create_tables(pgstagechain_dsn)
    anyio.run(migrate, pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, 1, 2)
    worker = Worker(pipeline, pgstagechain_dsn)
    run_until_idle(worker)
    assert worker.stats.succeeded > 0


class socket_closed_port:
    """A local TCP port that nothing listens on."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        return None
