"""Opening connections: TCP keepalives on by default, DSNs that never leak passwords, and
telling an error worth retrying (a restart, a network cut) from one that never heals."""

from __future__ import annotations

import os
import re
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool

from .errors import ConfigurationError

#: the environment variable naming the database when no connection string is given
ENV_DSN = "PGSTAGECHAIN_DSN"

#: errors of the connection, not of the statement: worth trying again on a new one
DB_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)

#: libpq keepalive settings so a dead peer is noticed in ~25 s instead of hours.
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


def conninfo_with_defaults(conninfo: str, application_name: str = "pgstagechain") -> str:
    """``conninfo`` plus keepalives and an application name, unless the caller set them."""
    try:
        given = conninfo_to_dict(conninfo)
    except Exception as exc:
        raise ConfigurationError(f"invalid connection string {redact(conninfo)!r}: {exc}") from None
    extra: dict[str, Any] = {k: v for k, v in KEEPALIVES.items() if k not in given}
    extra.setdefault("application_name", given.get("application_name", application_name))
    return make_conninfo(conninfo, **extra)


def default_dsn(dsn: str | None) -> str:
    """``dsn`` if given, else ``$PGSTAGECHAIN_DSN``, else empty (libpq's own defaults)."""
    return dsn if dsn is not None else os.environ.get(ENV_DSN, "")


def redact(conninfo: str) -> str:
    """The connection string with any password replaced, safe for logs and errors."""
    try:
        params = conninfo_to_dict(conninfo)
    except Exception:
        return "<unparsable connection string>"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo("", **params)


async def connect(
    conninfo: str, *, autocommit: bool = False, application_name: str = "pgstagechain"
) -> AsyncConnection[Any]:
    """Open an async connection with the library's defaults."""
    return await AsyncConnection.connect(
        conninfo_with_defaults(conninfo, application_name), autocommit=autocommit
    )


#: SQLSTATEs that no retry can fix: invalid authorization (28), no such database,
#: insufficient privilege, no such schema.
PERMANENT_STATES = ("28", "3D000", "42501", "3F000")
#: libpq does not give a SQLSTATE for a failure while connecting, only the server's
#: message: these are the ones that mean the login itself is refused (lc_messages C/en).
PERMANENT_MESSAGES = re.compile(
    r"authentication failed"
    r"|no password supplied"
    r"|password is required"
    r"|database \S+ does not exist"
    r"|role \S+ does not exist"
    r"|is not permitted to log in"
    r"|no pg_hba\.conf entry"
    r"|permission denied for"
)


def access_problem(exc: BaseException) -> str | None:
    """The server's reason when ``exc`` means access is refused for good, else None.

    Anything else (connection refused, reset, "the database system is starting up",
    "too many clients") is taken as transient.
    """
    if not isinstance(exc, psycopg.Error):
        return None
    state = exc.sqlstate
    text = str(exc).strip()
    if state is not None:
        return _reason(text) if state.startswith(PERMANENT_STATES) else None
    found = PERMANENT_MESSAGES.search(text)
    return _reason(text) if found else None


def _reason(text: str) -> str:
    """The server's message without libpq's "connection to server at ... failed:" prefix."""
    line = text.splitlines()[0] if text else ""
    line = re.sub(r"^connection failed:\s*", "", line)
    line = re.sub(r"^connection to server .*? failed:\s*", "", line)
    return re.sub(r"^FATAL:\s*", "", line).strip() or text


class ReadPool:
    """A small pool for reads that answer people (a status page, a dashboard): opened on
    first use and bounded, so that a crowd of requests waits a little, then is refused
    (:class:`psycopg_pool.PoolTimeout`, :class:`psycopg_pool.TooManyRequests`), rather than
    taking every connection the server has."""

    def __init__(self, dsn: str | None, *, size: int, wait: float, name: str) -> None:
        self.dsn = dsn
        self.size = size
        self.wait = wait
        self.name = name
        self._pool: AsyncConnectionPool[AsyncConnection[Any]] | None = None

    async def get(self) -> AsyncConnectionPool[AsyncConnection[Any]]:
        if self._pool is None:
            self._pool = AsyncConnectionPool(
                conninfo_with_defaults(default_dsn(self.dsn), self.name),
                min_size=1,
                max_size=self.size,
                open=False,
                timeout=self.wait,
                max_waiting=self.size * 4,
                kwargs={"autocommit": True},
                name=self.name,
            )
            await self._pool.open(wait=False)
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
