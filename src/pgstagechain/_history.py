"""A row's (or a group's) position and its runs: ``pgstagechain inspect``, public as
:func:`pgstagechain.admin.history`."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import psycopg
from psycopg import AsyncConnection
from psycopg.rows import dict_row

from ._catalog import statements_for
from ._context import FailedMember
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
    #: when a re-run of this run's stage set its result aside (``ctx.results`` skips it)
    superseded_at: dt.datetime | None = None

    @property
    def seconds(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


@attrs.frozen(kw_only=True)
class GroupIssue:
    """A group with members that failed for good, and what its fan-in policy made of it.

    ``state`` is ``stalled`` (the group waits for every member to be done, ``FanIn.ALL_DONE``:
    it moves only once an operator retries or cancels the failed ones), ``waiting`` (it will
    proceed without them once the other members settle, ``FanIn.SETTLED``), ``partial`` (it
    formed without them) or ``failed`` (the group failed: ``FanIn.FAIL_FAST``, or every
    member failed). ``reason`` says so in a sentence.
    """

    group_key: str
    #: the group stage whose group this is, and its fan-in policy (a ``FanIn`` value)
    stage: str
    fan_in: str
    state: str
    reason: str
    members: int
    failed_members: Mapping[str, FailedMember]
    group_step: str | None
    group_status: str | None


def _failed_list(failed: Mapping[str, FailedMember]) -> str:
    shown = [
        f"{key} at {f.stage}" + (f" ({_last_line(f.error)})" if f.error else "")
        for key, f in sorted(failed.items())
    ]
    return ", ".join(shown)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def group_issue(pipeline: Pipeline, found: Mapping[str, Any]) -> GroupIssue | None:
    """Classify one row of the ``group_issues`` statement."""
    failed = {k: FailedMember(**v) for k, v in found["failed_members"].items()}
    owners = pipeline.fan_in_of()
    stage = next((owners[f.stage] for f in failed.values() if f.stage in owners), None)
    if stage is None:
        return None
    n, members = len(failed), found["members"]
    which = f"member{'s' if n > 1 else ''} {_failed_list(failed)}"
    if found["group_status"] == "failed":
        state = "failed"
        reason = f"the group failed: {found['group_error'] or which}"
    elif found["group_step"] is not None:
        state = "partial"
        reason = f"formed without {n} of {members} members, failed for good: {which}"
    elif stage.fan_in.value == "settled":
        state = "waiting"
        reason = f"{n} of {members} members failed for good ({which}); proceeds without them once the others settle"
    else:
        state = "stalled"
        reason = (
            f"{n} of {members} members failed for good ({which}) and fan-in "
            f"{stage.fan_in.name} waits for every member to be done: retry or cancel them"
        )
    return GroupIssue(
        group_key=found["group_key"],
        stage=stage.name,
        fan_in=stage.fan_in.value,
        state=state,
        reason=reason,
        members=members,
        failed_members=failed,
        group_step=found["group_step"],
        group_status=found["group_status"],
    )


async def group_issues(
    conn: AsyncConnection[Any],
    pipeline: Pipeline,
    *,
    groups: Sequence[str] | None = None,
) -> list[GroupIssue]:
    """Groups with members that failed for good (``groups``: only those), by group key."""
    if pipeline.table.group_column is None:
        return []
    await require_schema(conn)
    q = await statements_for(conn, pipeline)
    statuses = pipeline.table.statuses
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        q.text("group_issues"),
        {
            "pipeline": pipeline.name,
            "failed": statuses.failed,
            "member_steps": list(pipeline.fan_in_of()),
            "groups": None if groups is None else [str(g) for g in groups],
        },
    )
    found = [group_issue(pipeline, r) for r in await cur.fetchall()]
    return [each for each in found if each is not None]


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
    #: the group has members that failed for good: what that did to it (see GroupIssue)
    issue: GroupIssue | None = None


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
        issues = await group_issues(conn, pipeline, groups=[key])
        if found is None and not group_runs and not issues:
            raise ConfigurationError(f"pipeline {pipeline.name!r} has no group {key!r}")
        return History(
            key=key,
            group=True,
            step=found["step"] if found else None,
            status=found["status"] if found else None,
            group_key=key,
            runs=group_runs,
            issue=issues[0] if issues else None,
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
            issue=next(iter(await group_issues(conn, pipeline, groups=[group_key])), None),
        )
    return result
