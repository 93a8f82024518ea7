"""Operating a pipeline: what is where, what happened to a row, and putting things right.

These are the statements behind ``pgstagechain status``, ``inspect``, ``retry`` and
``cancel``, usable from Python as well: each takes an open async connection and the
pipeline. Identifiers from the pipeline's configuration go through
:class:`psycopg.sql.Identifier`; the key type is read from the catalog.

``retry`` and ``cancel`` are single statements, so they race safely with running
workers: a completion that lands first wins (the row is no longer failed, or no longer
running), and one that lands after a cancel finds its run closed and is discarded.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import attrs
import psycopg
from psycopg import AsyncConnection
from psycopg.rows import dict_row

from ._catalog import inspect_table, statements_for
from ._install import require_installed
from ._migrations import require_schema
from ._pipeline import Pipeline
from ._sql import plain
from ._stage import Stage
from .errors import ConfigurationError

CANCEL_REASON = "cancelled by operator"


@attrs.frozen(kw_only=True)
class StageStatus:
    """One line of ``pgstagechain status``: where the rows (or groups) of one stage are.

    ``waiting`` are at (previous step, done), ready to be claimed; ``running`` are
    claimed, including ``retrying`` (a failed attempt with a retry pending); ``done``
    have finished this stage, wherever they are now; ``failed`` stopped at this stage.
    Durations are over runs finished in the last hour.
    """

    stage: str
    after: str
    group: bool
    waiting: int
    running: int
    retrying: int
    done: int
    failed: int
    oldest_waiting: dt.timedelta | None
    runs_last_hour: int
    p50_seconds: float | None
    p95_seconds: float | None

    @property
    def total(self) -> int:
        """Rows (or groups) that reached this stage or are waiting for it."""
        return self.waiting + self.running + self.done + self.failed


@attrs.frozen(kw_only=True)
class RunRecord:
    """One run of a stage, from ``pgstagechain.runs``."""

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


@attrs.frozen(kw_only=True)
class CancelReport:
    """What :func:`cancel` did."""

    keys: tuple[str, ...]
    runs_closed: int
    retries_dropped: int


def stage_order(pipeline: Pipeline) -> list[Stage]:
    """The stages in chain order: from each start step onwards, then any left over."""
    ordered: list[Stage] = []
    for start in pipeline.start_steps:
        step = start
        while (found := pipeline.next_stage(step)) is not None and found not in ordered:
            ordered.append(found)
            step = found.name
    ordered += [s for s in pipeline if s not in ordered]
    return ordered


def _downstream(pipeline: Pipeline, stage: Stage) -> list[str]:
    """Stage names after ``stage`` on the same level (row or group)."""
    found: list[str] = []
    step = stage.name
    while (nxt := pipeline.next_stage(step)) is not None and nxt.group == stage.group:
        if nxt.name in found:
            break
        found.append(nxt.name)
        step = nxt.name
    return found


def _base(pipeline: Pipeline) -> dict[str, Any]:
    statuses = pipeline.table.statuses
    return {
        "pipeline": pipeline.name,
        "done": statuses.done,
        "running": statuses.running,
        "failed": statuses.failed,
    }


async def status(conn: AsyncConnection[Any], pipeline: Pipeline) -> list[StageStatus]:
    """Counts, oldest waiting age and recent durations for every stage, in chain order."""
    await require_schema(conn)
    q = await statements_for(conn, pipeline)
    params = _base(pipeline)
    stages = stage_order(pipeline)
    row_stages = [s for s in stages if not s.group]
    row_steps = sorted({s.name for s in row_stages} | {s.after for s in row_stages})
    dict_cur = conn.cursor(row_factory=dict_row)

    await dict_cur.execute(q.text("row_counts"), {**params, "steps": row_steps})
    rows: dict[tuple[str, str], int] = {
        (r["step"], r["status"]): r["n"] for r in await dict_cur.fetchall()
    }
    await dict_cur.execute(q.text("group_counts"), params)
    groups: dict[tuple[str, str], int] = {}
    group_oldest: dict[str, dt.datetime] = {}
    for r in await dict_cur.fetchall():
        groups[(r["step"], r["status"])] = r["n"]
        if r["oldest_done"] is not None:
            group_oldest[r["step"]] = r["oldest_done"]
    afters = [s.after for s in row_stages if s.after in pipeline]
    await dict_cur.execute(q.text("row_oldest_waiting"), {**params, "afters": afters})
    row_oldest = {r["after"]: r["oldest"] for r in await dict_cur.fetchall() if r["oldest"]}
    await dict_cur.execute(q.text("durations"), {**params, "stages": [s.name for s in stages]})
    durations = {r["stage"]: r for r in await dict_cur.fetchall()}
    await dict_cur.execute(q.text("pending_retries"), params)
    retrying = {r["stage"]: r["n"] for r in await dict_cur.fetchall()}
    cur = await conn.execute(q.text("now"))
    now_row = await cur.fetchone()
    assert now_row is not None
    now: dt.datetime = now_row[0]

    result: list[StageStatus] = []
    for each in stages:
        counts = groups if each.group else rows
        oldest_at = (group_oldest if each.group else row_oldest).get(each.after)
        done = counts.get((each.name, "done" if each.group else params["done"]), 0)
        done += sum(n for (step, _), n in counts.items() if step in _downstream(pipeline, each))
        d = durations.get(each.name)
        result.append(
            StageStatus(
                stage=each.name,
                after=each.after,
                group=each.group,
                waiting=counts.get((each.after, "done" if each.group else params["done"]), 0),
                running=counts.get((each.name, "running" if each.group else params["running"]), 0),
                retrying=retrying.get(each.name, 0),
                done=done,
                failed=counts.get((each.name, "failed" if each.group else params["failed"]), 0),
                oldest_waiting=(now - oldest_at) if oldest_at is not None else None,
                runs_last_hour=d["n"] if d else 0,
                p50_seconds=float(d["p50"]) if d else None,
                p95_seconds=float(d["p95"]) if d else None,
            )
        )
    return result


async def _runs(
    conn: AsyncConnection[Any], pipeline: Pipeline, key: str, stages: Sequence[str]
) -> tuple[RunRecord, ...]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        plain("runs_of"), {"pipeline": pipeline.name, "key": key, "stages": list(stages)}
    )
    return tuple(RunRecord(**r) for r in await cur.fetchall())


async def _bad_key(conn: AsyncConnection[Any], pipeline: Pipeline, key: str) -> ConfigurationError:
    info = await inspect_table(conn, pipeline)
    spec = pipeline.table
    return ConfigurationError(
        f"{key!r} is not a valid {info.key_type} for key column "
        f"{spec.schema}.{spec.table}.{spec.key}"
    )


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
    dict_cur = conn.cursor(row_factory=dict_row)
    if group:
        await dict_cur.execute(q.text("group_position"), {"pipeline": pipeline.name, "key": key})
        found = await dict_cur.fetchone()
        runs = await _runs(conn, pipeline, key, group_stage_names)
        if found is None and not runs:
            raise ConfigurationError(f"pipeline {pipeline.name!r} has no group {key!r}")
        return History(
            key=key,
            group=True,
            step=found["step"] if found else None,
            status=found["status"] if found else None,
            group_key=key,
            runs=runs,
        )
    try:
        async with conn.transaction():
            await dict_cur.execute(q.text("row_position"), {"key": key})
            found = await dict_cur.fetchone()
    except psycopg.errors.DataError:
        raise await _bad_key(conn, pipeline, key) from None
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
        runs=await _runs(conn, pipeline, key, row_stage_names),
    )
    if group_key is not None and group_stage_names:
        await dict_cur.execute(
            q.text("group_position"), {"pipeline": pipeline.name, "key": group_key}
        )
        position = await dict_cur.fetchone()
        result = attrs.evolve(
            result,
            group_step=position["step"] if position else None,
            group_status=position["status"] if position else None,
            group_runs=await _runs(conn, pipeline, group_key, group_stage_names),
        )
    return result


def _selection(
    pipeline: Pipeline, key: str | None, group: str | None, stage: str | None
) -> tuple[bool, list[Stage]]:
    """Check that exactly one of key/group/stage is given; return (group level, stages)."""
    given = [n for n, v in (("key", key), ("group", group), ("stage", stage)) if v is not None]
    if len(given) != 1:
        raise ConfigurationError(
            f"name exactly one of key, group or stage (got {', '.join(given) or 'none'})"
        )
    if stage is not None:
        if stage not in pipeline:
            raise ConfigurationError(
                f"pipeline {pipeline.name!r} has no stage {stage!r} "
                f"(stages: {', '.join(s.name for s in pipeline)})"
            )
        target = pipeline[stage]
        return target.group, [target]
    if group is not None:
        if pipeline.table.group_column is None:
            raise ConfigurationError(f"pipeline {pipeline.name!r} has no group column")
        return True, [s for s in pipeline if s.group]
    return False, [s for s in pipeline if not s.group]


async def retry(
    conn: AsyncConnection[Any],
    pipeline: Pipeline,
    *,
    key: str | None = None,
    group: str | None = None,
    stage: str | None = None,
) -> list[str]:
    """Put failed rows (or groups) back so the stage they failed at runs again.

    Name one row ``key``, one ``group``, or a ``stage`` (every row or group failed
    there). Returns the keys moved back to (previous step, done); the trigger announces
    them and a worker claims them as a first attempt. Run it on an autocommit
    connection or commit afterwards.
    """
    is_group, stages = _selection(pipeline, key, group, stage)
    await require_installed(conn, pipeline)
    q = await statements_for(conn, pipeline)
    params = {
        **_base(pipeline),
        "stages": [s.name for s in stages],
        "afters": [s.after for s in stages],
        "key": key if key is not None else group,
    }
    try:
        async with conn.transaction():
            cur = await conn.execute(q.text("retry_groups" if is_group else "retry_rows"), params)
            return [k for (k,) in await cur.fetchall()]
    except psycopg.errors.DataError:
        raise await _bad_key(conn, pipeline, str(key)) from None


async def cancel(
    conn: AsyncConnection[Any],
    pipeline: Pipeline,
    *,
    key: str | None = None,
    group: str | None = None,
    stage: str | None = None,
) -> CancelReport:
    """Stop rows (or groups) in progress: fail them with reason ``cancelled by operator``.

    A running run is closed as ``cancelled`` (its worker's completion is then rejected
    and rolled back); a pending retry is dropped (``retry_at`` cleared, the failed run
    keeps its state). Name one row ``key``, one ``group``, or a ``stage``.
    """
    is_group, stages = _selection(pipeline, key, group, stage)
    await require_installed(conn, pipeline)
    q = await statements_for(conn, pipeline)
    params = {
        **_base(pipeline),
        "stages": [s.name for s in stages],
        "key": key if key is not None else group,
        "reason": CANCEL_REASON,
    }
    try:
        async with conn.transaction():
            cur = await conn.execute(q.text("cancel_groups" if is_group else "cancel_rows"), params)
            found = await cur.fetchone()
    except psycopg.errors.DataError:
        raise await _bad_key(conn, pipeline, str(key)) from None
    assert found is not None
    keys, closed, dropped = found
    return CancelReport(keys=tuple(keys), runs_closed=closed, retries_dropped=dropped)
