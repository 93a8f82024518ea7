"""A pipeline for the retention tests: three row stages, then two group stages.

``items`` rows start at ``(new, done)``; ``first`` → ``second`` → ``third`` run per row,
``gather`` (``FanIn.SETTLED``) and ``publish`` per batch. Rows whose id is a multiple of 7
fail for good at ``second``. ``third``, ``gather`` and ``publish`` write what they were
given (``ctx.results``, ``ctx.members``) to ``seen``, in their own transaction, so a test
can check that nothing they read had been pruned.

``RETENTION_APP_SECONDS`` (the ``finished`` window, in seconds) and
``RETENTION_APP_FAILED_SECONDS`` give the pipeline a retention that workers apply every
``RETENTION_APP_EVERY`` seconds; with ``RETENTION_APP_GATE`` set, ``third`` waits until
a row is inserted into ``gate``, so that rows wait mid-chain longer than that window.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import anyio
from psycopg.types.json import Jsonb

from pgstagechain import FanIn, PermanentError, Pipeline, Retention

TABLES = """
CREATE TABLE items (
    id bigint PRIMARY KEY,
    batch_id bigint NOT NULL,
    current_step text NOT NULL DEFAULT 'new',
    status text NOT NULL DEFAULT 'done'
);
CREATE TABLE gate (opened timestamptz NOT NULL DEFAULT now());
CREATE TABLE seen (
    key text NOT NULL,
    stage text NOT NULL,
    given jsonb NOT NULL,
    failed jsonb
);
"""

ROW_STAGES = ("first", "second", "third")
GROUP_STAGES = ("gather", "publish")


def fails(key: Any) -> bool:
    return int(key) % 7 == 0


def _retention() -> Retention | None:
    seconds = os.environ.get("RETENTION_APP_SECONDS")
    if not seconds:
        return None
    failed = os.environ.get("RETENTION_APP_FAILED_SECONDS")
    return Retention(
        finished=dt.timedelta(seconds=float(seconds)),
        failed=dt.timedelta(seconds=float(failed)) if failed else None,
        every=dt.timedelta(seconds=float(os.environ.get("RETENTION_APP_EVERY", "0.2"))),
        batch=int(os.environ.get("RETENTION_APP_BATCH", "50")),
    )


def make_pipeline(retention: Retention | None = None) -> Pipeline:
    pipeline = Pipeline(
        "keeper",
        table="items",
        group_column="batch_id",
        start="new",
        retention=retention,
    )

    @pipeline.stage(after="new")
    async def first(ctx: Any) -> dict[str, Any]:
        return {"stage": "first", "key": str(ctx.key)}

    @pipeline.stage(after="first")
    async def second(ctx: Any) -> dict[str, Any]:
        if fails(ctx.key):
            raise PermanentError(f"row {ctx.key} cannot pass second")
        return {"stage": "second", "key": str(ctx.key)}

    @pipeline.stage(after="second", concurrency=2)
    async def third(ctx: Any) -> dict[str, Any]:
        while os.environ.get("RETENTION_APP_GATE"):  # until the test opens the gate
            cur = await ctx.conn.execute("SELECT count(*) FROM gate")
            found = await cur.fetchone()
            if found and found[0]:
                break
            await anyio.sleep(0.05)
        await ctx.conn.execute(
            "INSERT INTO seen (key, stage, given) VALUES (%s, 'third', %s)",
            (str(ctx.key), Jsonb(ctx.results)),
        )
        return {"stage": "third", "key": str(ctx.key)}

    @pipeline.stage(after="third", group=True, fan_in=FanIn.SETTLED)
    async def gather(ctx: Any) -> dict[str, Any]:
        await ctx.conn.execute(
            "INSERT INTO seen (key, stage, given, failed) VALUES (%s, 'gather', %s, %s)",
            (
                str(ctx.key),
                Jsonb(ctx.members),
                Jsonb({k: f.error for k, f in ctx.failed_members.items()}),
            ),
        )
        return {"stage": "gather", "members": sorted(ctx.members)}

    @pipeline.stage(after="gather", group=True)
    async def publish(ctx: Any) -> dict[str, Any]:
        await ctx.conn.execute(
            "INSERT INTO seen (key, stage, given) VALUES (%s, 'publish', %s)",
            (str(ctx.key), Jsonb(ctx.results)),
        )
        return {"stage": "publish"}

    return pipeline


pipeline = make_pipeline(_retention())
