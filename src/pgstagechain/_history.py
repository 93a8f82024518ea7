"""A row's (or a group's) position and its runs: ``pgstagechain inspect``, public as
:func:`pgstagechain.admin.history`."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import attrs
import psycopg
from psycopg import AsyncConnection
from psycopg.rows import dict_row

from ._catalog import statements_for
from ._migrations import require_schema
from ._pipeline import Pipeline
from ._repair import bad_key
from ._sql import plain
from .errors import ConfigurationError


@attrs.frozen(kw_only=True)
class RunRecord:
    """One run of a stage, from the run ledger."""

    id: int
    stage: str
    row_key: str
    group_key: str | None
    attempt: int
    state: str
    worker_id: str
    started_at: dt.datetime
    finished_at: dt.datetime | None
    retry_at: dt.datetime | None
    error: str | None
    result: Any

    @property
    def seconds(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


@attrs.frozen(kw_only=True)
class History:
    """A row's (or a group's) current position and every run of every stage for it."""

    key: str
    group: bool
    step: str | None
    status: str | None
    group_key: str | None
    runs: tuple[RunRecord, ...]
    #: for a row in a group: the group's own position and runs, when it has one
    group_step: str | None = None
    group_status: str | None = None
    group_runs: tuple[RunRecord, ...] = ()


async def _runs_of(
    conn: AsyncConnection[Any], pipeline: Pipeline, key: str, stages: Sequence[str]
) -> tuple[RunRecord, ...]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        plain("runs_of"), {"pipeline": pipeline.name, "key": key, "stages": list(stages)}
    )
    return tuple(RunRecord(**r) for r in await cur.fetchall())


async def history(
    conn: AsyncConnection[Any], pipeline: Pipeline, key: str, *, group: bool = False
) -> History:
    """Where row ``key`` (or group ``key`` with ``group=True``) is, and all its runs.

    Raises :class:`~pgstagechain.ConfigurationError` when there is no such row or group.
    """
    await require_schema(conn)
    q = await statements_for(conn, pipeline)
    spec = pipeline.table
    row_stage_names = [s.name for s in pipeline if not s.group]
    group_stage_names = [s.name for s in pipeline if s.group]
    cur = conn.cursor(row_factory=dict_row)
    if group:
        await cur.execute(q.text("group_position"), {"pipeline": pipeline.name, "key": key})
        found = await cur.fetchone()
        group_runs = await _runs_of(conn, pipeline, key, group_stage_names)
        if found is None and not group_runs:
            raise ConfigurationError(f"pipeline {pipeline.name!r} has no group {key!r}")
        return History(
            key=key,
            group=True,
            step=found["step"] if found else None,
            status=found["status"] if found else None,
            group_key=key,
            runs=group_runs,
        )
    try:
        async with conn.transaction():
            await cur.execute(q.text("row_position"), {"key": key})
            found = await cur.fetchone()
    except psycopg.errors.DataError:
        raise await bad_key(conn, pipeline, key) from None
    if found is None:
        raise ConfigurationError(
            f"table {spec.schema}.{spec.table} has no row with {spec.key} = {key!r}"
            + (" (for a group, pass group=True / --group)" if spec.group_column else "")
        )
    group_key = found["group_key"]
    result = History(
        key=key,
        group=False,
        step=found["step"],
        status=found["status"],
        group_key=group_key,
        runs=await _runs_of(conn, pipeline, key, row_stage_names),
    )
    if group_key is not None and group_stage_names:
        await cur.execute(q.text("group_position"), {"pipeline": pipeline.name, "key": group_key})
        position = await cur.fetchone()
        result = attrs.evolve(
            result,
            group_step=position["step"] if position else None,
            group_status=position["status"] if position else None,
            group_runs=await _runs_of(conn, pipeline, group_key, group_stage_names),
        )
    return result
