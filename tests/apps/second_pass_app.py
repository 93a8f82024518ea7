"""A two-stage pipeline whose first stage's result depends on a table the test edits:
for the test that a re-run's results replace the first pass's, even when they are None."""

from __future__ import annotations

import json
from typing import Any

import psycopg

from pgstagechain import Pipeline

TABLES = """
CREATE TABLE photos (
    id int PRIMARY KEY,
    current_step text NOT NULL DEFAULT 'new',
    status text NOT NULL DEFAULT 'done'
);
CREATE TABLE found (id int PRIMARY KEY, boxes int);
CREATE TABLE described (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                        photo int NOT NULL, results jsonb NOT NULL);
"""

pipeline = Pipeline("photos", table="photos", key="id", start="new")


@pipeline.stage(after="new")
async def detect(ctx: Any) -> dict[str, int] | None:
    """What ``found`` says for the photo; None when it has no boxes there."""
    cur = await ctx.conn.execute("SELECT boxes FROM found WHERE id = %s", (int(ctx.key),))
    got = await cur.fetchone()
    return {"boxes": got[0]} if got and got[0] is not None else None


@pipeline.stage(after="detect")
async def describe(ctx: Any) -> None:
    """Record the results it was given."""
    await ctx.conn.execute(
        "INSERT INTO described (photo, results) VALUES (%s, %s)",
        (int(ctx.key), json.dumps(ctx.results)),
    )


def create_tables(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(TABLES)
