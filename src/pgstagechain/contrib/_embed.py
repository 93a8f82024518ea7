"""Running workers inside another program's event loop (an ASGI app, a management command)."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import anyio

from .._install import migrate as install
from .._pipeline import Pipeline
from .._worker import Worker, describe
from ..errors import ConfigurationError
from ..http import aclose_client

logger = logging.getLogger("pgstagechain.contrib")

ENV_DSN = "PGSTAGECHAIN_DSN"

Pipelines = Pipeline | Iterable[Pipeline]


def as_pipelines(pipelines: Pipelines) -> list[Pipeline]:
    found = [pipelines] if isinstance(pipelines, Pipeline) else list(pipelines)
    if not found:
        raise ConfigurationError("no pipeline given")
    if len({p.name for p in found}) != len(found):
        raise ConfigurationError("pipelines are listed twice")
    return found


def default_dsn(dsn: str | None) -> str:
    return dsn if dsn is not None else os.environ.get(ENV_DSN, "")


class _Runner:
    """One worker under the application's task group; its failure is logged, not fatal."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.ready = anyio.Event()
        self.error: BaseException | None = None
        self.running = False

    async def run(self) -> None:
        self.running = True
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._announce)
                try:
                    await self.worker.run()
                except Exception as exc:
                    self.error = exc
                    logger.exception("pgstagechain worker of %r stopped", self.worker.pipeline.name)
                tg.cancel_scope.cancel()
        finally:
            self.running = False
            self.ready.set()

    async def _announce(self) -> None:
        await self.worker.wait_started()
        logger.info("started %s", describe(self.worker))
        self.ready.set()


@asynccontextmanager
async def run_workers(
    pipelines: Pipelines,
    dsn: str | None = None,
    *,
    migrate: bool = False,
    **worker_options: Any,
) -> AsyncIterator[list[Worker]]:
    """Run one :class:`~pgstagechain.Worker` per pipeline for the duration of the block.

    The block starts once every worker is connected (and listening); a worker that
    cannot start (pipeline not installed, database unreachable) raises here. On exit
    the workers stop claiming and drain. ``migrate`` installs the schema and the
    pipelines first (handy for development; production runs ``pgstagechain migrate``).
    """
    chosen = as_pipelines(pipelines)
    conninfo = default_dsn(dsn)
    if migrate:
        await install(conninfo, *chosen)
    runners = [_Runner(Worker(p, conninfo, **worker_options)) for p in chosen]
    failed: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            for runner in runners:
                tg.start_soon(runner.run)
            for runner in runners:
                await runner.ready.wait()
                if runner.error is not None:
                    failed = runner.error
                    break
            if failed is None:
                try:
                    yield [r.worker for r in runners]
                finally:
                    for runner in runners:
                        runner.worker.stop()
            else:
                for runner in runners:
                    runner.worker.stop()
    finally:
        with anyio.CancelScope(shield=True):
            await aclose_client()
    if failed is not None:
        raise failed
    for runner in runners:
        logger.info("worker %s drained: %s", runner.worker.worker_id, runner.worker.stats)
