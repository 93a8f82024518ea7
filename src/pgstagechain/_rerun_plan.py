"""What a re-run is asked to do, checked before anything is read: the stage to re-run
from and where its rows go back to, the selection's options, and the report it gives
(see ``_rerun``)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import attrs

from ._pipeline import Pipeline
from ._stage import Stage
from .errors import ConfigurationError

#: why a named row (or group) was not re-run
SKIP_REASONS = {
    "not_found": "no such row (or group: not formed)",
    "filtered_out": "named, but not selected by the other filters",
    "not_reached": "has not reached the stage",
    "in_flight": "in flight at the stage or after it (in_flight='skip')",
    "busy": "held by a worker through every attempt",
}
InFlight = Literal["cancel", "skip"]


@attrs.frozen(kw_only=True)
class RerunReport:
    """What :func:`rerun` did, or (``dry_run``) would do."""

    pipeline: str
    stage: str
    #: the step the keys went back to (as done)
    after: str
    #: the stage is a group stage: keys are group keys
    group: bool
    dry_run: bool
    #: the rows (groups) that go back, in the order they went (key order, batch by batch)
    keys: tuple[str, ...]
    #: of those, the ones that were in flight at the stage or after it
    in_flight: tuple[str, ...]
    runs_cancelled: int
    retries_dropped: int
    #: reason (see :data:`SKIP_REASONS`) -> the keys left alone for it
    skipped: dict[str, tuple[str, ...]]
    #: groups of the re-run rows (a row stage whose chain leads to a group stage): taken
    #: apart, each forms again, once, when its last re-run member is back
    groups: tuple[str, ...]
    #: of those, the groups whose group stage was at work or about to start: stopped
    groups_stopped: tuple[str, ...]

    @property
    def skipped_count(self) -> int:
        return sum(len(keys) for keys in self.skipped.values())

    def to_json(self) -> dict[str, Any]:
        """The form the CLI's ``--json`` and the dashboard show."""
        return {
            "pipeline": self.pipeline,
            "stage": self.stage,
            "after": self.after,
            "level": "group" if self.group else "row",
            "dry_run": self.dry_run,
            "rerun": len(self.keys),
            "keys": list(self.keys),
            "in_flight": list(self.in_flight),
            "runs_cancelled": self.runs_cancelled,
            "retries_dropped": self.retries_dropped,
            "skipped": {reason: list(keys) for reason, keys in self.skipped.items()},
            "skipped_count": self.skipped_count,
            "groups": list(self.groups),
            "groups_stopped": list(self.groups_stopped),
        }


@attrs.frozen(kw_only=True)
class RerunPlan:
    """The stage to re-run from, where its rows go back to, and what comes after it."""

    stage: Stage
    #: the stage and the later ones of its level: a row there has reached the stage
    reached: tuple[str, ...]
    #: for a row stage whose chain leads to a group stage: every group stage
    group_stages: tuple[str, ...]
    #: of those, the last of each chain (a group done there is finished)
    last_group_stages: tuple[str, ...]

    @property
    def reason(self) -> str:
        return f"cancelled: re-run from stage {self.stage.name} by operator"


@attrs.define
class Tally:
    keys: list[str] = attrs.field(factory=list)
    in_flight: list[str] = attrs.field(factory=list)
    runs_cancelled: int = 0
    retries_dropped: int = 0
    skipped: dict[str, list[str]] = attrs.field(factory=dict)
    groups: set[str] = attrs.field(factory=set)
    groups_stopped: set[str] = attrs.field(factory=set)

    def skip(self, reason: str, keys: Iterable[str]) -> None:
        found = list(keys)
        if found:
            self.skipped.setdefault(reason, []).extend(found)


def plan_rerun(pipeline: Pipeline, stage: str) -> RerunPlan:
    if stage not in pipeline:
        raise ConfigurationError(
            f"pipeline {pipeline.name!r} has no stage {stage!r} "
            f"(stages: {', '.join(s.name for s in pipeline)})"
        )
    target = pipeline[stage]
    reached = [target.name]
    while (nxt := pipeline.next_stage(reached[-1])) is not None and nxt.group == target.group:
        if nxt.name in reached:
            break
        reached.append(nxt.name)
    leads_to_group = not target.group and target.name in pipeline.fan_in_of()
    group_stages = [s.name for s in pipeline if s.group] if leads_to_group else []
    return RerunPlan(
        stage=target,
        reached=tuple(reached),
        group_stages=tuple(group_stages),
        last_group_stages=tuple(s for s in group_stages if pipeline.next_stage(s) is None),
    )


def check_selection(
    pipeline: Pipeline,
    keys: Sequence[str] | None,
    groups: Sequence[str] | None,
    status: str | None,
    since: dt.datetime | None,
    until: dt.datetime | None,
    all_rows: bool,
    in_flight: str,
) -> None:
    filters = [
        name
        for name, value in (
            ("keys", keys),
            ("groups", groups),
            ("status", status),
            ("since", since),
            ("until", until),
        )
        if value is not None
    ]
    if all_rows and filters:
        raise ConfigurationError(f"all_rows re-runs every row: drop {', '.join(filters)}")
    if not all_rows and not filters:
        raise ConfigurationError(
            "name the rows to re-run: keys, groups, status, since or until (or all_rows=True)"
        )
    if keys is not None and not keys:
        raise ConfigurationError("the key list is empty")
    if groups is not None and not groups:
        raise ConfigurationError("the group list is empty")
    if groups is not None and pipeline.table.group_column is None:
        raise ConfigurationError(f"pipeline {pipeline.name!r} has no group column")
    statuses = pipeline.table.statuses
    known = (statuses.running, statuses.done, statuses.failed)
    if status is not None and status not in known:
        raise ConfigurationError(f"status {status!r} is not one of {', '.join(known)}")
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise ConfigurationError(f"{name} needs a time zone (an aware datetime)")
    if since is not None and until is not None and since >= until:
        raise ConfigurationError(f"since ({since.isoformat()}) is not before until")
    if in_flight not in ("cancel", "skip"):
        raise ConfigurationError(f"in_flight is 'cancel' or 'skip', not {in_flight!r}")


def group_status(pipeline: Pipeline, status: str | None) -> str | None:
    statuses = pipeline.table.statuses
    names = {statuses.running: "running", statuses.done: "done", statuses.failed: "failed"}
    return None if status is None else names[status]
