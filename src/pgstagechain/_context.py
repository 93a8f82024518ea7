"""What a handler receives: the row it works on, its connection, and earlier results."""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import attrs

ConnT = TypeVar("ConnT")


@attrs.frozen(kw_only=True)
class FailedMember:
    """A member of a group that failed for good: the stage it stopped at and why."""

    stage: str
    error: str | None


@attrs.frozen(kw_only=True)
class Claim:
    """A row (or group) moved to ``(stage, running)`` by this worker, with its run record.

    ``key`` is the key in the column's own type (the group key, as text, for a group
    stage); ``row`` holds the pipeline's extra columns as they were at claim time,
    ``results`` what the earlier stages of this row (or group) returned, and for a group
    stage ``members`` maps each member's key to the results of its row stages, and
    ``failed_members`` each member that failed for good (a group formed under
    ``FanIn.SETTLED``) to its :class:`FailedMember`; such members are not in ``members``.

    ``token`` proves the claim is this one: random, drawn by the claim statement itself, so
    two claims that were handed the same run id (a crash rolls the id sequence back) still
    differ. ``series`` is the token of
    the first attempt and stays the same through every retry of it.
    """

    pipeline: str
    stage: str
    run_id: int
    key: Any
    row_key: str
    group_key: str | None
    attempt: int
    is_group: bool
    token: int = attrs.field(factory=lambda: secrets.randbits(62))
    series: int = attrs.field()
    row: Mapping[str, Any] = attrs.field(factory=dict)
    results: Mapping[str, Any] = attrs.field(factory=dict)
    members: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    failed_members: Mapping[str, FailedMember] = attrs.field(factory=dict)

    @series.default
    def _first_attempt(self) -> int:
        return self.token


@attrs.frozen(kw_only=True)
class StageContext(Generic[ConnT]):
    """Everything a handler needs for one run.

    ``conn`` is the handler's own connection: whatever it writes there commits in the
    same transaction that marks the stage done, or not at all. ``results`` maps each
    earlier stage of this row (or group) to the result it returned; for a group stage,
    ``members`` maps every member's key to the results of its row stages, and
    ``failed_members`` the members that failed for good (``FanIn.SETTLED``) to their stage
    and error.

    ``lend``, given instead of ``conn``, is called the first time a handler reads
    ``conn``: a worker checks a connection out only for handlers that use one.
    """

    claim: Claim
    worker_id: str
    members: Mapping[str, Mapping[str, Any]] = attrs.field()
    _conn: ConnT = attrs.field(default=None, alias="conn")
    _lend: Callable[[], ConnT] | None = attrs.field(default=None, alias="lend")

    @members.default
    def _claimed_members(self) -> Mapping[str, Mapping[str, Any]]:
        return self.claim.members

    @property
    def conn(self) -> ConnT:
        """The handler's connection (psycopg ``AsyncConnection``, or ``Connection`` for a
        sync handler; None for a stage with ``connection=False``). A worker checks it out
        of its pool the first time it is read; the same connection every time after."""
        if self._lend is not None:
            return self._lend()
        return self._conn

    @functools.cached_property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger that tags every record with the pipeline, stage, key, attempt and run."""
        return _run_logger(self.claim)

    @property
    def key(self) -> Any:
        return self.claim.key

    @property
    def group_key(self) -> str | None:
        return self.claim.group_key

    @property
    def stage(self) -> str:
        return self.claim.stage

    @property
    def attempt(self) -> int:
        return self.claim.attempt

    @property
    def run_id(self) -> int:
        return self.claim.run_id

    @property
    def idempotency_key(self) -> str:
        """The same for every attempt of this stage for this row, and never used again: send
        it with a side effect outside the database so the receiver can drop a repeat."""
        return f"{self.claim.series:016x}"

    @property
    def failed_members(self) -> Mapping[str, FailedMember]:
        return self.claim.failed_members

    @property
    def row(self) -> Mapping[str, Any]:
        return self.claim.row

    @property
    def results(self) -> Mapping[str, Any]:
        return self.claim.results


def run_fields(claim: Claim) -> dict[str, object]:
    """What identifies a run in a log record (``extra=``), for structured logs."""
    return {
        "pipeline": claim.pipeline,
        "stage": claim.stage,
        "key": claim.row_key,
        "attempt": claim.attempt,
        "run_id": claim.run_id,
    }


def _run_logger(claim: Claim) -> logging.LoggerAdapter[logging.Logger]:
    return logging.LoggerAdapter(
        logging.getLogger(f"pgstagechain.stage.{claim.stage}"), run_fields(claim)
    )
