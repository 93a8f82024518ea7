"""What just happened to a pipeline and who is working on it: failures with their
error, finished runs per minute, the workers holding live runs, the runs of some groups
(public as :mod:`pgstagechain.admin`)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import attrs
from psycopg import AsyncConnection
from psycopg.rows import dict_row

from ._catalog import statements_for
from ._history import RunRecord
from ._listener import APPLICATION_NAME
from ._migrations import require_schema
from ._pipeline import Pipeline
from ._sql import pipeline_params, plain
from .errors import ConfigurationError


@attrs.frozen(kw_only=True)
class Failure:
    """A row or group stopped at a failed stage, with the error of its latest run there."""

    level: str
    key: str
    group_key: str | None
    stage: str
    error: str | None
    finished_at: dt.datetime | None
    #: the attempt of that latest run (None: no run recorded, e.g. set failed from outside)
    attempt: int | None = None


@attrs.frozen(kw_only=True)
class StageMinute:
    """Runs of one stage that finished within one minute: succeeded, or failed/expired."""

    stage: str
    minute: dt.datetime
    succeeded: int
    failed: int


@attrs.frozen(kw_only=True)
class WorkerPresence:
    """A worker that holds runs of the pipeline now."""

    worker_id: str
    running: int
    stages: tuple[str, ...]
    oldest_started: dt.datetime
    lease_until: dt.datetime


async def failures(
    conn: AsyncConnection[Any],
    pipeline: Pipeline,
    *,
    groups: Sequence[str] | None = None,
    stage: str | None = None,
    limit: int = 100,
) -> list[Failure]:
    """Rows and groups at a failed stage, the most recent first, each with its error and
    the attempt it failed at.

    ``groups`` keeps only the rows of those groups (and those groups themselves);
    ``stage`` only those failed at that stage.
    """
    if stage is not None and stage not in pipeline:
        raise ConfigurationError(f"pipeline {pipeline.name!r} has no stage {stage!r}")
    await require_schema(conn)
    q = await statements_for(conn, pipeline)
    chosen = [s for s in pipeline if stage is None or s.name == stage]
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        q.text("failures"),
        {
            **pipeline_params(pipeline),
            "row_stages": [s.name for s in chosen if not s.group],
            "group_stages": [s.name for s in chosen if s.group],
            "groups": None if groups is None else [str(g) for g in groups],
            "limit": limit,
        },
    )
    return [Failure(**r) for r in await cur.fetchall()]


async def throughput(
    conn: AsyncConnection[Any], pipeline: Pipeline, *, minutes: int = 15
) -> list[StageMinute]:
    """Finished runs per stage and minute, over the last ``minutes`` whole minutes and the
    current one, oldest first; minutes with no run are left out."""
    if not isinstance(minutes, int) or not 1 <= minutes <= 1440:
        raise ConfigurationError(f"minutes must be an integer from 1 to 1440, got {minutes!r}")
    await require_schema(conn)
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(plain("throughput"), {"pipeline": pipeline.name, "minutes": minutes})
    return [StageMinute(**r) for r in await cur.fetchall()]


async def workers(conn: AsyncConnection[Any], pipeline: Pipeline) -> list[WorkerPresence]:
    """The workers that hold live runs of the pipeline, by worker id."""
    await require_schema(conn)
    q = await statements_for(conn, pipeline)
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        q.text("live_workers"),
        {
            **pipeline_params(pipeline),
            "row_stages": [s.name for s in pipeline if not s.group],
            "group_stages": [s.name for s in pipeline if s.group],
        },
    )
    return [WorkerPresence(**{**r, "stages": tuple(r["stages"])}) for r in await cur.fetchall()]


async def listeners(conn: AsyncConnection[Any]) -> int:
    """How many worker connections listen for notifications on this database (any pipeline)."""
    cur = await conn.execute(plain("listeners"), {"name": APPLICATION_NAME})
    found = await cur.fetchone()
    return int(found[0]) if found else 0


async def runs(
    conn: AsyncConnection[Any], pipeline: Pipeline, *, groups: Sequence[str]
) -> list[RunRecord]:
    """Every run of the rows of ``groups`` and of the groups themselves, oldest first."""
    await require_schema(conn)
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        plain("runs_of_groups"), {"pipeline": pipeline.name, "groups": [str(g) for g in groups]}
    )
    return [RunRecord(**r) for r in await cur.fetchall()]
