"""The worker: a listener, a dispatcher, a run executor, a completion batcher, a lease
keeper and a recovery probe, composed.

One event loop task dispatches: it turns notifications (and scan results) into batched
claims within the concurrency limits, and starts one task per claimed run. Completions
of runs that did not use their connection are committed in batches; the others commit
in the handler's own transaction. A heartbeat renews the leases of every live run in one
statement; a probe re-drives whatever a lost notification or a dead worker left; with a
retention, a periodic pass deletes finished runs past their window.
"""

from __future__ import annotations

import logging
import os
import random
import socket
from collections.abc import Iterable, Mapping, Sequence

import anyio
import anyio.lowlevel

from ._batcher import COMPLETERS, CompletionBatcher
from ._claim import DEFAULT_LEASE, Claimer
from ._connect import conninfo_with_defaults, redact
from ._context import Claim
from ._dispatch import Dispatcher, Wake
from ._execute import RunExecutor, RunObserver
from ._hints import Hints
from ._joining import Joining
from ._leases import LeaseKeeper
from ._links import DB_ERRORS, HandlerConnections, Link
from ._listener import Listener
from ._membership import listened_channels
from ._pipeline import Pipeline
from ._prune import RetentionKeeper
from ._recovery import WorkerScan
from ._runs import LiveRuns, WorkerStats
from ._stage import Stage
from ._startup import check_settings, served_stages, start_up
from .errors import (
    DatabaseAccessError,
    NotInstalledError,
    found_in,
)

logger = logging.getLogger("pgstagechain.worker")


class Worker:
    """Run a pipeline's stages: ``await worker.run()`` until stopped, or ``run_until_idle()``.

    :param pipeline: the stages to run.
    :param conninfo: a libpq connection string or URI ("" uses libpq's defaults).
    :param stages: names of the stages this worker serves (default: all), so a GPU pool
        and a CPU pool can serve different stages of one pipeline.
    :param concurrency: runs in flight at once, over all stages.
    :param stage_limits: a per-stage cap on runs in flight, over ``Stage.concurrency``.
    :param lease: seconds a claim stays ours without a heartbeat.
    :param scan_interval: seconds between recovery scans (also done after every re-LISTEN).
    :param listen: False for poll-only mode behind a transaction pooler (no LISTEN there):
        the scan then runs every ``poll_interval`` seconds.
    :param pool_size: connections for handlers of stages with ``connection=True``
        (default ``min(concurrency, 10)``), each checked out on a handler's first read of
        ``ctx.conn``; also the most async handlers of such stages in flight at once. See
        :attr:`max_connections`.
    :param startup_timeout: seconds to wait for an unreachable database at start-up
        (it may be restarting) before :class:`~pgstagechain.StartupTimeoutError`; None
        waits for ever. A refusal that retrying cannot fix (wrong password, no such
        database or role, no privilege) raises :class:`~pgstagechain.DatabaseAccessError`
        at once, at start-up or later.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        conninfo: str = "",
        *,
        stages: Iterable[str] | None = None,
        concurrency: int = 10,
        stage_limits: Mapping[str, int] | None = None,
        worker_id: str | None = None,
        lease: float = DEFAULT_LEASE,
        batch_size: int = 100,
        pool_size: int | None = None,
        scan_interval: float = 10.0,
        probe_interval: float = 10.0,
        shutdown_timeout: float = 30.0,
        listen: bool = True,
        poll_interval: float = 1.0,
        max_pending: int = 10_000,
        observer: RunObserver | None = None,
        startup_timeout: float | None = 60.0,
    ) -> None:
        pipeline.validate()
        self.pipeline = pipeline
        self.conninfo = conninfo_with_defaults(conninfo)
        # As given, so each connection below carries its own application_name (listener,
        # control, finisher) unless the caller's DSN sets one.
        self._given_conninfo = conninfo
        served = served_stages(pipeline, stages)
        check_settings(concurrency, batch_size, lease, pool_size, startup_timeout)
        self.startup_timeout = startup_timeout
        self.served = served
        self.concurrency = concurrency
        #: runs in flight at once per stage: the worker's limit, the stage's, the given one
        self.limits = {
            s.name: min(
                concurrency, (stage_limits or {}).get(s.name) or s.concurrency or concurrency
            )
            for s in served
        }
        self.worker_id = (
            worker_id or f"{socket.gethostname()}:{os.getpid()}:{random.randrange(16**4):04x}"
        )
        self.lease = lease
        self.batch_size = batch_size
        self.pool_size = pool_size or min(concurrency, 10)
        self.listen = listen
        self.scan_interval = scan_interval if listen else poll_interval
        self.probe_interval = probe_interval
        self.shutdown_timeout = shutdown_timeout
        self.max_pending = max_pending
        self.stats = WorkerStats()
        #: told about every run (spans, per-stage metrics): see pgstagechain.metrics.Metrics
        self.observer = observer
        self.listener: Listener | None = None

        self._stopping = False
        self._retired: NotInstalledError | None = None
        self._started = anyio.Event()
        self._wake = Wake()
        self._hints = Hints(
            pipeline,
            [s.name for s in self.served],
            self.stats,
            self._wake.set,
            max_pending=max_pending,
            burst={
                name: max(1, min(limit, batch_size) // 4) for name, limit in self.limits.items()
            },
        )
        self._runs = LiveRuns(self.limits, concurrency, self._wake.set)
        # Claims need not wait for their WAL flush: a claim lost in a crash leaves the row at
        # (previous step, done), where the scan finds it, and a completion for a run that
        # was never stored is refused, since it names the run by its claim's token, which
        # never repeats (the run id may). Completions and failures stay durable.
        self._control = Link(self._given_conninfo, "pgstagechain-control", durable=False)
        #: who else listens, so that each announced key is heard and claimed by one worker
        self._joining = (
            Joining(pipeline, [s.name for s in served], self._hints, self._control)
            if listen
            else None
        )
        self._completers = [
            Link(self._given_conninfo, "pgstagechain-finisher") for _ in range(COMPLETERS)
        ]
        self._claimer: Claimer | None = None
        self._batcher: CompletionBatcher | None = None
        self._scanner: WorkerScan | None = None
        self._claiming = False

    # -- public -------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until :meth:`stop` is called or the task is cancelled, then drain."""
        await self._serve(until_idle=False)

    async def run_until_idle(self) -> WorkerStats:
        """Serve until nothing this worker could claim is left, then drain and return stats."""
        await self._serve(until_idle=True)
        return self.stats

    def stop(self) -> None:
        """Stop claiming; in-flight runs get ``shutdown_timeout`` seconds to finish."""
        self._stopping = True
        self._wake.set()

    def _retire(self, error: NotInstalledError) -> None:
        """The installed graph moved a stage this worker serves: drain, then end with ``error``."""
        logger.error("%s", error)
        self._retired = error
        self.stop()

    async def wait_started(self) -> None:
        """Wait until the worker is connected (and listening, unless poll-only)."""
        await self._started.wait()
        if self.listener is not None:
            await self.listener.connected.wait()

    def describe(self) -> str:
        """One line for logs: which stages, how much concurrency, which database (no password)."""
        return (
            f"worker {self.worker_id} serving {', '.join(s.name for s in self.served)} "
            f"of {self.pipeline.name!r} (concurrency {self.concurrency}) on {redact(self.conninfo)}"
        )

    @property
    def in_flight(self) -> int:
        return self._runs.count

    @property
    def max_connections(self) -> int:
        """The most connections this worker opens at once: a control connection, the
        completers, the listener (unless poll-only), and the handlers' pool(s)."""
        pools = 1 + any(not s.is_async and s.connection for s in self.served)
        return 1 + COMPLETERS + int(self.listen) + pools * self.pool_size

    # -- lifecycle ------------------------------------------------------------------------

    async def _serve(self, *, until_idle: bool) -> None:
        self._stopping = False
        self._retired = None
        try:
            self._claimer = await start_up(
                self._control,
                self.pipeline,
                wait=self.startup_timeout,
                stopping=lambda: self._stopping,
                stats=self.stats,
            )
            await self._serve_started(until_idle=until_idle)
            if self._retired is not None:
                raise self._retired
        except BaseExceptionGroup as group:
            # A refusal for good, from whichever task met it first, ends the worker as
            # itself: callers catch DatabaseAccessError, not a task group's wrapper.
            fatal = found_in(group, (DatabaseAccessError,))
            if fatal is None:
                raise
            raise fatal from None

    async def _serve_started(self, *, until_idle: bool) -> None:
        claimer = self._claimer_()
        connections = HandlerConnections(
            self.conninfo,
            self.pool_size,
            blocking=any(not s.is_async and s.connection for s in self.served),
            name=f"pgstagechain-{self.pipeline.name}",
        )
        self._batcher = CompletionBatcher(
            claimer,
            self._completers,
            self._runs,
            self.stats,
            worker_id=self.worker_id,
            lease=self.lease,
            batch_size=self.batch_size,
        )
        finisher = self._completers[0]
        await connections.open()
        try:
            async with anyio.create_task_group() as maintenance:
                maintenance.start_soon(self._batcher.run)
                keeper = LeaseKeeper(claimer, finisher, self._runs, self.stats, lease=self.lease)
                maintenance.start_soon(keeper.run)
                self._scanner = WorkerScan(
                    claimer,
                    self._control,
                    self.served,
                    self._hints,
                    self.stats,
                    interval=self.scan_interval,
                    retire=self._retire,
                    membership=None if self._joining is None else self._joining.membership,
                )
                maintenance.start_soon(self._scanner.run)
                if self.pipeline.retention is not None:  # one worker at a time prunes
                    pruner = RetentionKeeper(self.pipeline, self._given_conninfo)
                    maintenance.start_soon(pruner.run)
                if self._joining is not None:
                    self._joining.probe = self._scanner.now
                    self.listener = Listener(
                        self._given_conninfo,
                        listened_channels(self.pipeline, self._joining.membership.partitions),
                        self._hints.on_notify,
                        on_listen=self._on_listen,
                        on_connect=self._joining.join,
                        probe_interval=self.probe_interval,
                    )
                    self._joining.listener = self.listener
                    maintenance.start_soon(self._joining.listen, self.listener)
                async with anyio.create_task_group() as handlers:
                    executor = RunExecutor(
                        claimer=claimer,
                        runs=self._runs,
                        hints=self._hints,
                        batcher=self._batcher,
                        finisher=finisher,
                        connections=connections,
                        threads=anyio.CapacityLimiter(self.concurrency),
                        tasks=maintenance,
                        stats=self.stats,
                        worker_id=self.worker_id,
                        lease=self.lease,
                        stopping=lambda: self._stopping,
                        observer=self.observer,
                    )

                    def start(stage: Stage, claims: Sequence[Claim]) -> None:
                        for claim in claims:
                            handlers.start_soon(executor.execute, stage, claim)

                    dispatcher = Dispatcher(
                        claimer=claimer,
                        served=self.served,
                        hints=self._hints,
                        runs=self._runs,
                        control=self._control,
                        stats=self.stats,
                        worker_id=self.worker_id,
                        lease=self.lease,
                        batch_size=self.batch_size,
                        start=start,
                    )
                    self._started.set()
                    await self._dispatch_loop(dispatcher, self._scanner, until_idle)
                    if self._joining is not None:
                        await self._joining.leave()
                    await self._drain()
                # Every handler task has returned, so every batched completion is flushed.
                maintenance.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await connections.close()
                await self._control.close()
                for link in self._completers:
                    await link.close()

    async def _drain(self) -> None:
        """Let in-flight runs finish within the deadline; hand the rest back at once."""
        with anyio.move_on_after(self.shutdown_timeout):
            while self._runs.count:
                await self._wake.wait(0.05)
        if self._runs.scopes:
            logger.warning(
                "shutdown deadline passed: abandoning %d run(s) to other workers",
                len(self._runs.scopes),
            )
            self._runs.cancel_all()  # a run whose completion is about to land is left to it

    # -- dispatch and recovery ----------------------------------------------------------

    async def _on_listen(self) -> None:
        self._hints.scan_all()
        if self._scanner is not None:
            self._scanner.now()

    @property
    def idle(self) -> bool:
        """Nothing in flight, being claimed or completed, and nothing announced or due."""
        return not (
            self._runs.count
            or self._claiming
            or (self._batcher is not None and self._batcher.busy)
            or self._hints.any()
        )

    async def _dispatch_loop(
        self, dispatcher: Dispatcher, scanner: WorkerScan, until_idle: bool
    ) -> None:
        stopping = lambda: self._stopping  # noqa: E731
        while not self._stopping:
            self._claiming = True
            try:
                tried = await dispatcher.dispatch_once(stopping)
            finally:
                self._claiming = False
            if tried:
                await anyio.lowlevel.checkpoint()
                continue
            if until_idle and self.idle:
                try:
                    next_retry = await scanner.scan()
                except DB_ERRORS as exc:
                    self.stats.db_errors += 1
                    await self._control.broke(exc)
                    continue
                if self.idle:
                    if next_retry is None:
                        return
                    await self._wake.wait(max(0.01, min(next_retry, self.scan_interval)))
                continue
            # a stage held back by its rate limit is looked at again when its next token is due
            await self._wake.wait(self._hints.release_due())

    def _claimer_(self) -> Claimer:
        assert self._claimer is not None
        return self._claimer
