"""Reading the user's table from the catalog: does it exist, and what types are its keys."""

from __future__ import annotations

from typing import Any

import attrs
from psycopg import AsyncConnection

from ._pipeline import Pipeline
from .errors import SchemaMismatchError


@attrs.frozen(kw_only=True)
class TableInfo:
    """Catalog facts needed to cast keys that arrive as text back to the column's type."""

    key_type: str
    group_type: str | None


COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type_name
FROM pg_attribute a
WHERE a.attrelid = to_regclass(format('%%I.%%I', %(schema)s::text, %(table)s::text))
  AND a.attnum > 0 AND NOT a.attisdropped
"""


async def inspect_table(conn: AsyncConnection[Any], pipeline: Pipeline) -> TableInfo:
    """Check that the pipeline's table and columns exist; raise a typed error naming the culprit."""
    spec = pipeline.table
    cur = await conn.execute(COLUMNS, {"schema": spec.schema, "table": spec.table})
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
