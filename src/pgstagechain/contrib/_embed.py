"""Running workers inside another program's event loop (an ASGI app, a management command)."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import anyio
import anyio.abc

from .. import ConfigurationError, DatabaseAccessError, PgStageChainError, Pipeline, Worker
from .. import migrate as install
from .._connect import DB_ERRORS, access_problem, connect, default_dsn, redact
from .._sql import plain
from ..http import aclose_client

logger = logging.getLogger("pgstagechain.contrib")

Pipelines = Pipeline | Iterable[Pipeline]


def as_pipelines(pipelines: Pipelines) -> list[Pipeline]:
    found = [pipelines] if isinstance(pipelines, Pipeline) else list(pipelines)
    if not found:
        raise ConfigurationError("no pipeline given")
    if len({p.name for p in found}) != len(found):
        raise ConfigurationError("pipelines are listed twice")
    return found


class _SignalHook:
    """While armed, SIGTERM and SIGINT also call ``callback`` on the event loop, after the
    host's own handler (uvicorn's, say) has run.

    A host server notes a signal that arrives during the application's start-up or
    shutdown but acts on it only when that is over: this makes the signal cut a worker's
    start-up (a database that does not answer) or drain short instead of being ignored.
    Only a handler the host installed is chained; without one the signal keeps its
    default effect (the process ends).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}
        self.received: int | None = None

    def arm(self, callback: Callable[[], object]) -> None:
        self.disarm()
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio (trio): the host handles its signals itself
            return
        for signum in self.SIGNALS:
            previous = signal.getsignal(signum)
            if not callable(previous):
                continue

            def handler(
                signum: int, frame: FrameType | None, previous: Callable[..., Any] = previous
            ) -> None:
                self.received = signum
                previous(signum, frame)
                loop.call_soon_threadsafe(callback)

            self.previous[signum] = previous
            signal.signal(signum, handler)

    def disarm(self) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
        self.previous.clear()

    def describe(self) -> str:
        return signal.Signals(self.received).name if self.received else "a signal"


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
                    # At start-up the error is raised to the caller; later, this is the
                    # only word of it (the application goes on without the worker).
                    if self.ready.is_set():
                        name = self.worker.pipeline.name
                        if isinstance(exc, PgStageChainError):
                            logger.error("pgstagechain worker of %r stopped: %s", name, exc)
                        else:
                            logger.exception("pgstagechain worker of %r stopped", name)
                tg.cancel_scope.cancel()
        finally:
            self.running = False
            self.ready.set()

    async def _announce(self) -> None:
        await self.worker.wait_started()
        logger.info("started %s", self.worker.describe())
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
    cannot start (a login refused, a pipeline not installed, a database still
    unreachable after the workers' ``startup_timeout``) raises here. On exit the
    workers stop claiming and drain. ``migrate`` installs the schema and the pipelines
    first (handy for development; production runs ``pgstagechain migrate``).

    Under a server that handles SIGTERM and SIGINT itself (uvicorn), such a signal
    during the start-up or the drain cuts it short rather than waiting for it.
    """
    chosen = as_pipelines(pipelines)
    conninfo = default_dsn(dsn)
    if migrate:
        await install(conninfo, *chosen)
    runners = [_Runner(Worker(p, conninfo, **worker_options)) for p in chosen]
    failed: BaseException | None = None
    signals = _SignalHook()
    try:
        async with anyio.create_task_group() as tg:
            for runner in runners:
                tg.start_soon(runner.run)
            with anyio.CancelScope() as starting:
                signals.arm(starting.cancel)
                for runner in runners:
                    await runner.ready.wait()
                    if runner.error is not None:
                        failed = runner.error
                        break
            signals.disarm()
            if starting.cancelled_caught:
                failed = PgStageChainError(
                    f"pgstagechain workers' start-up interrupted by {signals.describe()}"
                )
                tg.cancel_scope.cancel()
            if failed is None:
                try:
                    yield [r.worker for r in runners]
                finally:
                    for runner in runners:
                        runner.worker.stop()
                    # The drain runs as the task group closes: a signal now ends it.
                    signals.arm(tg.cancel_scope.cancel)
            else:
                for runner in runners:
                    runner.worker.stop()
    finally:
        signals.disarm()
        with anyio.CancelScope(shield=True):
            await aclose_client()
    if failed is not None:
        raise failed
    for runner in runners:
        logger.info("worker %s drained: %s", runner.worker.worker_id, runner.worker.stats)


@asynccontextmanager
async def run_elected_workers(
    pipelines: Pipelines,
    dsn: str | None = None,
    *,
    migrate: bool = False,
    retry_interval: float = 5.0,
    **worker_options: Any,
) -> AsyncIterator[list[Worker]]:
    """Like :func:`run_workers`, but in one process only of all those that run this with
    the same pipelines on the same database (``uvicorn --workers N``, several replicas).

    Each process holds one connection and tries a session advisory lock every
    ``retry_interval`` seconds; the one holding it runs the workers (the list yielded
    is filled then, and emptied if it lets go). When that process stops or loses its
    connection, another one takes over. The first attempt happens before the block
    starts, so a database that refuses us fails here, in every process. Two processes
    may both run workers for a moment around a takeover: claims stay atomic.
    """
    chosen = as_pipelines(pipelines)
    conninfo = default_dsn(dsn)
    lock = "pgstagechain.workers:" + ",".join(sorted(p.name for p in chosen))
    workers: list[Worker] = []
    leaving = anyio.Event()

    async def pause() -> None:
        with anyio.move_on_after(retry_interval):
            await leaving.wait()

    async def lead(conn: Any, announce: Callable[[], None]) -> None:
        async with run_workers(chosen, conninfo, migrate=migrate, **worker_options) as started:
            workers[:] = started
            announce()
            logger.info("this process runs the pgstagechain workers (%s)", lock)
            while not leaving.is_set():
                await pause()
                await conn.execute(plain("liveness"))  # still holding the lock?
        workers.clear()

    async def campaign(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        first = True

        def announce() -> None:
            nonlocal first
            if first:
                first = False
                task_status.started()

        while not leaving.is_set():
            try:
                async with await connect(
                    conninfo, autocommit=True, application_name="pgstagechain-election"
                ) as conn:
                    while not leaving.is_set():
                        cur = await conn.execute(plain("try_session_lock"), {"lock": lock})
                        found = await cur.fetchone()
                        if found and found[0]:
                            await lead(conn, announce)
                        else:
                            announce()  # another process leads: this one serves requests
                            await pause()
            except Exception as exc:
                if first:
                    problem = access_problem(exc)
                    if problem is not None:
                        raise DatabaseAccessError(problem, redact(conninfo)) from None
                    raise
                workers.clear()
                kind = "connection lost" if isinstance(exc, DB_ERRORS) else "stopped"
                logger.warning("pgstagechain workers' election: %s (%s); retrying", kind, exc)
                await pause()

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(campaign)
            try:
                yield workers
            finally:
                leaving.set()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:  # the failure itself, not the task group's wrapper
            raise group.exceptions[0] from None
        raise
