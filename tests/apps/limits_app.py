"""Pipelines whose stages have cluster-wide limits, for worker subprocesses in tests:
``python -m pgstagechain worker tests.apps.limits_app:slots``.

Each pipeline works on its own table (:data:`TABLES`): a row starts at ``(new, done)``,
runs ``work`` (the limited stage) and then ``after_work``.
"""

from __future__ import annotations

import os
from typing import Any

import anyio

from pgstagechain import Pipeline

#: seconds the limited stage's handler takes (a test may ask for more)
WORK_SECONDS = float(os.environ.get("LIMITS_WORK_SECONDS", "0.2"))

TABLES = """
CREATE TABLE slot_items (id bigint PRIMARY KEY, current_step text, status text);
CREATE TABLE single_items (id bigint PRIMARY KEY, current_step text, status text);
CREATE TABLE rated_items (id bigint PRIMARY KEY, current_step text, status text);
CREATE TABLE expiring_items (id bigint PRIMARY KEY, current_step text, status text);
CREATE TABLE chained_items (id bigint PRIMARY KEY, current_step text, status text);
"""


async def work(ctx: Any) -> dict[str, Any]:
    await anyio.sleep(WORK_SECONDS)
    return {"worker": ctx.worker_id}


async def quick(ctx: Any) -> None:
    return None


async def instant(ctx: Any) -> None:
    return None


def limited(name: str, table: str, handler: Any, **limits: Any) -> Pipeline:
    pipeline = Pipeline(name, table=table, start="new")
    pipeline.stage(after="new", name="work", connection=False, **limits)(handler)
    pipeline.stage(after="work", name="after_work", connection=False)(quick)
    return pipeline


#: at most two live runs of ``work`` over every worker
slots = limited("slots", "slot_items", work, max_running=2)
#: one live run at a time
single = limited("single", "single_items", work, max_running=1)
#: twenty starts a second, handlers that take no time
rated = limited("rated", "rated_items", instant, max_per_second=20)
#: two slots, for a test that kills the worker holding them
slots_expiring = limited("slots_expiring", "expiring_items", work, max_running=2)


def _chained() -> Pipeline:
    pipeline = Pipeline("chained", table="chained_items", start="new")
    pipeline.stage(after="new", name="first", connection=False)(quick)
    pipeline.stage(after="first", name="work", connection=False, max_running=2)(work)
    pipeline.stage(after="work", name="after_work", connection=False)(quick)
    return pipeline


#: a quick stage, then ``work`` with two slots: rows go straight on into it when they can
chained = _chained()
