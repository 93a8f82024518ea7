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
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from .. import ConfigurationError, Worker
from .._connect import ENV_DSN
from ._embed import Pipelines, as_pipelines, run_elected_workers, run_workers
from ._fastapi_dashboard import dashboard_router as dashboard_router
from ._fastapi_status import RunRequest as RunRequest
from ._fastapi_status import status_router as status_router

__all__ = [
    "ENV_DSN",
    "ENV_ENABLED",
    "dashboard_router",
    "run_elected_workers",
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
    single: bool = False,
    lifespan: Lifespan | None = None,
    **worker_options: Any,
) -> Callable[[Any], AbstractAsyncContextManager[Any]]:
    """A lifespan for ``FastAPI(lifespan=...)`` / ``Starlette(lifespan=...)`` that runs workers.

    :param enabled: run the workers at all; None reads ``PGSTAGECHAIN_WORKER_ENABLED``
        (default on) when the application starts.
    :param single: run the workers in one process only of all those serving the app
        (``uvicorn --workers N``, replicas): see :func:`run_elected_workers`. Each
        other process then holds a single connection for the election.
    :param lifespan: the application's own lifespan; it is entered first and left
        last, so whatever it sets up is there for the stages while they run. Its state
        (if it yields a mapping) is passed on unchanged.
    :param worker_options: passed to every :class:`~pgstagechain.Worker` (``concurrency``,
        ``pool_size``, ``startup_timeout``, ``shutdown_timeout``, ``stages``, ...).
        A worker opens at most ``Worker.max_connections`` connections: 4, plus
        ``pool_size`` (default ``min(concurrency, 10)``) for stages with
        ``connection=True``, twice that when some of them are plain functions.

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
            run = run_elected_workers if single else run_workers
            async with run(chosen, dsn, migrate=migrate, **worker_options) as workers:
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
