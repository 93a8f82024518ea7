"""LISTEN on a dedicated connection that survives restarts, cuts and half-open sockets.

Notifications are hints: the listener hands each payload to a callback and, after
every (re)LISTEN, calls ``on_listen`` so the owner can scan for what it missed while
it was away. A quiet connection is probed on an interval with a deadline, so a peer
that vanished without a FIN is noticed in seconds.
"""

from __future__ import annotations

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
        async with conn:
            for channel in self.channels:
                names: dict[str, sql.Composable] = {"channel_name": sql.Identifier(channel)}
                await conn.execute(Statements(names).text("listen"))
            self.backend_pid = conn.info.backend_pid
            if self.on_connect is not None:  # on this connection, after LISTEN
                await self.on_connect(conn)
            self.stats.connects += 1
            self.connected.set()
            logger.info("listening on %s (backend %s)", ", ".join(self.channels), self.backend_pid)
            if self.on_listen is not None:
                await self.on_listen()
            while True:
                async for note in conn.notifies(timeout=self.probe_interval):
                    if note.pid == self.backend_pid:
                        continue  # sent on this connection (by on_connect): not news
                    self.stats.received += 1
                    try:
                        self.on_notify(note.channel, note.payload)
                    except Exception:  # one bad notification must not cost the connection
                        logger.exception("notification handler failed on %s", note.channel)
                try:
                    with anyio.fail_after(self.probe_timeout):
                        await conn.execute(plain("liveness"))
                except TimeoutError:
                    self.stats.probes_failed += 1
                    raise
