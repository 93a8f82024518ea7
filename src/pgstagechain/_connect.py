"""Opening connections: TCP keepalives on by default, and DSNs that never leak passwords."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .errors import ConfigurationError

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
