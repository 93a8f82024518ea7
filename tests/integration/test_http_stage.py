"""HTTP stages against a real HTTP server on 127.0.0.1, a real worker and a real database."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import psycopg
import pytest

from pgstagechain import Pipeline, Retry, StageContext, Worker, migrate
from pgstagechain.http import (
    HttpPermanentError,
    HttpRetryableError,
    HttpStage,
    http_stage,
    shared_client,
)
from tests.apps.seed import add_jobs, create_tables
from tests.helpers import http_server as serving

pytestmark = pytest.mark.anyio

Route = Callable[[dict[str, Any], int], tuple[int, Any]]


@contextmanager
def http_server(routes: dict[str, Route]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Serve POST routes; a route gets (body, how many times this path+body came before)."""
    received: list[dict[str, Any]] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                seen = sum(1 for r in received if r["path"] == self.path and r["body"] == body)
                received.append(
                    {
                        "path": self.path,
                        "body": body,
                        "attempt": self.headers.get("X-Pgstagechain-Attempt"),
                        "idempotency_key": self.headers.get("Idempotency-Key"),
                    }
                )
            route = routes.get(self.path)
            status, answer = route(body, seen) if route else (404, {"detail": "no such route"})
            data = json.dumps(answer).encode() if not isinstance(answer, bytes) else answer
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("Location", "http://elsewhere.example/moved")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    with serving(Handler) as base:
        yield base, received


def make_pipeline(base: str, *, flaky: bool = False, first_path: str = "/analyze") -> Pipeline:
    retry = Retry(max_attempts=3, base_delay=0.01, max_delay=0.05)
    pipeline = Pipeline(
        "http_demo",
        table="jobs_variants",
        key="job_variants_id",
        group_column="job_id",
        extra_columns=["tenant_id"],
        start="img_gen",
    )
    common = {"key_field": "job_variants_id", "group_field": "job_id", "retry": retry}
    pipeline.add(http_stage(name="analyze", after="img_gen", url=base + first_path, **common))

    def with_overlay(ctx: StageContext[Any]) -> dict[str, Any]:
        return {"overlay_id": ctx.results["analyze"]["overlay_id"]}

    pipeline.add(
        HttpStage(
            name="judge",
            after="analyze",
            url=base + ("/flaky" if flaky else "/judge"),
            payload=with_overlay,
            **common,
        )
    )
    pipeline.add(HttpStage(name="feed", after="judge", group=True, url=base + "/feed", **common))
    return pipeline


def ok(body: dict[str, Any], _seen: int) -> tuple[int, Any]:
    return 200, {"overlay_id": f"ov-{body.get('job_variants_id')}", "echo": body}


def flaky(body: dict[str, Any], seen: int) -> tuple[int, Any]:
    return (503, {"detail": "warming up"}) if seen == 0 else (200, {"score": 0.9})


def rows(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT current_step, status, count(*) FROM jobs_variants GROUP BY 1, 2 ORDER BY 1, 2"
        ).fetchall()


def runs(dsn: str, stage: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT row_key, attempt, state, error, result FROM pgstagechain.runs"
            " WHERE stage = %s ORDER BY row_key, attempt",
            (stage,),
        ).fetchall()


async def test_http_chain_stores_json_answers(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    routes: dict[str, Route] = {"/analyze": ok, "/judge": ok, "/feed": ok}
    with http_server(routes) as (base, received):
        pipeline = make_pipeline(base)
        await migrate(pgstagechain_dsn, pipeline)
        add_jobs(pgstagechain_dsn, jobs=2, variants=2)
        stats = await Worker(pipeline, pgstagechain_dsn, scan_interval=1).run_until_idle()

    assert stats.failed == 0 and stats.retried == 0
    assert rows(pgstagechain_dsn) == [("judge", "done", 4)]
    analyzed = runs(pgstagechain_dsn, "analyze")
    assert [(r[0], r[2]) for r in analyzed] == [
        ("101", "succeeded"),
        ("102", "succeeded"),
        ("201", "succeeded"),
        ("202", "succeeded"),
    ]
    # The answer is the stored result, exactly as the server sent it.
    assert analyzed[0][4] == {
        "overlay_id": "ov-101",
        "echo": {"job_variants_id": 101, "job_id": "1", "tenant_id": "tenant-1"},
    }
    judged = {r["body"]["job_variants_id"]: r["body"] for r in received if r["path"] == "/judge"}
    assert judged[202] == {
        "job_variants_id": 202,
        "job_id": "2",
        "tenant_id": "tenant-2",
        "overlay_id": "ov-202",
    }
    # The group stage runs once per job, with the job's key only.
    feeds = sorted((r["body"] for r in received if r["path"] == "/feed"), key=str)
    assert feeds == [{"job_id": "1"}, {"job_id": "2"}]
    with psycopg.connect(pgstagechain_dsn) as conn:
        assert conn.execute(
            "SELECT group_key, step, status FROM pgstagechain.groups ORDER BY 1"
        ).fetchall() == [("1", "feed", "done"), ("2", "feed", "done")]


async def test_503_then_200_succeeds_on_retry(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    with http_server({"/analyze": ok, "/flaky": flaky, "/feed": ok}) as (base, received):
        pipeline = make_pipeline(base, flaky=True)
        await migrate(pgstagechain_dsn, pipeline)
        add_jobs(pgstagechain_dsn, jobs=1, variants=2)
        stats = await Worker(pipeline, pgstagechain_dsn, scan_interval=1).run_until_idle()

    assert stats.retried == 2 and stats.failed == 0
    assert rows(pgstagechain_dsn) == [("judge", "done", 2)]
    judged = runs(pgstagechain_dsn, "judge")
    assert [(r[0], r[1], r[2]) for r in judged] == [
        ("101", 1, "failed"),
        ("101", 2, "succeeded"),
        ("102", 1, "failed"),
        ("102", 2, "succeeded"),
    ]
    assert "HttpRetryableError" in judged[0][3] and "503" in judged[0][3]
    assert judged[1][4] == {"score": 0.9}
    attempts = [r["attempt"] for r in received if r["path"] == "/flaky"]
    assert sorted(attempts) == ["1", "1", "2", "2"]
    with psycopg.connect(pgstagechain_dsn) as conn:
        assert conn.execute("SELECT step, status FROM pgstagechain.groups").fetchall() == [
            ("feed", "done")
        ]


async def test_404_fails_at_once_with_the_error_recorded(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    with http_server({"/judge": ok}) as (base, received):
        pipeline = make_pipeline(base, first_path="/missing")
        await migrate(pgstagechain_dsn, pipeline)
        add_jobs(pgstagechain_dsn, jobs=1, variants=1)
        stats = await Worker(pipeline, pgstagechain_dsn, scan_interval=1).run_until_idle()

    assert stats.failed == 1 and stats.retried == 0
    assert rows(pgstagechain_dsn) == [("analyze", "failed", 1)]
    (run,) = runs(pgstagechain_dsn, "analyze")
    assert run[1:3] == (1, "failed")  # three attempts allowed, one made
    assert "HttpPermanentError" in run[3] and "404" in run[3] and "no such route" in run[3]
    assert [r["path"] for r in received] == ["/missing"]


async def test_unreachable_service_is_retried_then_fails(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    pipeline = make_pipeline(dead)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=1)
    stats = await Worker(pipeline, pgstagechain_dsn, scan_interval=1).run_until_idle()

    assert stats.retried == 2 and stats.failed == 1
    assert rows(pgstagechain_dsn) == [("analyze", "failed", 1)]
    attempts = runs(pgstagechain_dsn, "analyze")
    assert [r[1:3] for r in attempts] == [(1, "failed"), (2, "failed"), (3, "failed")]
    assert all("ConnectError" in r[3] for r in attempts)


async def test_non_json_answer_is_permanent_and_client_is_shared() -> None:
    def html(_body: dict[str, Any], _seen: int) -> tuple[int, Any]:
        return 200, b"<html>proxy login</html>"

    with http_server({"/html": html}) as (base, _received):
        stage = HttpStage(name="s", after="start", url=base + "/html")
        ctx = StageContext(claim=_claim(), conn=None, worker_id="w")
        with pytest.raises(HttpPermanentError, match="not JSON"):
            await stage.run(ctx)
    assert await shared_client() is await shared_client()
    assert isinstance(await shared_client(), httpx.AsyncClient)


def test_shared_client_is_closed_when_its_loop_ends() -> None:
    import asyncio

    async def main() -> httpx.AsyncClient:
        return await shared_client()

    client = asyncio.run(main())
    assert client.is_closed
    assert asyncio.run(main()) is not client  # a new loop gets a new client


def test_declaration_errors() -> None:
    from pgstagechain import StageDeclarationError

    with pytest.raises(StageDeclarationError, match="http"):
        HttpStage(name="s", after="start", url="ftp://example")


ORDERS = """
CREATE TABLE orders (
    id bigint PRIMARY KEY,
    step text NOT NULL DEFAULT 'new',
    status text NOT NULL DEFAULT 'done'
)
"""


async def run_orders_through_a_flaky_service(dsn: str) -> tuple[Any, list[dict[str, Any]]]:
    """Two orders through an HttpStage declared with no retry= and no group column (what a
    user writes first), against a service that answers 503 to each order's first request."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(ORDERS)
        conn.execute("INSERT INTO orders (id) VALUES (1), (2)")
    with http_server({"/flaky": flaky}) as (base, received):
        pipeline = Pipeline("orders", table="orders", key="id", step_column="step", start="new")
        pipeline.add(HttpStage(name="notify", after="new", url=base + "/flaky", key_field="id"))
        await migrate(dsn, pipeline)
        stats = await Worker(pipeline, dsn, scan_interval=1).run_until_idle()
    return stats, received


async def test_by_default_a_503_is_retried(pgstagechain_dsn: str) -> None:
    stats, received = await run_orders_through_a_flaky_service(pgstagechain_dsn)
    assert stats.retried == 2 and stats.failed == 0 and stats.succeeded == 2
    with psycopg.connect(pgstagechain_dsn) as conn:
        assert conn.execute(
            "SELECT step, status, count(*) FROM orders GROUP BY 1, 2"
        ).fetchall() == [("notify", "done", 2)]
    assert sorted((r["body"]["id"], r["attempt"]) for r in received) == [
        (1, "1"),
        (1, "2"),
        (2, "1"),
        (2, "2"),
    ]
    # no "group": null without a group column
    assert all(r["body"] == {"id": r["body"]["id"]} for r in received)
    assert all(r["idempotency_key"] for r in received)


async def test_retries_carry_the_same_idempotency_key(pgstagechain_dsn: str) -> None:
    _stats, received = await run_orders_through_a_flaky_service(pgstagechain_dsn)
    keys: dict[int, set[str]] = {}
    for request in received:
        keys.setdefault(request["body"]["id"], set()).add(request["idempotency_key"])
    assert len(keys[1] | keys[2]) == 2  # one per order, never shared
    assert len(keys[1]) == 1 and len(keys[2]) == 1  # the same for both attempts


async def test_timeouts_and_redirects_say_what_happened() -> None:
    def slow(_body: dict[str, Any], _seen: int) -> tuple[int, Any]:
        time.sleep(1.0)
        return 200, {}

    def moved(_body: dict[str, Any], _seen: int) -> tuple[int, Any]:
        return 301, {}

    with http_server({"/slow": slow, "/moved": moved}) as (base, _received):
        ctx = StageContext(claim=_claim(), conn=None, worker_id="w")
        stage = HttpStage(name="s", after="start", url=base + "/slow", request_timeout=0.2)
        with pytest.raises(HttpRetryableError) as timed_out:
            await stage.run(ctx)
        assert "timed out: no answer within 0.2s (ReadTimeout)" in str(timed_out.value)
        stage = HttpStage(name="s", after="start", url=base + "/moved")
        with pytest.raises(HttpPermanentError) as moved_away:
            await stage.run(ctx)
        message = str(moved_away.value)
        assert "301" in message and "http://elsewhere.example/moved" in message
        assert "redirects are not followed" in message and "without a retry" in message


def _claim() -> Any:
    from pgstagechain import Claim

    return Claim(
        pipeline="p",
        stage="s",
        run_id=1,
        key=7,
        row_key="7",
        group_key=None,
        attempt=1,
        is_group=False,
    )
