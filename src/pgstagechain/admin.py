"""Operating a pipeline from Python: where its rows are, what happened to one, who is
working on it, and putting things right.

Everything ``pgstagechain status``, ``inspect``, ``retry``, ``cancel``, ``rerun`` and ``prune`` show or do, the
FastAPI status router and the example apps read from here. Each function takes an open
async connection (autocommit, or commit afterwards) and the pipeline; every statement
lives in ``sql/admin.sql``.

The status figures, per stage S that runs after step A (rows, or groups for a group stage):

* ``waiting``: at (A, done), ready to be claimed for S;
* ``running``: at (S, running): claimed, including ``retrying``;
* ``retrying``: of those, the ones whose last attempt failed and has a retry scheduled;
* ``done``: finished S, wherever they are now: at (S, done) or at any later stage of the
  same level, in any state;
* ``failed``: at (S, failed), stopped there for good (until ``retry``).

For the first group stage of a chain (the fan-in) also, counting groups with members that
failed for good (see :func:`group_issues` for each one and why):

* ``stalled``: not formed, and waiting for every member to be done (``FanIn.ALL_DONE``):
  nothing moves until an operator retries or cancels the failed members;
* ``partial``: formed without them (``FanIn.SETTLED``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import attrs
from psycopg import AsyncConnection
from psycopg.rows import dict_row

from ._activity import (
    Failure,
    StageMinute,
    WorkerPresence,
    failures,
    listeners,
    runs,
    throughput,
    workers,
)
from ._catalog import statements_for
from ._history import GroupIssue, History, RunRecord, group_issues, history
from ._migrations import require_schema
from ._pipeline import Pipeline
from ._prune import PruneReport, prune
from ._repair import CANCEL_REASON, CancelReport, cancel, retry
from ._rerun import rerun
from ._rerun_plan import SKIP_REASONS, RerunReport
from ._sql import pipeline_params, plain
from ._stage import Stage

__all__ = [
    "CANCEL_REASON",
    "SKIP_REASONS",
    "STATUS_WINDOW",
    "CancelReport",
    "Failure",
    "GroupIssue",
    "History",
    "PipelineLive",
    "PipelineStatus",
    "PruneReport",
    "RecentRuns",
    "RerunReport",
    "RunRecord",
    "StageLimits",
    "StageLive",
    "StageMinute",
    "StageStatus",
    "WorkerPresence",
    "cancel",
    "failures",
    "group_issues",
    "history",
    "listeners",
    "live",
    "prune",
    "rerun",
    "retry",
    "runs",
    "stage_order",
    "status",
    "throughput",
    "workers",
]

#: seconds over which finished runs are counted (:attr:`StageStatus.runs`)
STATUS_WINDOW = 3600.0


@attrs.frozen(kw_only=True)
class RecentRuns:
    """Runs of one stage that finished within the status window, and how long they took."""

    succeeded: int = 0
    failed: int = 0
    expired: int = 0
    cancelled: int = 0
    p50_seconds: float | None = None
    p95_seconds: float | None = None

    @property
    def total(self) -> int:
        return self.succeeded + self.failed + self.expired + self.cancelled


@attrs.frozen(kw_only=True)
class StageLimits:
    """A stage's cluster-wide limits as the database holds them, and where they stand:
    ``live`` runs holding its ``max_running`` slots, ``tokens`` in its rate's bucket now."""

    max_running: int | None
    #: live runs holding a slot (None: no ``max_running``)
    live: int | None
    max_per_second: float | None
    burst: float | None
    tokens: float | None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    def describe(self) -> str:
        """One line: ``2/2 live, 20/s (1.3 tokens)``."""
        parts = []
        if self.max_running is not None:
            parts.append(f"{self.live}/{self.max_running} live")
        if self.max_per_second is not None and self.tokens is not None:
            parts.append(f"{self.max_per_second:g}/s ({self.tokens:.1f} tokens)")
        return ", ".join(parts)


@attrs.frozen(kw_only=True)
class StageLive:
    """Where the rows (or groups) of one stage are, but for ``done`` (see :func:`live` and
    the module docstring)."""

    stage: str
    after: str
    group: bool
    waiting: int
    running: int
    retrying: int
    failed: int
    #: how long the oldest waiting row has waited (None: none waits, or it was set from outside)
    oldest_waiting: dt.timedelta | None
    runs: RecentRuns
    #: for a fan-in group stage: groups held up by members failed for good, and groups
    #: that formed without them (see the module docstring)
    stalled: int = 0
    partial: int = 0
    #: the stage's cluster-wide limits (None: it has none)
    limits: StageLimits | None = None

    def to_json(self) -> dict[str, Any]:
        """The form the dashboard shows."""
        age = self.oldest_waiting
        return {
            "name": self.stage,
            "after": self.after,
            "level": "group" if self.group else "row",
            "waiting": self.waiting,
            "running": self.running,
            "retrying": self.retrying,
            "failed": self.failed,
            "stalled": self.stalled,
            "partial": self.partial,
            "oldest_waiting_seconds": None if age is None else age.total_seconds(),
            "runs": attrs.asdict(self.runs),
            "limits": None if self.limits is None else self.limits.to_json(),
        }


@attrs.frozen(kw_only=True)
class StageStatus(StageLive):
    """Where the rows (or groups) of one stage are: see the module docstring."""

    done: int

    @property
    def total(self) -> int:
        """Rows (or groups) that reached this stage or are waiting for it."""
        return self.waiting + self.running + self.done + self.failed

    def to_json(self) -> dict[str, Any]:
        """The form the CLI's ``--json`` and the FastAPI router show."""
        return {**super().to_json(), "done": self.done, "total": self.total}


@attrs.frozen(kw_only=True)
class PipelineStatus:
    """Every stage's :class:`StageStatus`, in chain order."""

    pipeline: str
    table: str
    window_seconds: float
    stages: tuple[StageStatus, ...]

    def __getitem__(self, stage: str) -> StageStatus:
        for each in self.stages:
            if each.stage == stage:
                return each
        raise KeyError(stage)

    @property
    def settled(self) -> bool:
        """Nothing waits and nothing runs: every row and group is done or failed."""
        return all(s.waiting == 0 and s.running == 0 for s in self.stages)

    def to_json(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "table": self.table,
            "window_seconds": self.window_seconds,
            "stages": [s.to_json() for s in self.stages],
        }


@attrs.frozen(kw_only=True)
class PipelineLive:
    """Every stage's :class:`StageLive`, in chain order."""

    pipeline: str
    window_seconds: float
    stages: tuple[StageLive, ...]

    def __getitem__(self, stage: str) -> StageLive:
        for each in self.stages:
            if each.stage == stage:
                return each
        raise KeyError(stage)


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


async def _figures(
    conn: AsyncConnection[Any], pipeline: Pipeline, *, window: float, count_done: bool
) -> list[dict[str, Any]]:
    """Each stage's figures as :class:`StageStatus` fields; without ``count_done`` only
    the rows and groups that wait, run or failed are counted (not ``done``), each
    (step, status) pair by its own index range: the cost then follows the backlog, not
    the number of finished rows."""
    await require_schema(conn)
    q = await statements_for(conn, pipeline)
    params = {**pipeline_params(pipeline), "window": window}
    stages = stage_order(pipeline)
    row_stages = [s for s in stages if not s.group]
    group_stages = [s for s in stages if s.group]
    cur = conn.cursor(row_factory=dict_row)

    level = {params["done"]: "done", params["running"]: "running", params["failed"]: "failed"}
    if count_done:
        steps = sorted({s.name for s in row_stages} | {s.after for s in row_stages})
        await cur.execute(q.text("row_counts"), {**params, "steps": steps})
        counted_rows = await cur.fetchall()
        await cur.execute(q.text("group_counts"), params)
    else:
        pairs = _live_pairs(row_stages, params)
        await cur.execute(
            q.text("row_live_counts"), {**params, "steps": pairs[0], "statuses": pairs[1]}
        )
        counted_rows = await cur.fetchall()
        await cur.execute(
            q.text("group_live_counts"),
            {
                **params,
                "afters": [s.after for s in group_stages],
                "stages": [s.name for s in group_stages],
            },
        )
    rows = {(r["step"], level.get(r["status"], "")): r["n"] for r in counted_rows}
    groups: dict[tuple[str, str], int] = {}
    group_oldest: dict[str, dt.datetime] = {}
    for r in await cur.fetchall():
        groups[(r["step"], r["status"])] = r["n"]
        if r["oldest_done"] is not None:
            group_oldest[r["step"]] = r["oldest_done"]
    afters = [s.after for s in row_stages if s.after in pipeline]
    await cur.execute(q.text("row_oldest_waiting"), {**params, "afters": afters})
    row_oldest = {r["after"]: r["oldest"] for r in await cur.fetchall() if r["oldest"]}
    await cur.execute(q.text("recent_runs"), {**params, "stages": [s.name for s in stages]})
    recent = {
        r.pop("stage"): RecentRuns(
            **{k: v for k, v in r.items() if k not in ("p50", "p95")},
            p50_seconds=None if r["p50"] is None else float(r["p50"]),
            p95_seconds=None if r["p95"] is None else float(r["p95"]),
        )
        for r in await cur.fetchall()
    }
    await cur.execute(q.text("pending_retries"), params)
    retrying = {r["stage"]: r["n"] for r in await cur.fetchall()}
    held: dict[tuple[str, str], int] = {}
    for issue in await group_issues(conn, pipeline):
        held[(issue.stage, issue.state)] = held.get((issue.stage, issue.state), 0) + 1
    limits = await _limits(conn, pipeline)
    now_row = await (await conn.execute(q.text("now"))).fetchone()
    assert now_row is not None
    now: dt.datetime = now_row[0]

    found: list[dict[str, Any]] = []
    for each in stages:
        counts = groups if each.group else rows
        oldest_at = (group_oldest if each.group else row_oldest).get(each.after)
        figures: dict[str, Any] = {
            "stage": each.name,
            "after": each.after,
            "group": each.group,
            "waiting": counts.get((each.after, "done"), 0),
            "running": counts.get((each.name, "running"), 0),
            "retrying": retrying.get(each.name, 0),
            "failed": counts.get((each.name, "failed"), 0),
            "oldest_waiting": (now - oldest_at) if oldest_at is not None else None,
            "runs": recent.get(each.name, RecentRuns()),
            "stalled": held.get((each.name, "stalled"), 0),
            "partial": held.get((each.name, "partial"), 0),
            "limits": limits.get(each.name),
        }
        if count_done:
            later = _downstream(pipeline, each)
            figures["done"] = counts.get((each.name, "done"), 0) + sum(
                n for (step, _), n in counts.items() if step in later
            )
        found.append(figures)
    return found


async def _limits(conn: AsyncConnection[Any], pipeline: Pipeline) -> dict[str, StageLimits]:
    """Each limited stage's limits and where they stand (see :class:`StageLimits`)."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(plain("limits_status"), pipeline_params(pipeline))
    return {
        r["stage"]: StageLimits(
            max_running=r["max_running"],
            live=None if r["max_running"] is None else int(r["taken"]),
            max_per_second=r["max_per_second"],
            burst=r["burst"],
            tokens=None if r["tokens"] is None else float(r["tokens"]),
        )
        for r in await cur.fetchall()
    }


def _live_pairs(stages: Sequence[Stage], values: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The (step, status) pairs that hold the stages' waiting, running and failed rows."""
    steps: list[str] = []
    statuses: list[str] = []
    for each in stages:
        for step, state in (
            (each.after, values["done"]),
            (each.name, values["running"]),
            (each.name, values["failed"]),
        ):
            steps.append(step)
            statuses.append(state)
    return steps, statuses


async def status(
    conn: AsyncConnection[Any], pipeline: Pipeline, *, window: float = STATUS_WINDOW
) -> PipelineStatus:
    """Every stage's counts, oldest waiting age and runs of the last ``window`` seconds."""
    found = await _figures(conn, pipeline, window=window, count_done=True)
    spec = pipeline.table
    return PipelineStatus(
        pipeline=pipeline.name,
        table=f"{spec.schema}.{spec.table}",
        window_seconds=window,
        stages=tuple(StageStatus(**f) for f in found),
    )


async def live(
    conn: AsyncConnection[Any], pipeline: Pipeline, *, window: float = STATUS_WINDOW
) -> PipelineLive:
    """:func:`status` without the ``done`` figures, for a screen refreshed every few
    seconds: the same definitions, at a cost that follows the rows waiting, running or
    failed rather than every row the pipeline ever finished."""
    found = await _figures(conn, pipeline, window=window, count_done=False)
    return PipelineLive(
        pipeline=pipeline.name,
        window_seconds=window,
        stages=tuple(StageLive(**f) for f in found),
    )
