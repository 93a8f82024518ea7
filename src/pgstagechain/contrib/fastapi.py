"""Run pgstagechain workers inside a FastAPI (or any ASGI) application.

The workers start with the application, in its event loop, and drain when it shuts
down: runs in flight get the worker's ``shutdown_timeout`` to finish, the rest are
handed back at once to other workers::

    from fastapi import FastAPI
    from pgstagechain.contrib.fastapi import status_router, worker_lifespan

    app = FastAPI(lifespan=worker_lifespan(pipeline, concurrency=20))
    app.include_router(status_router(pipeline), prefix="/pipelines")

The switch ``PGSTAGECHAIN_WORKER_ENABLED`` (``1/true/yes/on`` or ``0/false/no/off``,
default on) turns the workers off for replicas that should only serve requests, the
way the seed system's ``ENABLE_JOB_STATE_LISTENER`` did. The database comes from the
``dsn`` argument, else ``PGSTAGECHAIN_DSN``, else libpq's defaults (``PGHOST``, ...).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel

from .._connect import connect
from .._pipeline import Pipeline
from .._worker import Worker
from ..errors import ConfigurationError
from ._embed import ENV_DSN, Pipelines, as_pipelines, default_dsn, run_workers
from ._status import STATUS_WINDOW, ManualRun, pipeline_status, run_stage

__all__ = [
    "ENV_DSN",
    "ENV_ENABLED",
    "run_workers",
    "status_router",
    "worker_enabled",
    "worker_lifespan",
]

logger = logging.getLogger("pgstagechain.contrib.fastapi")

ENV_ENABLED = "PGSTAGECHAIN_WORKER_ENABLED"
TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})

Lifespan = Callable[[Any], AbstractAsyncContextManager[Any]]


def worker_enabled(default: bool = True) -> bool:
    """Read ``PGSTAGECHAIN_WORKER_ENABLED``; ``default`` when it is unset or empty."""
    value = os.environ.get(ENV_ENABLED, "")
    if not value.strip():
        return default
    if value.strip().lower() in TRUE:
        return True
    if value.strip().lower() in FALSE:
        return False
    raise ConfigurationError(
        f"{ENV_ENABLED} must be one of 1/0, true/false, yes/no, on/off: {value!r}"
    )


def worker_lifespan(
    pipelines: Pipelines,
    dsn: str | None = None,
    *,
    enabled: bool | None = None,
    migrate: bool = False,
    lifespan: Lifespan | None = None,
    **worker_options: Any,
) -> Callable[[Any], AbstractAsyncContextManager[Any]]:
    """A lifespan for ``FastAPI(lifespan=...)`` / ``Starlette(lifespan=...)`` that runs workers.

    :param enabled: run the workers at all; None reads ``PGSTAGECHAIN_WORKER_ENABLED``
        (default on) when the application starts.
    :param lifespan: the application's own lifespan; it is entered first and left
        last, so whatever it sets up is there for the stages while they run. Its state
        (if it yields a mapping) is passed on unchanged.
    :param worker_options: passed to every :class:`~pgstagechain.Worker` (``concurrency``,
        ``shutdown_timeout``, ``stages``, ...).

    The running workers are at ``app.state.pgstagechain_workers`` (an empty list when
    disabled), where :func:`status_router` finds them.
    """
    chosen = as_pipelines(pipelines)

    @asynccontextmanager
    async def combined(app: Any) -> AsyncIterator[Any]:
        async with _inner(app) as state:
            on = worker_enabled() if enabled is None else enabled
            if not on:
                logger.info("pgstagechain workers disabled (%s)", ENV_ENABLED)
                _publish(app, [])
                yield state
                return
            async with run_workers(chosen, dsn, migrate=migrate, **worker_options) as workers:
                _publish(app, workers)
                yield state

    def _inner(app: Any) -> AbstractAsyncContextManager[Any]:
        return lifespan(app) if lifespan is not None else _nothing()

    return combined


@asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield None


def _publish(app: Any, workers: list[Worker]) -> None:
    state = getattr(app, "state", None)
    if state is not None:
        state.pgstagechain_workers = workers


class RunRequest(BaseModel):
    """Body of the manual run endpoint: the row's key (the group key for a group stage)."""

    key: int | str


def status_router(
    pipelines: Pipelines,
    dsn: str | None = None,
    *,
    manual: bool = False,
    window: float = STATUS_WINDOW,
) -> APIRouter:
    """Routes that report the pipelines' state as JSON, mount with ``prefix=...``:

    * ``GET /`` every pipeline's status and the workers running in this process;
    * ``GET /{pipeline}`` one pipeline: per stage, rows waiting / running / done /
      failed, and its runs of the last ``window`` seconds;
    * with ``manual=True``, ``POST /{pipeline}/stages/{stage}/run`` with ``{"key": ...}``
      claims that row for the stage, runs the handler in the request and completes it
      (409 when the row is not waiting for that stage). Protect it like any admin route.
    """
    chosen = {p.name: p for p in as_pipelines(pipelines)}
    router = APIRouter(tags=["pgstagechain"])

    def find(name: str) -> Pipeline:
        try:
            return chosen[name]
        except KeyError:
            raise HTTPException(404, f"no pipeline {name!r}") from None

    async def statuses(names: Iterable[str]) -> list[dict[str, Any]]:
        async with await connect(default_dsn(dsn), autocommit=True) as conn:
            return [await pipeline_status(conn, chosen[n], window=window) for n in names]

    @router.get("/")
    async def allas_pipelines(request: Request) -> dict[str, Any]:
        workers: list[Worker] = getattr(request.app.state, "pgstagechain_workers", [])
        return {
            "pipelines": await statuses(chosen),
            "workers": [_worker_info(w) for w in workers],
        }

    @router.get("/{pipeline}")
    async def one_pipeline(pipeline: str) -> dict[str, Any]:
        return (await statuses([find(pipeline).name]))[0]

    if manual:

        @router.post("/{pipeline}/stages/{stage}/run")
        async def run_by_hand(pipeline: str, stage: str, body: RunRequest) -> dict[str, Any]:
            found = find(pipeline)
            if stage not in found:
                raise HTTPException(404, f"pipeline {pipeline!r} has no stage {stage!r}")
            done = await run_stage(
                default_dsn(dsn), found, stage, body.key, worker_id="http-manual"
            )
            if done.outcome == "not_claimed":
                raise HTTPException(409, f"{body.key!r} is not waiting for stage {stage!r}")
            return _manual(done)

    return router


def _manual(done: ManualRun) -> dict[str, Any]:
    return {
        "outcome": done.outcome,
        "run_id": done.run_id,
        "attempt": done.attempt,
        "result": done.result,
        "error": done.error,
    }


def _worker_info(worker: Worker) -> dict[str, Any]:
    stats: Mapping[str, int] = {
        k: getattr(worker.stats, k)
        for k in ("claimed", "succeeded", "failed", "retried", "rescued", "db_errors")
    }
    return {
        "pipeline": worker.pipeline.name,
        "worker_id": worker.worker_id,
        "stages": [s.name for s in worker.served],
        "in_flight": worker.in_flight,
        "listening": bool(worker.listener and worker.listener.connected.is_set()),
        "stats": dict(stats),
    }
