"""The FastAPI integration: workers in a real app served by uvicorn on 127.0.0.1."""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import psycopg
import pytest
from fastapi import Depends, FastAPI, Request

from pgstagechain import NotInstalledError, Pipeline, migrate
from pgstagechain.contrib.fastapi import (
    ENV_ENABLED,
    status_router,
    worker_enabled,
    worker_lifespan,
)
from tests.apps.seed import add_jobs, create_tables, seed_pipeline
from tests.helpers import uvicorn_serving as serve
from tests.helpers import wait_for

pytestmark = pytest.mark.anyio

DEADLINE = 60.0  # a bound for a test that hangs, never a speed assertion


def stage_counts(status: dict[str, Any]) -> dict[str, tuple[int, int, int, int]]:
    return {
        s["name"]: (s["waiting"], s["running"], s["done"], s["failed"]) for s in status["stages"]
    }


def test_chain_completes_while_the_app_serves(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)

    async def handler(ctx: Any) -> dict[str, Any]:
        return {"stage": ctx.stage, "key": str(ctx.key)}

    pipeline = seed_pipeline(handler)
    anyio.run(migrate, pgstagechain_dsn, pipeline)

    @asynccontextmanager
    async def own(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        yield {"greeting": "hello"}  # the app's own lifespan state passes through

    app = FastAPI(
        lifespan=worker_lifespan(pipeline, pgstagechain_dsn, lifespan=own, scan_interval=1)
    )
    app.include_router(status_router(pipeline, pgstagechain_dsn), prefix="/pipelines")

    @app.get("/hello")
    async def hello(request: Request) -> dict[str, str]:
        return {"greeting": request.state.greeting}

    with serve(app) as (base, _server), httpx.Client(base_url=base) as client:
        assert client.get("/hello").json() == {"greeting": "hello"}
        add_jobs(pgstagechain_dsn, jobs=2, variants=3)  # released while the app serves

        def finished() -> dict[str, Any] | None:
            status = client.get("/pipelines/feedly").json()
            counts = stage_counts(status)
            return status if counts["instagram_feed_gen"][2] == 2 else None

        status = wait_for(finished)
        counts = stage_counts(status)
        assert counts["iou_eval"] == (0, 0, 6, 0)  # rows sit at the last row stage
        assert counts["vlm_analyze"] == (0, 0, 6, 0)  # all went through; none waits
        assert counts["ad_copy_gen_kor"] == (0, 0, 2, 0)  # both groups went on past it
        assert status["stages"][0]["runs"]["succeeded"] == 6
        overview = client.get("/pipelines/").json()
        (worker,) = overview["workers"]
        assert worker["pipeline"] == "feedly" and worker["listening"] is True
        assert worker["stats"]["succeeded"] == 6 * 8 + 2 * 2
        assert client.get("/pipelines/nope").status_code == 404
    with psycopg.connect(pgstagechain_dsn) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pgstagechain.runs WHERE state <> 'succeeded'"
        ).fetchone() == (0,)


def test_shutdown_drains_the_run_in_flight(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    pipeline = Pipeline("drain", table="jobs_variants", key="job_variants_id", start="img_gen")
    shutting_down = anyio.Event()
    entered = threading.Event()

    @pipeline.stage(after="img_gen")
    async def first(ctx: Any) -> str:
        entered.set()
        await shutting_down.wait()  # still running when the app begins to shut down
        return "finished during shutdown"

    @pipeline.stage(after="first")
    async def second(ctx: Any) -> None:
        raise AssertionError("a draining worker claims nothing new")

    anyio.run(migrate, pgstagechain_dsn, pipeline)
    inner = worker_lifespan(pipeline, pgstagechain_dsn, shutdown_timeout=DEADLINE)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with inner(app):
            yield
            shutting_down.set()  # runs at shutdown, just before the workers drain

    app = FastAPI(lifespan=lifespan)
    with serve(app):
        add_jobs(pgstagechain_dsn, jobs=1, variants=1)
        assert entered.wait(DEADLINE)
        workers = app.state.pgstagechain_workers
    (worker,) = workers
    assert worker.stats.succeeded == 1 and worker.in_flight == 0
    with psycopg.connect(pgstagechain_dsn) as conn:
        assert conn.execute("SELECT current_step, status FROM jobs_variants").fetchall() == [
            ("first", "done")
        ]
        assert conn.execute("SELECT stage, state, result FROM pgstagechain.runs").fetchall() == [
            ("first", "succeeded", "finished during shutdown")
        ]


async def test_switched_off_by_environment(
    pgstagechain_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_tables(pgstagechain_dsn)
    calls: list[Any] = []
    pipeline = seed_pipeline(calls.append, name="off")
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=1)
    app = FastAPI()
    monkeypatch.setenv(ENV_ENABLED, "false")
    async with worker_lifespan(pipeline, pgstagechain_dsn)(app):
        assert app.state.pgstagechain_workers == []
    assert calls == []
    monkeypatch.setenv(ENV_ENABLED, "maybe")
    with pytest.raises(ValueError, match=ENV_ENABLED):
        worker_enabled()
    monkeypatch.delenv(ENV_ENABLED)
    assert worker_enabled() is True


async def test_an_uninstalled_pipeline_fails_startup(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    pipeline = seed_pipeline(lambda ctx: None, name="missing")
    with pytest.raises(NotInstalledError):
        async with worker_lifespan(pipeline, pgstagechain_dsn)(FastAPI()):
            raise AssertionError("must not start")
    # migrate=True installs it at startup instead
    async with worker_lifespan(pipeline, pgstagechain_dsn, migrate=True)(app := FastAPI()):
        (worker,) = app.state.pgstagechain_workers
        assert worker.listener is not None and worker.listener.connected.is_set()


async def test_drive_a_stage_by_hand(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    pipeline = Pipeline(
        "manual",
        table="jobs_variants",
        key="job_variants_id",
        extra_columns=["tenant_id"],
        start="img_gen",
    )

    @pipeline.stage(after="img_gen")
    def analyze(ctx: Any) -> dict[str, Any]:  # a sync stage writing on its own connection
        ctx.conn.execute(
            "UPDATE jobs_variants SET updated_at = '2000-01-01' WHERE job_variants_id = %s",
            (ctx.key,),
        )
        return {"tenant": ctx.row["tenant_id"]}

    @pipeline.stage(after="analyze")
    async def judge(ctx: Any) -> Any:
        if ctx.key == 102:
            raise RuntimeError("judge is unhappy")
        return {"seen": ctx.results["analyze"]}

    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=2)
    app = FastAPI()
    app.include_router(
        status_router(pipeline, pgstagechain_dsn, manual=True, dependencies=[Depends(allow)]),
        prefix="/p",
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        reply = await client.post("/p/manual/stages/judge/run", json={"key": 101})
        assert reply.status_code == 409  # not at (analyze, done) yet
        for key in (101, 102):
            reply = await client.post("/p/manual/stages/analyze/run", json={"key": key})
            assert reply.status_code == 200
            assert reply.json()["outcome"] == "succeeded"
            assert reply.json()["result"] == {"tenant": "tenant-1"}
        reply = await client.post("/p/manual/stages/analyze/run", json={"key": 101})
        assert reply.status_code == 409  # done already: exactly one run
        reply = await client.post("/p/manual/stages/judge/run", json={"key": 101})
        assert reply.json()["result"] == {"seen": {"tenant": "tenant-1"}}
        reply = await client.post("/p/manual/stages/judge/run", json={"key": 102})
        assert reply.json()["outcome"] == "failed"
        assert reply.json()["error"] == "RuntimeError"  # the text stays in pgstagechain.runs
        status = (await client.get("/p/manual")).json()
        assert stage_counts(status) == {"analyze": (0, 0, 2, 0), "judge": (0, 0, 1, 1)}
        assert status["stages"][1]["runs"]["failed"] == 1
        assert (await client.post("/p/manual/stages/nope/run", json={"key": 1})).status_code == 404
    with psycopg.connect(pgstagechain_dsn) as conn:
        assert conn.execute(
            "SELECT count(*) FROM jobs_variants WHERE updated_at = '2000-01-01'"
        ).fetchone() == (2,)


async def allow() -> None:
    """An auth dependency that lets everyone in, for tests of what the routes do."""


def test_the_example_app(pgstagechain_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    monkeypatch.setenv("PGSTAGECHAIN_DSN", pgstagechain_dsn)
    monkeypatch.setenv("ADMIN_TOKEN", "t0ken")
    monkeypatch.setenv("MODELS_URL", f"http://127.0.0.1:{sock.getsockname()[1]}/models")
    monkeypatch.delitem(sys.modules, "examples.fastapi_app.app", raising=False)
    example = importlib.import_module("examples.fastapi_app.app")
    admin = {"Authorization": "Bearer t0ken"}
    with serve(example.app, sock) as (base, _server), httpx.Client(base_url=base) as client:
        assert client.post("/jobs", json={"job_id": 4, "variants": 2}).status_code == 201
        assert client.get("/pipelines/feedly").status_code == 401

        def finished() -> dict[str, Any] | None:
            status = client.get("/pipelines/feedly", headers=admin).json()
            return status if stage_counts(status)["instagram_feed_gen"][2] == 1 else None

        wait_for(finished)
    with psycopg.connect(pgstagechain_dsn) as conn:
        (judged,) = conn.execute(
            "SELECT result FROM pgstagechain.runs WHERE stage = 'vlm_judge' AND row_key = '402'"
        ).fetchone() or (None,)
        assert judged["received"] == {
            "job_variants_id": 402,
            "job_id": "4",
            "tenant_id": "demo",
            "overlay_id": "ov-402",
        }
