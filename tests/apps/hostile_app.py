"""A pipeline keyed by text, whose one stage fails for good with the key in its error:
for tests that show hostile keys and error texts in the dashboard."""

from __future__ import annotations

from typing import Any

import psycopg

from pgstagechain import PermanentError, Pipeline

TABLE = """
CREATE TABLE notes (
    name text PRIMARY KEY,
    current_step text NOT NULL DEFAULT 'new',
    status text NOT NULL DEFAULT 'done'
);
"""

pipeline = Pipeline("notes", table="notes", key="name", start="new")


@pipeline.stage(after="new")
async def read_note(ctx: Any) -> None:
    raise PermanentError(f"cannot read {ctx.key}")


def create_table(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(TABLE)
