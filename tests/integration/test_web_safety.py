"""An app embedding a worker, served by a real uvicorn: start-up that fails fast and obeys
signals, a status API that cannot exhaust the database, and a guarded write route."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import anyio
import httpx
import psycopg
import pytest
from fastapi import Depends
from psycopg.conninfo import make_conninfo

from pgstagechain import ConfigurationError, migrate
from pgstagechain.contrib.fastapi import status_router
from tests.apps import web_app
from tests.helpers import free_port, wait_for
from tests.helpers import uvicorn_serving as serve

HANG_GUARD = 60.0  # a bound for a test that hangs, never a speed assertion
AUTH = {"Authorization": f"Bearer {web_app.TOKEN}"}


def start_uvicorn(dsn: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "tests.apps.web_app:app",
            "--port",
            str(free_port()),
            "--log-level",
            "info",
        ],
        env={**os.environ, "PGSTAGECHAIN_DSN": dsn, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def read_until(process: subprocess.Popen[str], marker: str) -> str:
    """Lines of the process's output up to the one holding ``marker``."""
    assert process.stdout is not None
    seen = ""
    deadline = time.monotonic() + HANG_GUARD
    while marker not in seen:
        line = process.stdout.readline()
        assert line, f"exited before {marker!r}:\n{seen}"
        seen += line
        assert time.monotonic() < deadline
    return seen


def test_startup_with_a_wrong_database_fails_by_itself(pgstagechain_dsn: str) -> None:
    dsn = make_conninfo(pgstagechain_dsn, dbname="nosuchdb", password="hunter2")
    with start_uvicorn(dsn) as process:
        output, _ = process.communicate(timeout=HANG_GUARD)
    assert process.returncode != 0
    assert 'database "nosuchdb" does not exist' in output
    assert "Application startup failed" in output
    assert "retrying" not in output and "hunter2" not in output


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_a_startup_waiting_for_the_database(signum: int) -> None:
    dsn = f"host=127.0.0.1 port={free_port()} dbname=x"  # nothing listens there
    with start_uvicorn(dsn, WEB_APP_STARTUP_TIMEOUT="600") as process:
        read_until(process, "retrying")  # the worker is waiting for the database
        process.send_signal(signum)
        output, _ = process.communicate(timeout=HANG_GUARD)
    assert process.returncode != 0
    assert "start-up interrupted by " + signal.Signals(signum).name in output


def test_the_startup_timeout_bounds_waiting_for_the_database() -> None:
    dsn = f"host=127.0.0.1 port={free_port()} dbname=x"
    with start_uvicorn(dsn, WEB_APP_STARTUP_TIMEOUT="2") as process:
        output, _ = process.communicate(timeout=HANG_GUARD)
    assert process.returncode != 0
    assert "still unreachable after 2s at start-up" in output


def connections_to(dsn: str, server_dsn: str) -> int:
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (dbname,)
        ).fetchone() or (0,)
    return int(count)


@pytest.mark.slow
def test_a_burst_of_status_requests_is_bounded(
    pgstagechain_dsn: str, pgstagechain_server: Any
) -> None:
    web_app.create_table(pgstagechain_dsn)
    anyio.run(migrate, pgstagechain_dsn, web_app.pipeline)
    app = web_app.build(pgstagechain_dsn)
    most = 0
    sampling = threading.Event()

    def sample() -> None:
        nonlocal most
        while not sampling.is_set():
            most = max(most, connections_to(pgstagechain_dsn, pgstagechain_server.dsn))

    with serve(app) as (base, _server):
        (worker,) = app.state.pgstagechain_workers
        sampler = threading.Thread(target=sample)
        sampler.start()

        async def burst() -> tuple[list[int], list[int]]:
            limits = httpx.Limits(max_connections=400)
            async with httpx.AsyncClient(base_url=base, limits=limits, timeout=HANG_GUARD) as c:
                statuses: list[int] = []
                hellos: list[int] = []

                async def status() -> None:
                    statuses.append((await c.get("/pipelines/orders", headers=AUTH)).status_code)

                async def hello() -> None:
                    hellos.append((await c.get("/hello")).status_code)

                async with anyio.create_task_group() as tg:
                    for i in range(300):
                        tg.start_soon(status)
                        if i % 30 == 0:
                            tg.start_soon(hello)
                return statuses, hellos

        try:
            statuses, hellos = anyio.run(burst)
        finally:
            sampling.set()
            sampler.join()
        budget = worker.max_connections + 2  # the status router's pool: 2
    assert hellos == [200] * 10  # the app's own endpoints kept working
    assert set(statuses) <= {200, 503} and statuses.count(200) > 0
    print(f"status codes: {sorted(set(statuses))}, most connections seen: {most}")
    assert most <= budget + 1  # +1: the sampler's own connection


def test_the_status_routes_need_the_apps_auth(pgstagechain_dsn: str) -> None:
    web_app.create_table(pgstagechain_dsn)
    anyio.run(migrate, pgstagechain_dsn, web_app.pipeline)
    app = web_app.build(pgstagechain_dsn)
    with serve(app) as (base, _server), httpx.Client(base_url=base) as client:
        assert client.get("/pipelines/orders").status_code == 401
        assert client.get("/pipelines/").status_code == 401
        overview = client.get("/pipelines/", headers=AUTH).json()
        assert "table" not in overview["pipelines"][0]  # nothing internal by default
        assert "worker_id" not in overview["workers"][0]


def test_manual_runs_need_an_auth_dependency() -> None:
    with pytest.raises(ConfigurationError, match="dependencies"):
        status_router(web_app.pipeline, manual=True)
    status_router(web_app.pipeline, manual=True, dependencies=[Depends(web_app.require_admin)])


def test_the_write_route_refuses_what_it_must(pgstagechain_dsn: str) -> None:
    web_app.create_table(pgstagechain_dsn)
    anyio.run(migrate, pgstagechain_dsn, web_app.pipeline)
    with psycopg.connect(pgstagechain_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO orders (id) VALUES (1), (2)")
    app = web_app.build(pgstagechain_dsn)
    url = "/pipelines/orders/stages/charge/run"
    with serve(app) as (base, server), httpx.Client(base_url=base) as client:
        for worker in app.state.pgstagechain_workers:
            worker.stop()  # the test drives the stage by hand
        wait_for(lambda: all(w.in_flight == 0 for w in app.state.pgstagechain_workers))
        with psycopg.connect(pgstagechain_dsn, autocommit=True) as conn:
            conn.execute("UPDATE orders SET step = 'new', status = 'done', charged_at = NULL")
            conn.execute("DELETE FROM pgstagechain.runs")
        # no credentials
        assert client.post(url, json={"key": 1}).status_code == 401
        # not JSON: what a cross-site form or no-cors fetch sends
        for content_type in (None, "text/plain", "application/x-www-form-urlencoded"):
            headers = dict(AUTH)
            if content_type:
                headers["Content-Type"] = content_type
            reply = client.post(url, content=b'{"key": 1}', headers=headers)
            assert reply.status_code == 415, (content_type, reply.text)
        # keys that cannot be keys of a bigint column
        for bad in ("'; drop table orders;--", 99999999999999999999999, "\u0000", True, 1.5):
            reply = client.post(url, json={"key": bad}, headers=AUTH)
            assert reply.status_code == 422, (bad, reply.text)
            assert "Traceback" not in reply.text
        reply = client.post(url, json={"key": "'; drop table orders;--"}, headers=AUTH)
        assert "integer" in reply.json()["detail"]
        with psycopg.connect(pgstagechain_dsn) as conn:
            assert conn.execute("SELECT count(*) FROM pgstagechain.runs").fetchone() == (0,)
            assert conn.execute(
                "SELECT count(*) FROM orders WHERE step = 'new' AND charged_at IS NULL"
            ).fetchone() == (2,)
        # and a good one runs, given as a number or as text
        reply = client.post(url, json={"key": "1"}, headers=AUTH)
        assert reply.status_code == 200 and reply.json()["result"] == {"charged": 1}
        assert client.post(url, json={"key": 1}, headers=AUTH).status_code == 409
        del server
