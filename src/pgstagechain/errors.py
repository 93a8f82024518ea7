"""Exceptions raised by pgstagechain.

Every exception derives from :class:`PgStageChainError`; configuration errors also
derive from :class:`ValueError` so callers can catch what they already know::

    PgStageChainError
    ├── ConfigurationError (ValueError)
    │   ├── StageDeclarationError   a stage graph that cannot run
    │   ├── SchemaMismatchError     a table or column that does not exist
    │   ├── ExistingRowsError       a new stage would run on rows already there: choose
    │   └── GraphChangeError        a graph change would strand rows, or old workers are at work
    ├── NotInstalledError           the database side is missing or too old
    ├── DatabaseAccessError         the server refuses us: login, database, role or privilege
    ├── StartupTimeoutError (TimeoutError)  the database stayed unreachable at start-up
    ├── LeaseLostError              a completion arrived after the claim was rescued
    └── PermanentError              raised by a handler: fail now, never retry
"""

from __future__ import annotations

from typing import Any


def found_in(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """``exc`` if it is one of ``kinds``, else the first such error inside it (task groups
    wrap the errors of their tasks), else None."""
    if isinstance(exc, kinds):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = found_in(inner, kinds)
            if found is not None:
                return found
    return None


class PgStageChainError(Exception):
    """Root of every pgstagechain error."""


class ConfigurationError(PgStageChainError, ValueError):
    """The pipeline, worker or connection settings are not usable."""


class StageDeclarationError(ConfigurationError):
    """A stage declaration cannot be part of a runnable chain."""

    def __init__(self, stage: str, problem: str) -> None:
        super().__init__(f"stage {stage!r}: {problem}")
        self.stage = stage
        self.problem = problem


class SchemaMismatchError(ConfigurationError):
    """The pipeline names a table or column the database does not have."""


class ExistingRowsError(ConfigurationError):
    """``migrate`` would start a new stage on rows that finished before it existed.

    Raised before anything changes; run ``migrate`` again with ``backfill=True`` (run it
    on them) or ``backfill=False`` (only on rows that get there from now on).
    """

    def __init__(self, pipeline: str, waiting: dict[str, int]) -> None:
        listed = ", ".join(f"{count} at {step!r}" for step, count in waiting.items())
        super().__init__(
            f"pipeline {pipeline!r} has stage(s) after a step that was the last one, and "
            f"rows (or groups) already finished there would run them: {listed}. Choose: "
            "backfill=True (`--backfill`) runs the new stages on them, backfill=False "
            "(`--no-backfill`) only on rows that get there from now on"
        )
        self.pipeline = pipeline
        self.waiting = waiting


class GraphChangeError(ConfigurationError):
    """``migrate`` would strand rows at steps the new graph has no place for (map them with
    ``maps`` / ``--map OLD=NEW``), or workers still run stages whose place changes.

    Raised before anything changes; ``plan`` is the whole plan (``plan.lines()``).
    """

    def __init__(self, plan: Any) -> None:
        reasons = "; ".join(plan.refusals())
        super().__init__(f"pipeline {plan.pipeline!r}: migrate refused, nothing changed: {reasons}")
        self.plan = plan


class NotInstalledError(PgStageChainError):
    """The pgstagechain schema or the pipeline's trigger is not installed (run `migrate`)."""


class DatabaseAccessError(PgStageChainError):
    """The server refused the connection or a statement for a reason retrying cannot fix:
    failed authentication, a database or role that does not exist, a missing privilege.

    ``problem`` is the server's own words; ``conninfo`` is the connection string with
    its password redacted.
    """

    def __init__(self, problem: str, conninfo: str) -> None:
        super().__init__(f"cannot use database {conninfo}: {problem}")
        self.problem = problem
        self.conninfo = conninfo


class StartupTimeoutError(PgStageChainError, TimeoutError):
    """The database could not be reached within the worker's ``startup_timeout``."""

    def __init__(self, seconds: float, conninfo: str, last_error: str) -> None:
        super().__init__(
            f"database {conninfo} still unreachable after {seconds:g}s at start-up: {last_error}"
        )
        self.seconds = seconds
        self.conninfo = conninfo
        self.last_error = last_error


class LeaseLostError(PgStageChainError):
    """The run's claim is no longer ours: another worker rescued the row after the lease ran out.

    The completion is rolled back, together with every write the handler made on the
    context's connection, so the newer attempt is never overwritten.
    """

    def __init__(self, run_id: int) -> None:
        super().__init__(f"run {run_id} lost its lease; its completion was discarded")
        self.run_id = run_id


class PermanentError(PgStageChainError):
    """Raise from a handler to fail the row at once, skipping any remaining retries."""
