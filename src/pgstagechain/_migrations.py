"""The library's own schema, upgraded by numbered SQL files under ``sql/migrations``."""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

import attrs
from psycopg import AsyncConnection

from ._sql import plain
from .errors import NotInstalledError

LOCK_KEY = "pgstagechain.migrate"
FILE_NAME = re.compile(r"^(\d{4})_(\w+)\.sql$")


@attrs.frozen
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """Every migration shipped with the package, in order."""
    found = []
    for entry in resources.files("pgstagechain").joinpath("sql").joinpath("migrations").iterdir():
        match = FILE_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migration files are not numbered 1..n: {versions}")
    return found


LATEST = len(migrations())


async def applied_version(conn: AsyncConnection[Any]) -> int:
    """The schema version installed in the database, 0 when none."""
    cur = await conn.execute(plain("schema_exists"))
    row = await cur.fetchone()
    if not row or not row[0]:
        return 0
    cur = await conn.execute(plain("schema_version"))
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def migrate_schema(conn: AsyncConnection[Any]) -> list[int]:
    """Apply the missing migrations, each in its own transaction; return the versions applied.

    A transaction-level advisory lock makes concurrent callers (many workers starting at
    once) safe: the second waits, then finds nothing left to do.
    """
    done: list[int] = []
    for migration in migrations():
        async with conn.transaction():
            await conn.execute(plain("migration_lock"), {"lock": LOCK_KEY})
            await conn.execute(plain("create_schema"))
            await conn.execute(plain("create_migrations"))
            cur = await conn.execute(plain("migration_applied"), {"version": migration.version})
            if await cur.fetchone():
                continue
            await conn.execute(migration.sql.encode())
            await conn.execute(
                plain("record_migration"), {"version": migration.version, "name": migration.name}
            )
            done.append(migration.version)
    return done


async def require_schema(conn: AsyncConnection[Any]) -> None:
    """Raise :class:`NotInstalledError` unless the schema is at the version this code needs."""
    version = await applied_version(conn)
    if version < LATEST:
        raise NotInstalledError(
            f"pgstagechain schema is at version {version}, this code needs {LATEST}: "
            "run `pgstagechain migrate APP:PIPELINE` (or pgstagechain.migrate())"
        )
