"""A worker's connections: its own links, which reopen after a break, and the pools lent to
handlers, checked only when a connection sat idle long enough to have died."""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any

import anyio
import psycopg
from psycopg import AsyncConnection, Connection, pq
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from ._connect import DB_ERRORS as DB_ERRORS
from ._connect import access_problem, connect, redact
from ._listener import Backoff
from .errors import DatabaseAccessError

logger = logging.getLogger("pgstagechain.worker")

#: a connection idle longer than this is tested before a handler gets it
IDLE_CHECK_SECONDS = 1.0


def connection_lost(exc: BaseException) -> bool:
    """True for errors that mean the connection died, not that a statement was wrong."""
    if isinstance(exc, (PoolTimeout, psycopg.InterfaceError)):
        return True
    if isinstance(exc, psycopg.OperationalError):
        state = exc.sqlstate
        return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")
    return False


class Link:
    """An autocommit connection that is reopened on next use after it broke.

    ``durable=False`` commits without waiting for the WAL flush (for claims: a claim lost in
    a crash leaves its row where the scan finds it).
    """

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
        await self.close()
        await anyio.sleep(Backoff().delay(self.failures))

    def ok(self) -> None:
        self.failures = 0

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
            self.conn = None


class Freshness:
    """Test a pooled connection at checkout only if it sat idle long enough to have died
    unnoticed: a busy worker reuses connections within milliseconds and skips the round trip."""

    def __init__(self, idle: float = IDLE_CHECK_SECONDS) -> None:
        self.idle = idle
        self.last_used: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()

    def stale(self, conn: Any) -> bool:
        return time.monotonic() - self.last_used.get(conn, 0.0) > self.idle

    async def check_async(self, conn: AsyncConnection[Any]) -> None:
        if self.stale(conn):
            await AsyncConnectionPool.check_connection(conn)

    def check(self, conn: Connection[Any]) -> None:
        if self.stale(conn):
            ConnectionPool.check_connection(conn)

    def used(self, conn: Any) -> None:
        """Note the connection's last use (not through the pool's reset hook, which
        would cost a pool task per return)."""
        self.last_used[conn] = time.monotonic()


def reusable(conn: AsyncConnection[Any] | Connection[Any]) -> bool:
    """Open, and outside any transaction: ready for the next handler as it is."""
    return conn.info.transaction_status == pq.TransactionStatus.IDLE and not conn.broken


#: what reading ``ctx.conn`` after the handler returned raises
LOAN_ENDED = "ctx.conn was read after its handler returned: the connection is the handler's only while it runs"


class Loan:
    """One async run's claim on a handler connection: a slot of the pool, and the
    connection itself only once the handler reads ``ctx.conn`` (:meth:`take`)."""

    __slots__ = ("conn", "ended", "lender")

    def __init__(self, lender: HandlerConnections) -> None:
        self.lender = lender
        self.conn: AsyncConnection[Any] | None = None
        self.ended = False

    def take(self) -> AsyncConnection[Any]:
        if self.conn is None:
            if self.ended:
                raise RuntimeError(LOAN_ENDED)
            self.conn = self.lender.take_ready()
        return self.conn


class BlockingLoan:
    """A sync run's connection, checked out of the blocking pool (in the handler's
    thread) the first time the handler reads ``ctx.conn``."""

    __slots__ = ("conn", "ended", "freshness", "pool")

    def __init__(self, lender: HandlerConnections) -> None:
        assert lender.blocking is not None, "no sync stage needs a connection"
        self.pool = lender.blocking
        self.freshness = lender.freshness
        self.conn: Connection[Any] | None = None
        self.ended = False

    def take(self) -> Connection[Any]:
        if self.conn is None:
            if self.ended:
                raise RuntimeError(LOAN_ENDED)
            self.conn = self.pool.getconn()
        return self.conn

    def give_back(self) -> None:
        """Back to the pool, which rolls back a transaction left open."""
        self.ended = True
        if self.conn is not None:
            self.freshness.used(self.conn)
            self.pool.putconn(self.conn)
            self.conn = None


class HandlerConnections:
    """Connections lent to the handlers of stages with ``connection=True``: an async pool,
    and a blocking one when a sync stage needs it.

    A run takes a connection only when its handler first reads ``ctx.conn``, so a
    handler that never does costs no connection. An async handler reads it without
    awaiting, so a connection must be at hand by then: each async run holds one of
    ``size`` slots while its handler runs, and for every slot whose handler has not taken
    its connection yet one is kept ready (checked out of the pool, idle). Slots queue on a
    semaphore, which is cheap, rather than inside the pool.
    """

    def __init__(self, conninfo: str, size: int, *, blocking: bool, name: str) -> None:
        self.size = size
        self.freshness = Freshness()
        # A connection that died while idle (server restart, failover, idle timeout) must
        # not cost a handler an attempt: one idle for a while is tested at checkout.
        self.pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
            conninfo,
            min_size=1,
            max_size=size,
            open=False,
            kwargs={"application_name": "pgstagechain-handler"},
            name=name,
            check=self.freshness.check_async,
        )
        self.blocking: ConnectionPool[Connection[Any]] | None = None
        if blocking:
            self.blocking = ConnectionPool(
                conninfo,
                min_size=1,
                max_size=size,
                open=False,
                kwargs={"application_name": "pgstagechain-handler"},
                check=self.freshness.check,
            )
        self._slots = anyio.Semaphore(size)
        #: connections checked out of the pool and idle, the one used last at the end
        self.ready: list[AsyncConnection[Any]] = []
        #: runs lent a slot whose handler has not taken a connection yet: ``ready`` always
        #: holds at least as many connections
        self._untaken = 0
        #: set while one run tops ``ready`` up; the others wait for it
        self._gate: anyio.Event | None = None

    async def open(self) -> None:
        if self.blocking is not None:
            await anyio.to_thread.run_sync(self.blocking.open)
        await self.pool.open()

    async def close(self) -> None:
        while self.ready:
            await self.pool.putconn(self.ready.pop())
        await self.pool.close()
        if self.blocking is not None:
            await anyio.to_thread.run_sync(self.blocking.close)

    async def lend(self) -> Loan:
        """A slot for one async run, with a connection ready for it should it ask."""
        while self._gate is not None:  # not holding a slot while another run tops up
            await self._gate.wait()
        try:
            self._slots.acquire_nowait()  # no checkpoint when a slot is free
        except anyio.WouldBlock:
            await self._slots.acquire()
        try:
            while self._gate is not None or self._short():
                if self._gate is not None:
                    await self._gate.wait()
                    continue
                # One run at a time tops up; the others wait here and all go on at once,
                # rather than each checking out a connection of its own.
                self._gate = gate = anyio.Event()
                try:
                    await self._top_up()
                finally:
                    self._gate = None
                    gate.set()
        except BaseException:
            self._slots.release()
            raise
        self._untaken += 1
        return Loan(self)

    def _short(self) -> bool:
        """No connection ready beyond those kept for runs that have not taken theirs, or
        the next one a handler would take sat idle long enough to have died."""
        return len(self.ready) <= self._untaken or self.freshness.stale(self.ready[-1])

    async def _top_up(self) -> None:
        if len(self.ready) > self._untaken and self.freshness.stale(self.ready[-1]):
            with anyio.CancelScope(shield=True):
                # back to the pool, whose check tests it when it is checked out again
                await self.pool.putconn(self.ready.pop())
        while len(self.ready) <= self._untaken:
            conn = await self.pool.getconn()
            self.freshness.used(conn)
            self.ready.append(conn)

    def take_ready(self) -> AsyncConnection[Any]:
        self._untaken -= 1
        return self.ready.pop()

    async def give_back(self, loan: Loan) -> None:
        """End ``loan``: its connection, if the handler took it, is ready for the next
        run as it is, or goes back to the pool (which rolls back or replaces it)."""
        conn = loan.conn
        loan.conn = None
        loan.ended = True
        if conn is None:
            self._untaken -= 1
        elif reusable(conn):
            self.freshness.used(conn)
            self.ready.append(conn)
        else:
            with anyio.CancelScope(shield=True):
                await self.pool.putconn(conn)
        self._slots.release()
