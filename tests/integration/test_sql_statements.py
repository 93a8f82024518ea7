"""Every statement of the SQL files, as PostgreSQL sees it for a table whose every name
needs quoting."""

from __future__ import annotations

import re

import pytest

from tests.unit.test_sql import AWKWARD, STATEMENTS, USE_NAMES, awkward_pipeline


def create_awkward_table(dsn: str) -> None:
    import psycopg
    from psycopg import sql

    schema = sql.Identifier(AWKWARD["schema"])
    columns = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(kind))
        for name, kind in [
            (AWKWARD["key"], "bigint PRIMARY KEY"),
            (AWKWARD["step_column"], "text NOT NULL"),
            (AWKWARD["status_column"], "text NOT NULL"),
            (AWKWARD["group_column"], "text"),
            (AWKWARD["extra_columns"][0], "text"),
        ]
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
        conn.execute(
            sql.SQL("CREATE TABLE {} ({})").format(
                sql.Identifier(AWKWARD["schema"], AWKWARD["table"]), columns
            )
        )


def as_prepared(text: str) -> str:
    """``%(name)s`` parameters as ``$n``, the form PREPARE takes."""
    numbers: dict[str, int] = {}

    def number(match: re.Match[str]) -> str:
        return f"${numbers.setdefault(match[1], len(numbers) + 1)}"

    return re.sub(r"%\((\w+)\)s", number, text).replace("%%", "%")


@pytest.mark.anyio
async def test_postgresql_accepts_every_statement_for_awkward_names(pgstagechain_dsn: str) -> None:
    """PREPARE parses and plans each statement against a table whose every name needs
    quoting: a typo or a wrong type in a file fails here, not in a worker."""
    import psycopg

    from pgstagechain import migrate
    from pgstagechain._catalog import statements_for

    pipeline = awkward_pipeline()
    create_awkward_table(pgstagechain_dsn)
    await migrate(pgstagechain_dsn, pipeline)
    async with await psycopg.AsyncConnection.connect(pgstagechain_dsn, autocommit=True) as conn:
        rendered = (await statements_for(conn, pipeline)).with_names(**USE_NAMES)
        prepared = 0
        for name in STATEMENTS:
            text = rendered.text(name)
            if text.split(None, 1)[0].upper() in ("SELECT", "WITH", "INSERT", "UPDATE"):
                await conn.execute(f"PREPARE s{prepared} AS {as_prepared(text)}")
                prepared += 1
    assert prepared >= 30  # every pipeline statement; DDL cannot be prepared
