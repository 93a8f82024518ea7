"""The worker: listener, claims, handlers, completions, leases and recovery, composed.

One event loop task dispatches: it turns notifications (and scan results) into batched
claims within the concurrency limits, and starts one task per claimed run. Completions
of runs that did not use their connection are committed in batches; the others commit
in the handler's own transaction. A heartbeat renews the leases of every live run in one
statement; a scanner re-drives whatever a lost notification or a dead worker left.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import logging
import os
import random
import socket
import time
import traceback
import uuid
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import attrs
import psycopg
from anyio.abc import TaskGroup
from psycopg import AsyncConnection, Connection, pq
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from ._claim import DEFAULT_LEASE, Claimer, Completion, claimer_for, to_json
from ._connect import access_problem, connect, conninfo_with_defaults, redact
from ._context import Claim, StageContext, run_fields
from ._events import Event, MalformedNotification, parse_event
from ._install import require_installed
from ._listener import Backoff, Listener
from ._pipeline import Pipeline
from ._stage import Stage
from .errors import (
    ConfigurationError,
    DatabaseAccessError,
    LeaseLostError,
    PermanentError,
    StartupTimeoutError,
)

if TYPE_CHECKING:
    from .metrics import RunObserver

logger = logging.getLogger("pgstagechain.worker")

#: completion statements in flight at once (one connection each)
COMPLETERS = 2
DB_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)
#: what a key from a notification can cause when cast to the key column's type (a
#: domain's CHECK raises an integrity error)
BAD_KEY_ERRORS = (psycopg.DataError, psycopg.IntegrityError, UnicodeError)
MAX_ERROR_TEXT = 4000


@attrs.define
class WorkerStats:
    """Counters since the worker started; all monotonic."""

    notifications: int = 0
    malformed: int = 0
    claimed: int = 0
    races_lost: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    timed_out: int = 0
    lease_lost: int = 0
    rescued: int = 0
    repaired: int = 0
    chained: int = 0
    scans: int = 0
    db_errors: int = 0


def connection_lost(exc: BaseException) -> bool:
    """True for errors that mean the connection died, not that a statement was wrong."""
    if isinstance(exc, (PoolTimeout, psycopg.InterfaceError)):
        return True
    if isinstance(exc, psycopg.OperationalError):
        state = exc.sqlstate
        return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")
    return False


class _Link:
    """An autocommit connection that is reopened on next use after it broke."""

    def __init__(self, conninfo: str, name: str, *, durable: bool = True) -> None:
        self.conninfo = conninfo
        self.name = name
        self.durable = durable
        self.conn: AsyncConnection[Any] | None = None
        self.failures = 0
        self._opening: anyio.Lock | None = None

    async def get(self) -> AsyncConnection[Any]:
        if self.conn is not None and not self.conn.closed and not self.conn.broken:
            return self.conn
        if self._opening is None:
            self._opening = anyio.Lock()
        async with self._opening:  # tasks that find it closed at once open it once
            if self.conn is None or self.conn.closed or self.conn.broken:
                if self.conn is not None:
                    await self.conn.close()
                    self.conn = None
                conn = await connect(self.conninfo, autocommit=True, application_name=self.name)
                if not self.durable:
                    try:
                        await conn.execute("SET synchronous_commit = off")
                    except BaseException:
                        await conn.close()
                        raise
                self.conn = conn
            return self.conn

    async def broke(self, exc: BaseException) -> None:
        """Note a failure, drop the connection, and wait a backoff before the next try.

        Raises :class:`DatabaseAccessError` instead when the server refuses us for good
        (a wrong password, a dropped database or role): retrying would never end.
        """
        problem = access_problem(exc)
        if problem is not None:
            await self.close()
            raise DatabaseAccessError(problem, redact(self.conninfo)) from None
        self.failures += 1
        logger.warning("%s connection failed (%s); retrying", self.name, str(exc).strip())
        if self.conn is not None:
            await self.conn.close()
            self.conn = None
        await anyio.sleep(Backoff().delay(self.failures))

    def ok(self) -> None:
        self.failures = 0

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
            self.conn = None


class _Freshness:
    """Test a pooled connection at checkout only if it sat idle long enough to have died
    unnoticed: a busy worker reuses connections within milliseconds and skips the round trip."""

    def __init__(self, idle: float = 1.0) -> None:
        self.idle = idle
        self.last_used: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()

    def _stale(self, conn: Any) -> bool:
        return time.monotonic() - self.last_used.get(conn, 0.0) > self.idle

    async def check_async(self, conn: AsyncConnection[Any]) -> None:
        if self._stale(conn):
            await AsyncConnectionPool.check_connection(conn)

    def check(self, conn: Connection[Any]) -> None:
        if self._stale(conn):
            ConnectionPool.check_connection(conn)

    def used(self, conn: Any) -> None:
        """Note the connection's last use (not through the pool's reset hook, which
        would cost a pool task per return)."""
        self.last_used[conn] = time.monotonic()


class _Batch:
    """Completions waiting for the next flush, by (stage, group stage, go on to the next)."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, bool, bool], list[Completion]] = {}
        self.size = 0
        self.done = anyio.Event()
        #: tokens of the runs completed, and the claims chained to them
        self.completed: set[uuid.UUID] = set()
        self.chained: dict[uuid.UUID, Claim] = {}


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
        (default ``min(concurrency, 10)``); see :attr:`max_connections`.
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
        served = list(stages) if stages is not None else [s.name for s in pipeline]
        for name in served:
            if name not in pipeline:
                raise ConfigurationError(
                    f"worker asked to serve unknown stage {name!r} of pipeline {pipeline.name!r}"
                )
        if not served:
            raise ConfigurationError("a worker must serve at least one stage")
        if concurrency < 1 or batch_size < 1 or lease <= 0:
            raise ConfigurationError("concurrency, batch_size and lease must be positive")
        if pool_size is not None and pool_size < 1:
            raise ConfigurationError(f"pool_size must be at least 1, got {pool_size}")
        if startup_timeout is not None and startup_timeout <= 0:
            raise ConfigurationError(f"startup_timeout must be positive, got {startup_timeout}")
        self.startup_timeout = startup_timeout
        self.served: tuple[Stage, ...] = tuple(pipeline[n] for n in served)
        self.concurrency = concurrency
        self.limits = {
            s.name: min(
                concurrency, (stage_limits or {}).get(s.name) or s.concurrency or concurrency
            )
            for s in self.served
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

        self._pending: dict[str, dict[str, None]] = {s.name: {} for s in self.served}
        self._needs_scan: dict[str, bool] = {s.name: True for s in self.served}
        self._retry_due: dict[str, bool] = {s.name: True for s in self.served}
        self._inflight: dict[str, int] = {s.name: 0 for s in self.served}
        self._inflight_total = 0
        # Runs are known by their claim's token: ids can repeat after a server crash.
        # Each live run with the cancel scope of the task running it (a chain of runs on
        # this worker shares one task, so one scope).
        self._live: dict[uuid.UUID, tuple[Claim, anyio.CancelScope]] = {}
        # runs whose completion is on its way (in a batch, or being committed by the
        # handler's own transaction): the heartbeat must not take them for lost
        self._concluding: set[uuid.UUID] = set()
        self._wake = anyio.Event()
        self._scan_now = anyio.Event()
        self._stopping = False
        self._started = anyio.Event()
        self._order = itertools.cycle(range(len(self.served)))
        self._batch = _Batch()
        self._batch_ready = anyio.Event()
        self._flushing = 0
        self._claimer: Claimer | None = None
        self._pool: AsyncConnectionPool[AsyncConnection[Any]] | None = None
        self._sync_pool: ConnectionPool[Connection[Any]] | None = None
        self._threads = anyio.CapacityLimiter(concurrency)
        # Claims need not wait for their WAL flush: a claim lost in a crash leaves the row at
        # (previous step, done), where the scan finds it, and a completion for a run that
        # was never stored is refused, since it names the run by its claim's token, which
        # never repeats (the run id may). Completions and failures stay durable.
        self._control = _Link(self._given_conninfo, "pgstagechain-control", durable=False)
        # Two completers, each on its own connection: while one batch's statement runs,
        # the handlers of the other batch run here, so neither side waits on the other.
        self._completers = [
            _Link(self._given_conninfo, "pgstagechain-finisher") for _ in range(COMPLETERS)
        ]
        self._finisher = self._completers[0]
        self._handlers: TaskGroup | None = None
        self._freshness = _Freshness()
        self._pool_slots: anyio.Semaphore | None = None
        self._maintenance: TaskGroup | None = None

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

    async def wait_started(self) -> None:
        """Wait until the worker is connected (and listening, unless poll-only)."""
        await self._started.wait()
        if self.listener is not None:
            await self.listener.connected.wait()

    @property
    def in_flight(self) -> int:
        return self._inflight_total

    @property
    def max_connections(self) -> int:
        """The most connections this worker opens at once: a control connection, the
        completers, the listener (unless poll-only), and the handlers' pool(s)."""
        pools = 1 + any(not s.is_async and s.connection for s in self.served)
        return 1 + COMPLETERS + int(self.listen) + pools * self.pool_size

    # -- lifecycle ------------------------------------------------------------------------

    async def _serve(self, *, until_idle: bool) -> None:
        self._stopping = False
        try:
            await self._open()
            await self._serve_started(until_idle=until_idle)
        except BaseExceptionGroup as group:
            # A refusal for good, from whichever task met it first, ends the worker as
            # itself: callers catch DatabaseAccessError, not a task group's wrapper.
            fatal, _ = group.split(DatabaseAccessError)
            if fatal is None:
                raise
            first: BaseException = fatal
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None

    async def _open(self) -> None:
        """Connect and check the database side; a problem here is raised as a library error."""
        control = await self._connect_first()
        try:
            await require_installed(control, self.pipeline)
            self._claimer = await claimer_for(control, self.pipeline)
        except psycopg.Error as exc:
            await self._control.close()
            problem = access_problem(exc)
            if problem is None:
                raise
            raise DatabaseAccessError(problem, redact(self.conninfo)) from None
        except BaseException:
            await self._control.close()
            raise

    async def _serve_started(self, *, until_idle: bool) -> None:
        self._pool = AsyncConnectionPool(
            self.conninfo,
            min_size=1,
            max_size=self.pool_size,
            open=False,
            kwargs={"application_name": "pgstagechain-handler"},
            name=f"pgstagechain-{self.pipeline.name}",
            # A connection that died while idle (server restart, failover, idle timeout)
            # must not cost a handler an attempt: one idle for a while is tested at checkout.
            check=self._freshness.check_async,
        )
        if any(not s.is_async and s.connection for s in self.served):
            self._sync_pool = ConnectionPool(
                self.conninfo,
                min_size=1,
                max_size=self.pool_size,
                open=False,
                kwargs={"application_name": "pgstagechain-handler"},
                check=self._freshness.check,
            )
            await anyio.to_thread.run_sync(self._sync_pool.open)
        await self._pool.open()
        self._pool_slots = anyio.Semaphore(self.pool_size)
        try:
            async with anyio.create_task_group() as maintenance:
                self._maintenance = maintenance
                for link in self._completers:
                    maintenance.start_soon(self._completer_loop, link)
                maintenance.start_soon(self._heartbeat_loop)
                maintenance.start_soon(self._scan_loop)
                if self.listen:
                    self.listener = Listener(
                        self._given_conninfo,
                        [self.pipeline.channel],
                        self._on_notify,
                        on_listen=self._on_listen,
                        probe_interval=self.probe_interval,
                    )
                    maintenance.start_soon(self.listener.run)
                async with anyio.create_task_group() as handlers:
                    self._handlers = handlers
                    self._started.set()
                    await self._dispatch_loop(until_idle)
                    await self._drain()
                # Every handler task has returned, so every batched completion is flushed.
                maintenance.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._pool.close()
                if self._sync_pool is not None:
                    await anyio.to_thread.run_sync(self._sync_pool.close)
                await self._control.close()
                for link in self._completers:
                    await link.close()

    async def _connect_first(self) -> AsyncConnection[Any]:
        """Wait for the database at start-up (it may be restarting), within
        ``startup_timeout``; a refusal for good ends the wait at once."""
        last = ""
        with anyio.move_on_after(self.startup_timeout):
            while True:
                try:
                    return await self._control.get()
                except DB_ERRORS as exc:
                    if self._stopping:
                        raise
                    self.stats.db_errors += 1
                    last = str(exc).strip() or type(exc).__name__
                    await self._control.broke(exc)
        assert self.startup_timeout is not None
        raise StartupTimeoutError(self.startup_timeout, redact(self.conninfo), last)

    async def _drain(self) -> None:
        """Let in-flight runs finish within the deadline; hand the rest back at once."""
        with anyio.move_on_after(self.shutdown_timeout):
            while self._inflight_total:
                await self._idle_wait(0.05)
        if self._live:
            logger.warning(
                "shutdown deadline passed: abandoning %d run(s) to other workers", len(self._live)
            )
            for token, (_, scope) in list(self._live.items()):
                if token not in self._concluding:  # a completion is about to land
                    scope.cancel()

    # -- notifications --------------------------------------------------------------------

    def _on_notify(self, channel: str, payload: str) -> None:
        self.stats.notifications += 1
        try:
            self._take_hint(parse_event(payload))
        except Exception as exc:  # a notification is a hint: none may stop the worker
            self._ignored(f"a malformed notification on {channel}", exc)

    def _ignored(self, what: str, exc: Exception) -> None:
        """Count and log a hint that could not be used; a flood must not become a log
        flood: the first few, then every thousandth."""
        self.stats.malformed += 1
        count = self.stats.malformed
        logger.log(
            logging.WARNING if count <= 10 or count % 1000 == 0 else logging.DEBUG,
            "ignored %s (%d so far): %s",
            what,
            count,
            exc if isinstance(exc, MalformedNotification) else f"{type(exc).__name__}: {exc}",
        )

    def _take_hint(self, event: Event) -> None:
        if event.kind == "t":  # a run was handed back: its retry is due now
            if event.step in self._retry_due:
                self._retry_due[event.step] = True
                self._wake.set()
            return
        target = self.pipeline.next_stage(event.step)
        if target is None or target.name not in self._pending:
            return
        if target.group != (event.kind == "g"):
            return  # a row reaching a fan-in step: its group's own notification follows
        bucket = self._pending[target.name]
        if len(bucket) >= self.max_pending:
            self._needs_scan[target.name] = True  # too many hints: the scan finds the rest
        else:
            bucket[event.key] = None
        self._wake.set()

    async def _on_listen(self) -> None:
        for name in self._needs_scan:
            self._needs_scan[name] = True
        self._scan_now.set()
        self._wake.set()

    # -- dispatch ---------------------------------------------------------------------------

    def _free(self, stage: str) -> int:
        return min(
            self.concurrency - self._inflight_total, self.limits[stage] - self._inflight[stage]
        )

    def _quiet(self) -> bool:
        return not (
            self._inflight_total
            or self._batch.items
            or self._flushing
            or any(self._pending.values())
            or any(self._needs_scan.values())
            or any(self._retry_due.values())
        )

    async def _idle_wait(self, seconds: float | None) -> None:
        with anyio.move_on_after(seconds):
            await self._wake.wait()
        self._wake = anyio.Event()

    async def _dispatch_loop(self, until_idle: bool) -> None:
        while not self._stopping:
            if await self._dispatch_once():
                await anyio.lowlevel.checkpoint()
                continue
            if until_idle and self._quiet():
                try:
                    next_retry = await self._scan()
                except DB_ERRORS as exc:
                    self.stats.db_errors += 1
                    await self._control.broke(exc)
                    continue
                if self._quiet():
                    if next_retry is None:
                        return
                    await self._idle_wait(max(0.01, min(next_retry, self.scan_interval)))
                continue
            await self._idle_wait(None)

    async def _dispatch_once(self) -> bool:
        """Claim what can be claimed now, each stage in turn; True if anything was tried."""
        progressed = False
        start = next(self._order)
        for offset in range(len(self.served)):
            if self._stopping:
                break
            stage = self.served[(start + offset) % len(self.served)]
            free = self._free(stage.name)
            if free <= 0:
                continue
            limit = min(free, self.batch_size)
            keys: list[str] | None = None
            if self._retry_due[stage.name]:
                mode = "retry"
            elif len(self._pending[stage.name]) > limit:
                # More hints than one batch: claim ready rows instead, so that workers that
                # heard the same notifications take disjoint rows (SKIP LOCKED) rather than
                # racing for the same keys.
                self._pending[stage.name].clear()
                self._needs_scan[stage.name] = True
                mode = "ready"
            elif self._pending[stage.name]:
                bucket = self._pending[stage.name]
                keys = list(itertools.islice(bucket, limit))
                for key in keys:
                    del bucket[key]
                mode = "keys"
            elif self._needs_scan[stage.name]:
                mode = "ready"
            else:
                continue
            progressed = True
            try:
                conn = await self._control.get()
                try:
                    claims = await self._claimer_().claim(
                        conn,
                        stage.name,
                        keys=keys,
                        limit=limit,
                        worker_id=self.worker_id,
                        lease=self.lease,
                        retries=mode == "retry",
                    )
                except BAD_KEY_ERRORS:
                    if keys is None:
                        raise
                    # A hint whose key does not fit the key column (anyone can NOTIFY):
                    # try the batch's keys one by one, dropping those.
                    claims, keys = await self._claim_each(conn, stage.name, keys)
                self._control.ok()
            except DB_ERRORS as exc:
                self.stats.db_errors += 1
                self._needs_scan[stage.name] = True  # the hints are gone; the scan finds them
                await self._control.broke(exc)
                continue
            if mode == "retry" and len(claims) < limit:
                self._retry_due[stage.name] = False
            elif mode == "ready" and len(claims) < limit:
                self._needs_scan[stage.name] = False
            elif mode == "keys":
                self.stats.races_lost += len(keys or ()) - len(claims)
            if claims:
                await self._start(stage, claims)
        return progressed

    async def _claim_each(
        self, conn: AsyncConnection[Any], stage: str, keys: list[str]
    ) -> tuple[list[Claim], list[str]]:
        """Claim ``keys`` one at a time; return the claims and the keys that were valid."""
        claims: list[Claim] = []
        valid: list[str] = []
        for key in keys:
            try:
                claims += await self._claimer_().claim(
                    conn, stage, keys=[key], worker_id=self.worker_id, lease=self.lease
                )
                valid.append(key)
            except BAD_KEY_ERRORS as exc:
                self._ignored(
                    f"a notification for {stage} whose key {key[:80]!r} does not fit the key column",
                    exc,
                )
        return claims, valid

    def _claimer_(self) -> Claimer:
        assert self._claimer is not None
        return self._claimer

    async def _start(self, stage: Stage, claims: Sequence[Claim]) -> None:
        """Start one task per claim (a group's claim carries its members)."""
        self.stats.claimed += len(claims)
        self._inflight[stage.name] += len(claims)
        self._inflight_total += len(claims)
        assert self._handlers is not None
        for each in claims:
            self._live[each.token] = (each, anyio.CancelScope())
            self._handlers.start_soon(self._execute, stage, each)

    def _finished(self, stage: Stage, claim: Claim) -> None:
        self._live.pop(claim.token, None)
        self._inflight[stage.name] -= 1
        self._inflight_total -= 1
        self._wake.set()

    # -- running a handler ----------------------------------------------------------------------

    async def _execute(self, stage: Stage, claim: Claim) -> None:
        """Run ``claim``'s handler; when the row goes straight on to the next stage here,
        run that one too, in the same task (the slot passes along with the row). One
        cancel scope serves the whole chain: it cancels whichever run is current."""
        _, scope = self._live[claim.token]
        current: tuple[Stage, Claim] | None = (stage, claim)
        try:
            with scope:
                while current is not None:
                    stage, claim = current
                    current = await self._run_one(stage, claim)
            if scope.cancelled_caught:
                # Shut down past the deadline, or the lease was found lost: hand it back.
                with anyio.CancelScope(shield=True):
                    await self._release([claim], "worker stopped before the run finished")
        finally:
            self._finished(stage, claim)

    async def _run_one(self, stage: Stage, claim: Claim) -> tuple[Stage, Claim] | None:
        following: tuple[Stage, Claim] | None = None
        observer = self.observer
        started = time.monotonic() if observer is not None else 0.0
        outcome = "abandoned"
        span = observer.span(stage.name, claim) if observer else contextlib.nullcontext()
        try:
            with span:
                try:
                    if stage.is_async:
                        following = await self._run_async(stage, claim)
                    else:
                        following = await self._run_sync(stage, claim)
                    self.stats.succeeded += 1
                    outcome = "succeeded"
                except LeaseLostError:
                    self.stats.lease_lost += 1
                    outcome = "lease_lost"
                    logger.warning(
                        "run %s of %s lost its lease; result discarded", claim.run_id, stage.name
                    )
                except Exception as exc:
                    if connection_lost(exc):
                        # The database went away under the handler (restart, failover, a
                        # cut connection): like a crash, not the handler's fault. Retry now.
                        logger.warning(
                            "run %s of %s lost its database connection (%s); retrying",
                            claim.run_id,
                            stage.name,
                            str(exc).strip() or type(exc).__name__,
                        )
                        await self._release([claim], f"connection lost: {exc}", free=False)
                        self._retry_due[stage.name] = True
                        outcome = "retried"
                    else:
                        outcome = await self._record_failure(stage, claim, exc)
        finally:
            if observer is not None:
                observer.observe_run(stage.name, outcome, time.monotonic() - started)
        if following is not None:
            # The slot passes from this stage to the next along with the row.
            self._live.pop(claim.token, None)
            self._inflight[stage.name] -= 1
            self.stats.claimed += 1
            self.stats.chained += 1
        return following

    def _reserve_chain(self, stage: Stage) -> Stage | None:
        """Book a slot of the next stage if this row can go straight on to it here."""
        following = self._claimer_().chain_target(stage.name)
        if (
            following is None
            or self._stopping
            or following.name not in self._inflight
            or self._inflight[following.name] >= self.limits[following.name]
        ):
            return None
        self._inflight[following.name] += 1
        return following

    def _settle_chain(
        self, booked: Stage | None, claim: Claim, chained: Mapping[uuid.UUID, Claim]
    ) -> tuple[Stage, Claim] | None:
        if booked is None:
            return None
        nxt = chained.get(claim.token)
        if nxt is None:
            self._inflight[booked.name] -= 1
            self._wake.set()
            return None
        self._live[nxt.token] = (nxt, self._live[claim.token][1])
        return booked, nxt

    async def _run_async(self, stage: Stage, claim: Claim) -> tuple[Stage, Claim] | None:
        if not stage.connection:
            result = await self._call(stage, self._context(claim, None))
            return await self._complete_batched(stage, claim, to_json(stage.name, result))
        assert self._pool is not None
        assert self._pool_slots is not None
        # Runs queue on a semaphore, which is cheap, rather than inside the pool.
        async with self._pool_slots, self._pool.connection() as conn:
            try:
                result = await self._call(stage, self._context(claim, conn))
            finally:
                self._freshness.used(conn)
            payload = to_json(stage.name, result)
            if conn.info.transaction_status != pq.TransactionStatus.IDLE:
                # The handler wrote: complete in its transaction, so both commit or neither.
                booked = self._reserve_chain(stage)
                self._concluding.add(claim.token)
                try:
                    completed, chained = await self._claimer_().complete_many(
                        conn,
                        stage.name,
                        stage.group,
                        [(claim.run_id, claim.token, claim.row_key, payload, booked is not None)],
                        worker_id=self.worker_id,
                        lease=self.lease,
                    )
                    if claim.token not in completed:
                        raise LeaseLostError(claim.run_id)
                    await conn.commit()
                except BaseException:
                    self._settle_chain(booked, claim, {})
                    raise
                finally:
                    self._concluding.discard(claim.token)
                return self._settle_chain(booked, claim, chained)
        return await self._complete_batched(stage, claim, payload)

    async def _call(self, stage: Stage, ctx: StageContext[Any]) -> Any:
        if stage.timeout is None:
            return await stage.run(ctx)
        with anyio.fail_after(stage.timeout):
            return await stage.run(ctx)

    async def _run_sync(self, stage: Stage, claim: Claim) -> tuple[Stage, Claim] | None:
        def call() -> tuple[bool, str | None]:
            if not stage.connection or self._sync_pool is None:
                result = stage.run(self._context(claim, None))
                return False, to_json(stage.name, result)
            with self._sync_pool.connection() as conn:
                try:
                    result = stage.run(self._context(claim, conn))
                finally:
                    self._freshness.used(conn)
                payload = to_json(stage.name, result)
                if conn.info.transaction_status == pq.TransactionStatus.IDLE:
                    return False, payload
                # From here the run is concluding: the heartbeat must not take a run this
                # commit closes for one whose lease was lost. (A set's add and discard
                # are atomic; the event loop only reads it.)
                self._concluding.add(claim.token)
                completed, _ = self._claimer_().complete_many_sync(
                    conn,
                    stage.name,
                    stage.group,
                    [(claim.run_id, claim.token, claim.row_key, payload, False)],
                )
                if claim.token not in completed:
                    raise LeaseLostError(claim.run_id)
                conn.commit()
                return True, None

        try:
            with anyio.fail_after(stage.timeout):
                committed, payload = await anyio.to_thread.run_sync(
                    call, abandon_on_cancel=True, limiter=self._threads
                )
        finally:
            self._concluding.discard(claim.token)
        if committed:
            return None
        return await self._complete_batched(stage, claim, payload)

    def _context(self, claim: Claim, conn: Any) -> StageContext[Any]:
        return StageContext(claim=claim, conn=conn, worker_id=self.worker_id)

    async def _record_failure(self, stage: Stage, claim: Claim, exc: Exception) -> str:
        """Record the failure; return the outcome: failed, retried, lease_lost or abandoned."""
        if isinstance(exc, TimeoutError):
            self.stats.timed_out += 1
            error = f"TimeoutError: stage {stage.name!r} ran longer than {stage.timeout}s"
        else:
            error = "".join(traceback.format_exception(exc))[-MAX_ERROR_TEXT:]
        retry_in: float | None = None
        if not isinstance(exc, PermanentError) and claim.attempt < stage.retry.max_attempts:
            retry_in = stage.retry.delay(claim.attempt, random.random())
        logger.log(
            logging.WARNING if retry_in is not None else logging.ERROR,
            "stage %s failed for %s (attempt %d)%s: %s",
            stage.name,
            claim.row_key,
            claim.attempt,
            f", retrying in {retry_in:.2f}s" if retry_in is not None else "",
            str(exc) or type(exc).__name__,
            extra=run_fields(claim),
        )
        for _ in range(3):
            try:
                ours = await self._claimer_().fail(
                    await self._finisher.get(), claim, error, retry_in=retry_in
                )
                self._finisher.ok()
                break
            except DB_ERRORS as db_exc:
                self.stats.db_errors += 1
                await self._finisher.broke(db_exc)
        else:
            return "abandoned"  # the lease will run out and the scanner will re-drive the row
        if not ours:
            self.stats.lease_lost += 1
            return "lease_lost"
        if retry_in is None:
            self.stats.failed += 1
            return "failed"
        self.stats.retried += 1
        assert self._maintenance is not None
        self._maintenance.start_soon(self._retry_timer, stage.name, retry_in)
        return "retried"

    async def _retry_timer(self, stage: str, delay: float) -> None:
        await anyio.sleep(delay)
        self._retry_due[stage] = True
        self._wake.set()

    async def _release(self, claims: list[Claim], reason: str, *, free: bool = True) -> None:
        """Close runs we give up on so another worker retries them now, not at lease expiry.

        ``free`` retries even when the stage's attempts are used up (the run was abandoned,
        not tried); otherwise the rule for dead workers applies (at least 3 attempts).
        """
        try:
            conn = await self._finisher.get()
            await self._claimer_().expire(conn, claims, reason=reason, free=free)
        except DB_ERRORS as exc:
            logger.warning(
                "could not release %d run(s) (%s); their leases will expire", len(claims), exc
            )

    # -- completions ------------------------------------------------------------------------------

    async def _complete_batched(
        self, stage: Stage, claim: Claim, payload: str | None
    ) -> tuple[Stage, Claim] | None:
        booked = self._reserve_chain(stage)
        batch = self._batch
        batch.items.setdefault((stage.name, stage.group, booked is not None), []).append(
            (claim.run_id, claim.token, claim.row_key, payload, booked is not None)
        )
        batch.size += 1
        self._batch_ready.set()
        self._concluding.add(claim.token)
        try:
            await batch.done.wait()
        finally:
            self._concluding.discard(claim.token)
        if claim.token not in batch.completed:
            self._settle_chain(booked, claim, {})
            raise LeaseLostError(claim.run_id)
        return self._settle_chain(booked, claim, batch.chained)

    async def _completer_loop(self, link: _Link) -> None:
        while True:
            await self._batch_ready.wait()
            if not self._batch.items:
                # another completer took the batch that woke this one
                self._batch_ready = anyio.Event()
                continue
            # Let every handler that is about to finish join this batch: flush once a
            # pass of the event loop added nothing (at light load, one pass: ~µs).
            seen = 0
            while seen != self._batch.size < self.batch_size:
                seen = self._batch.size
                await anyio.lowlevel.checkpoint()
            self._batch_ready = anyio.Event()
            batch, self._batch = self._batch, _Batch()
            self._flushing += 1
            try:
                await self._flush(batch, link)
            finally:
                self._flushing -= 1
                batch.done.set()
                self._wake.set()

    async def _flush(self, batch: _Batch, link: _Link) -> None:
        claimer = self._claimer_()
        for (stage, is_group, _), items in batch.items.items():
            for attempt in range(5):
                try:
                    conn = await link.get()
                    completed, chained = await claimer.complete_many(
                        conn, stage, is_group, items, worker_id=self.worker_id, lease=self.lease
                    )
                    batch.completed |= completed
                    batch.chained.update(chained)
                    link.ok()
                    break
                except DB_ERRORS as exc:
                    # Safe to repeat: a completion only applies to runs still running, and
                    # only to the very runs claimed (ids and tokens), even after a crash.
                    self.stats.db_errors += 1
                    if attempt == 4:
                        logger.error(
                            "gave up completing %d run(s) of %s: %s", len(items), stage, exc
                        )
                    await link.broke(exc)

    # -- leases and recovery -------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await anyio.sleep(self.lease / 3)
            held = [claim for claim, _ in self._live.values()]
            if not held:
                continue
            try:
                conn = await self._finisher.get()
                cur = await conn.execute(
                    self._claimer_().text("renew_leases"),
                    {
                        "run_ids": [c.run_id for c in held],
                        "tokens": [c.token for c in held],
                        "lease": self.lease,
                    },
                )
                kept = {token for (token,) in await cur.fetchall()}
                self._finisher.ok()
            except DB_ERRORS as exc:
                self.stats.db_errors += 1
                await self._finisher.broke(exc)
                continue
            for claim in held:
                live = self._live.get(claim.token)
                if (
                    claim.token not in kept
                    and live is not None
                    and claim.token not in self._concluding
                ):
                    logger.warning("run %s lost its lease; cancelling its handler", claim.run_id)
                    live[1].cancel()

    async def _scan_loop(self) -> None:
        while True:
            with anyio.move_on_after(self.scan_interval):
                await self._scan_now.wait()
            self._scan_now = anyio.Event()
            try:
                await self._scan()
            except DB_ERRORS as exc:
                self.stats.db_errors += 1
                await self._control.broke(exc)

    async def _scan(self) -> float | None:
        """Find work a notification did not announce; return seconds to the next retry."""
        self.stats.scans += 1
        claimer = self._claimer_()
        row_steps = [s.after for s in self.served if not s.group]
        group_steps = [s.after for s in self.served if s.group]
        conn = await self._control.get()
        cur = await conn.execute(
            claimer.text("pending"),
            claimer.params(row_steps=row_steps, group_steps=group_steps),
        )
        found = await cur.fetchone()
        assert found is not None
        ready_rows, ready_groups, stuck, next_retry_at = found
        for step in (ready_rows or []) + (ready_groups or []):
            target = self.pipeline.next_stage(step)
            if target is not None and target.name in self._needs_scan:
                self._needs_scan[target.name] = True
        if stuck:
            rescued = await self._claimer_().expire(conn)
            unheld = sum(1 for *_, was_unheld in rescued if was_unheld)
            self.stats.rescued += len(rescued) - unheld
            self.stats.repaired += unheld
            if len(rescued) > unheld:
                logger.warning("rescued %d run(s) whose lease expired", len(rescued) - unheld)
            if unheld:
                logger.warning(
                    "found %d row(s) at (stage, running) that no run held; running them again",
                    unheld,
                )
            if rescued:
                next_retry_at = dt.datetime.now(dt.UTC)
        wait: float | None = None
        if next_retry_at is not None:
            wait = (next_retry_at - dt.datetime.now(dt.UTC)).total_seconds()
            if wait <= 0:
                for name in self._retry_due:
                    self._retry_due[name] = True
        self._wake.set()
        return wait


def describe(worker: Worker) -> str:
    """One line for logs: which stages, how much concurrency, which database (no password)."""
    return (
        f"worker {worker.worker_id} serving {', '.join(s.name for s in worker.served)} "
        f"of {worker.pipeline.name!r} (concurrency {worker.concurrency}) on {redact(worker.conninfo)}"
    )
