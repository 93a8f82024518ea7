"""LISTEN on a dedicated connection that survives restarts, cuts and half-open sockets.

Notifications are hints: the listener hands each payload to a callback and, after
every (re)LISTEN, calls ``on_listen`` so the owner can scan for what it missed while
it was away. A quiet connection is probed on an interval with a deadline, so a peer
that vanished without a FIN is noticed in seconds.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import attrs
import psycopg
from psycopg import sql

from ._connect import access_problem, connect, redact
from ._sql import Statements, plain
from .errors import ConfigurationError, DatabaseAccessError

logger = logging.getLogger("pgstagechain.listener")

#: the application name of a listening connection, as ``pg_stat_activity`` shows it
APPLICATION_NAME = "pgstagechain-listener"


def _described(channels: Sequence[str]) -> str:
    """The channels for a log line: a pipeline's partitions counted, not listed."""
    partitioned = [c for c in channels if c.rpartition(".")[2].isdigit()]
    named = [c for c in channels if c not in partitioned]
    if len(partitioned) > 3:
        named.append(f"{len(partitioned)} partition channels")
    else:
        named += partitioned
    return ", ".join(named)


@attrs.define
class ListenerStats:
    received: int = 0
    connects: int = 0
    reconnects: int = 0
    probes_failed: int = 0


@attrs.frozen(kw_only=True)
class Backoff:
    """Exponential backoff with full jitter between reconnection attempts."""

    initial: float = 0.05
    maximum: float = 5.0

    def delay(self, failures: int) -> float:
        return random.uniform(0, min(self.maximum, self.initial * 2 ** min(failures, 20)))


class Listener:
    """LISTEN to ``channels`` and call ``on_notify(channel, payload)`` for each notification.

    Runs until its task is cancelled. After every successful (re)LISTEN, ``on_connect``
    runs on the connection (a worker joins there: see _membership), then ``on_listen``;
    ``probe_interval`` bounds how long a silent connection goes unchecked.
    :meth:`listen_to` changes the channels while it runs; ``on_listen`` follows a change
    that added any, since what was sent on them before went unheard.
    """

    def __init__(
        self,
        conninfo: str,
        channels: Sequence[str],
        on_notify: Callable[[str, str], None],
        *,
        on_listen: Callable[[], Awaitable[None]] | None = None,
        on_connect: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]] | None = None,
        probe_interval: float = 10.0,
        probe_timeout: float = 5.0,
        backoff: Backoff | None = None,
    ) -> None:
        if not channels:
            raise ConfigurationError("a Listener needs at least one channel")
        self.conninfo = conninfo
        self.channels = tuple(channels)
        self.on_notify = on_notify
        self.on_listen = on_listen
        self.on_connect = on_connect
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.backoff = backoff or Backoff()
        self.stats = ListenerStats()
        self.connected = anyio.Event()
        self.backend_pid: int | None = None
        self._reader: SocketReader | None = None

    def listen_to(self, channels: Sequence[str]) -> None:
        """Listen to ``channels`` from now on (the connection's LISTENs follow at once)."""
        if not channels:
            raise ConfigurationError("a Listener needs at least one channel")
        if tuple(channels) != self.channels:
            self.channels = tuple(channels)
            if self._reader is not None:
                self._reader.interrupt()

    async def run(self) -> None:
        """Listen forever, reconnecting with backoff; return only by cancellation.

        Raises :class:`~pgstagechain.DatabaseAccessError` when the server refuses the
        connection for good (wrong password, no such database or role, no privilege).
        """
        failures = 0
        while True:
            connects = self.stats.connects
            try:
                await self._session()
            except (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError, OSError) as exc:
                problem = access_problem(exc)
                if problem is not None:
                    raise DatabaseAccessError(problem, redact(self.conninfo)) from None
                if self.stats.connects > connects:
                    failures = 0  # it was up: start the backoff over
                self.backend_pid = None
                self.connected = anyio.Event()
                self.stats.reconnects += 1
                delay = self.backoff.delay(failures)
                failures += 1
                logger.warning(
                    "listener connection to %s lost (%s); reconnecting in %.2fs",
                    redact(self.conninfo),
                    str(exc).strip() or type(exc).__name__,
                    delay,
                )
                await anyio.sleep(delay)

    async def _session(self) -> None:
        conn = await connect(self.conninfo, autocommit=True, application_name=APPLICATION_NAME)
        try:
            # Whatever arrives while a statement runs here (LISTEN, on_connect, a probe)
            # comes through this handler; between statements, through the socket's reader.
            conn.add_notify_handler(self._handle)
            listening = await self._follow(conn, frozenset())
            self.backend_pid = conn.info.backend_pid
            if self.on_connect is not None:  # on this connection, after LISTEN
                await self.on_connect(conn)
            self.stats.connects += 1
            self.connected.set()
            logger.info("listening on %s (backend %s)", _described(self.channels), self.backend_pid)
            if self.on_listen is not None:
                await self.on_listen()
            self._reader = reader = SocketReader(conn, self._take)
            while True:
                if frozenset(self.channels) != listening:
                    before, listening = listening, await self._follow(conn, listening)
                    if listening - before and self.on_listen is not None:
                        await self.on_listen()  # for what was sent before we listened
                    continue
                if await reader.read_for(self.probe_interval):
                    continue  # the channels changed
                try:
                    with anyio.fail_after(self.probe_timeout):
                        await conn.execute(plain("liveness"))
                except TimeoutError:
                    self.stats.probes_failed += 1
                    raise
        finally:
            self._reader = None
            # Closed without a statement first (``async with`` rolls back, which may
            # yield and so be cancelled again before it closes).
            with anyio.CancelScope(shield=True):
                await conn.close()

    async def _follow(
        self, conn: psycopg.AsyncConnection[Any], listening: frozenset[str]
    ) -> frozenset[str]:
        """LISTEN to the channels wanted and not yet listened to, UNLISTEN the others: one
        round trip. Returns the channels listened to now."""
        wanted = frozenset(self.channels)
        changes = [("listen", c) for c in sorted(wanted - listening)]
        changes += [("unlisten", c) for c in sorted(listening - wanted)]
        if changes:
            statement = sql.SQL("; ").join(
                sql.SQL(Statements({"channel_name": sql.Identifier(channel)}).text(name))
                for name, channel in changes
            )
            await conn.execute(statement)
        return wanted

    def _handle(self, note: psycopg.Notify) -> None:
        self._take(note.channel, note.payload, note.pid)

    def _take(self, channel: str, payload: str, pid: int) -> None:
        if pid == self.backend_pid:
            return  # sent on this connection (by on_connect): not news
        self.stats.received += 1
        try:
            self.on_notify(channel, payload)
        except Exception:  # one bad notification must not cost the connection
            logger.exception("notification handler failed on %s", channel)


class SocketReader:
    """Read notifications as the event loop finds the connection's socket readable, in
    the loop's reader callback: the callback hands them on at once, where psycopg's
    ``notifies()`` would resolve a future and leave them to the next turn of the loop,
    one turn later for the dispatcher they wake."""

    def __init__(
        self, conn: psycopg.AsyncConnection[Any], take: Callable[[str, str, int], None]
    ) -> None:
        self.pgconn = conn.pgconn
        self.encoding = conn.info.encoding
        self.take = take
        self._failed: BaseException | None = None
        self._stop = anyio.Event()

    async def read_for(self, seconds: float) -> bool:
        """Hand on notifications for ``seconds``, or until :meth:`interrupt` (then return
        True); raise what broke the connection. The reader is off when this returns, so
        that a statement can use the socket."""
        loop = asyncio.get_running_loop()
        fd = self.pgconn.socket
        loop.add_reader(fd, self._readable)
        try:
            with anyio.move_on_after(seconds):
                await self._stop.wait()
        finally:
            loop.remove_reader(fd)
        if self._failed is not None:
            raise self._failed
        interrupted = self._stop.is_set()
        if interrupted:
            self._stop = anyio.Event()
        return interrupted

    def interrupt(self) -> None:
        """Have :meth:`read_for` return now (or its next call at once)."""
        self._stop.set()

    def _readable(self) -> None:
        if self._failed is not None:
            return
        try:
            self.pgconn.consume_input()
        except psycopg.OperationalError as exc:  # the server or the network went away
            self._failed = exc
            self._stop.set()
            return
        while (note := self.pgconn.notifies()) is not None:
            try:
                channel = note.relname.decode(self.encoding)
                payload = note.extra.decode(self.encoding)
            except UnicodeDecodeError:
                logger.exception("undecodable notification")
                continue
            self.take(channel, payload, note.be_pid)
