"""Reading the user's table from the catalog (does it exist, what types are its keys), and
the pipeline's statements rendered for it."""

from __future__ import annotations

import weakref
from typing import Any

import attrs
from psycopg import AsyncConnection

from ._pipeline import Pipeline
from ._sql import Statements, configured_names, plain
from .errors import SchemaMismatchError


@attrs.frozen(kw_only=True)
class TableInfo:
    """Catalog facts needed to cast keys that arrive as text back to the column's type."""

    key_type: str
    group_type: str | None


async def inspect_table(conn: AsyncConnection[Any], pipeline: Pipeline) -> TableInfo:
    """Check that the pipeline's table and columns exist; raise a typed error naming the culprit."""
    spec = pipeline.table
    cur = await conn.execute(plain("table_columns"), {"schema": spec.schema, "table": spec.table})
    types = {name: type_name for name, type_name in await cur.fetchall()}
    if not types:
        raise SchemaMismatchError(
            f"pipeline {pipeline.name!r}: table {spec.schema}.{spec.table} does not exist"
        )
    missing = [c for c in spec.columns if c not in types]
    if missing:
        raise SchemaMismatchError(
            f"pipeline {pipeline.name!r}: table {spec.schema}.{spec.table} has no column(s) "
            f"{', '.join(repr(c) for c in missing)} (it has {', '.join(sorted(types))})"
        )
    group = spec.group_column
    return TableInfo(key_type=types[spec.key], group_type=types[group] if group else None)


_statements: weakref.WeakKeyDictionary[Pipeline, Statements] = weakref.WeakKeyDictionary()


async def statements_for(conn: AsyncConnection[Any], pipeline: Pipeline) -> Statements:
    """The pipeline's statements, rendered for its table on first use (checked against
    the catalog then, and cached for the life of the pipeline object)."""
    found = _statements.get(pipeline)
    if found is None:
        info = await inspect_table(conn, pipeline)
        found = Statements(configured_names(pipeline, info.key_type, info.group_type))
        _statements[pipeline] = found
    return found
