"""Exceptions raised by pgstagechain.

Every exception derives from :class:`PgStageChainError`; configuration errors also
derive from :class:`ValueError` so callers can catch what they already know::

    PgStageChainError
    ├── ConfigurationError (ValueError)
    │   ├── StageDeclarationError   a stage graph that cannot run
    │   └── SchemaMismatchError     a table or column that does not exist
    ├── NotInstalledError           the database side is missing or too old
    ├── LeaseLostError              a completion arrived after the claim was rescued
    └── PermanentError              raised by a handler: fail now, never retry
"""

from __future__ import annotations


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


class NotInstalledError(PgStageChainError):
    """The pgstagechain schema or the pipeline's trigger is not installed (run `migrate`)."""


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
