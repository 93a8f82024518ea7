"""The status router: a pipeline's figures as JSON behind the app's own auth, read through
a small pool with a brief cache, and (when asked) a route that runs a stage by hand."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import psycopg
from fastapi import APIRouter, Depends, HTTPException, Request, params
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout, TooManyRequests
from pydantic import BaseModel, StrictInt, StrictStr

from .. import ConfigurationError, Pipeline, Worker
from .._connect import ReadPool, default_dsn
from ._embed import Pipelines, as_pipelines
from ._status import STATUS_WINDOW, ManualRun, key_type, parse_key, pipeline_status, run_stage

logger = logging.getLogger("pgstagechain.contrib.fastapi")


class RunRequest(BaseModel):
    """Body of the manual run endpoint: the row's key (the group key for a group stage)."""

    key: StrictInt | StrictStr


class _Statuses:
    """Status reads through a small pool of their own, each pipeline's cached for a moment
    and read by one request at a time: a burst of requests costs one query per pipeline,
    and at most ``pool_size`` connections, whatever the burst."""

    def __init__(
        self,
        pipelines: Mapping[str, Pipeline],
        dsn: str | None,
        *,
        window: float,
        pool_size: int,
        cache_seconds: float,
        wait: float,
    ) -> None:
        self.pipelines = pipelines
        self.dsn = dsn
        self.window = window
        self.pool_size = pool_size
        self.cache_seconds = cache_seconds
        self.wait = wait
        self._reads = ReadPool(dsn, size=pool_size, wait=wait, name="pgstagechain-status")
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self.writes = anyio.CapacityLimiter(pool_size)

    async def pool(self) -> AsyncConnectionPool[AsyncConnection[Any]]:
        return await self._reads.get()

    async def close(self) -> None:
        await self._reads.close()

    async def status(self, name: str) -> dict[str, Any]:
        """The pipeline's status, at most ``cache_seconds`` old; 503 when not to be had
        within ``wait`` seconds."""
        try:
            with anyio.fail_after(self.wait):
                lock = self._locks.setdefault(name, anyio.Lock())
                async with lock:
                    hit = self._cache.get(name)
                    if hit is not None and hit[0] > time.monotonic():
                        return hit[1]
                    pool = await self.pool()
                    async with pool.connection() as conn:
                        found = await pipeline_status(
                            conn, self.pipelines[name], window=self.window
                        )
                    self._cache[name] = (time.monotonic() + self.cache_seconds, found)
                    return found
        except (TimeoutError, PoolTimeout, TooManyRequests, psycopg.OperationalError) as exc:
            logger.warning("pipeline status of %s unavailable: %s", name, exc)
            raise _unavailable("pipeline status unavailable, try again shortly") from None


def _unavailable(detail: str) -> HTTPException:
    return HTTPException(503, detail, headers={"Retry-After": "1"})


def _json_only(request: Request) -> None:
    """Refuse a write that is not ``application/json``: a browser sends other types from
    any site without asking first (a "simple" cross-site request)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise HTTPException(415, "send the body as application/json")


def status_router(
    pipelines: Pipelines,
    dsn: str | None = None,
    *,
    dependencies: Sequence[params.Depends] | None = None,
    manual: bool = False,
    details: bool = False,
    window: float = STATUS_WINDOW,
    pool_size: int = 2,
    cache_seconds: float = 2.0,
    wait: float = 5.0,
) -> APIRouter:
    """Routes that report the pipelines' state as JSON, mount with ``prefix=...``:

    * ``GET /`` every pipeline's status and the workers running in this process;
    * ``GET /{pipeline}`` one pipeline: :func:`pgstagechain.admin.status` as JSON (per
      stage, rows waiting / running / retrying / done / failed, and its runs of the last
      ``window`` seconds);
    * with ``manual=True``, ``POST /{pipeline}/stages/{stage}/run`` with ``{"key": ...}``
      claims that row for the stage, runs the handler in the request and completes it
      (409 when the row is not waiting for that stage).

    :param dependencies: FastAPI dependencies run before every route, to authenticate
        and authorise the caller (``[Depends(require_admin)]``); required with ``manual``.
    :param details: also show the table's name and the workers' ids (host:pid).
    :param pool_size: connections the routes use at most (their own small pool).
    :param cache_seconds: how long one pipeline's status is reused.
    :param wait: seconds a request waits for a connection before a 503.
    """
    chosen = {p.name: p for p in as_pipelines(pipelines)}
    if manual and not dependencies:
        raise ConfigurationError(
            "status_router(manual=True) lets callers run stages: pass "
            "dependencies=[Depends(...)] that authenticates them"
        )
    if pool_size < 1 or wait <= 0 or cache_seconds < 0:
        raise ConfigurationError("pool_size and wait must be positive, cache_seconds >= 0")
    reads = _Statuses(
        chosen, dsn, window=window, pool_size=pool_size, cache_seconds=cache_seconds, wait=wait
    )

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await reads.close()

    router = APIRouter(
        tags=["pgstagechain"], dependencies=list(dependencies or []), lifespan=lifespan
    )

    def find(name: str) -> Pipeline:
        try:
            return chosen[name]
        except KeyError:
            raise HTTPException(404, f"no pipeline {name!r}") from None

    async def shown(name: str) -> dict[str, Any]:
        found = await reads.status(name)
        return found if details else {k: v for k, v in found.items() if k != "table"}

    @router.get("/")
    async def all_pipelines(request: Request) -> dict[str, Any]:
        workers: list[Worker] = getattr(request.app.state, "pgstagechain_workers", [])
        return {
            "pipelines": [await shown(name) for name in chosen],
            "workers": [_worker_info(w, details=details) for w in workers],
        }

    @router.get("/{pipeline}")
    async def one_pipeline(pipeline: str) -> dict[str, Any]:
        return await shown(find(pipeline).name)

    if manual:

        @router.post("/{pipeline}/stages/{stage}/run", dependencies=[Depends(_json_only)])
        async def run_by_hand(pipeline: str, stage: str, body: RunRequest) -> dict[str, Any]:
            found = find(pipeline)
            if stage not in found:
                raise HTTPException(404, f"pipeline {pipeline!r} has no stage {stage!r}")
            try:
                with anyio.fail_after(wait):
                    await reads.writes.acquire()
            except TimeoutError:
                raise _unavailable("too many manual runs at once, try again shortly") from None
            try:
                return await _run_by_hand(reads, found, stage, body.key)
            finally:
                reads.writes.release()

    return router


async def _run_by_hand(
    reads: _Statuses, pipeline: Pipeline, stage: str, key: Any
) -> dict[str, Any]:
    try:
        pool = await reads.pool()
        async with pool.connection() as conn:
            type_name, category = await key_type(conn, pipeline, stage)
        try:
            value = parse_key(key, type_name, category)
        except ValueError as exc:
            raise HTTPException(422, f"invalid key: {exc}") from None
        done = await run_stage(
            default_dsn(reads.dsn), pipeline, stage, value, worker_id="http-manual"
        )
    except psycopg.DataError as exc:
        raise HTTPException(422, f"invalid key for {pipeline.name}.{stage}") from exc
    except (PoolTimeout, TooManyRequests, psycopg.OperationalError) as exc:
        logger.warning("manual run of %s.%s failed: %s", pipeline.name, stage, exc)
        raise _unavailable("database unavailable, try again shortly") from None
    if done.outcome == "not_claimed":
        raise HTTPException(409, f"{key!r} is not waiting for stage {stage!r}")
    return _manual(done)


def _manual(done: ManualRun) -> dict[str, Any]:
    """What the caller learns: the outcome, never the error's text (it may carry internal
    URLs, answers of other services or data): that stays in ``pgstagechain.runs``."""
    return {
        "outcome": done.outcome,
        "run_id": done.run_id,
        "attempt": done.attempt,
        "result": done.result,
        "error": done.error.split(":", 1)[0] if done.error else None,
    }


def _worker_info(worker: Worker, *, details: bool) -> dict[str, Any]:
    stats: Mapping[str, int] = {
        k: getattr(worker.stats, k)
        for k in ("claimed", "succeeded", "failed", "retried", "rescued", "db_errors")
    }
    info: dict[str, Any] = {
        "pipeline": worker.pipeline.name,
        "stages": [s.name for s in worker.served],
        "in_flight": worker.in_flight,
        "listening": bool(worker.listener and worker.listener.connected.is_set()),
        "stats": dict(stats),
    }
    if details:
        info["worker_id"] = worker.worker_id
    return info
