"""The public surface is exactly what is intended: no more, no less, all importable."""

from __future__ import annotations

import importlib

import pgstagechain

INTENDED = {
    # pipelines and stages
    "Pipeline",
    "Statuses",
    "Stage",
    "stage",
    "Retry",
    "FanIn",
    "Retention",
    "StageContext",
    "FailedMember",
    # running
    "Worker",
    "WorkerStats",
    "Listener",
    "Backoff",
    "RecoveryScanner",
    "RecoveryReport",
    # claiming by hand
    "Claim",
    "claim",
    "complete",
    "complete_sync",
    "fail",
    # operating: status, history, retry, cancel (a module)
    "admin",
    # installing
    "migrate",
    "plan_migration",
    "GraphPlan",
    "uninstall",
    # helpers
    "redact",
    "tune_gc",
    "MalformedNotification",
    # errors
    "PgStageChainError",
    "ConfigurationError",
    "StageDeclarationError",
    "SchemaMismatchError",
    "NotInstalledError",
    "LeaseLostError",
    "PermanentError",
    "DatabaseAccessError",
    "StartupTimeoutError",
    "ExistingRowsError",
    "GraphChangeError",
}


def test_all_is_exactly_the_intended_names() -> None:
    assert set(pgstagechain.__all__) == INTENDED
    assert len(pgstagechain.__all__) == len(INTENDED), "a name is listed twice"
    assert pgstagechain.__all__ == sorted(pgstagechain.__all__, key=lambda n: (n[0].islower(), n))


def test_every_exported_name_is_importable_and_public() -> None:
    namespace: dict[str, object] = {}
    exec("from pgstagechain import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(pgstagechain.__all__)
    for name in pgstagechain.__all__:
        found = namespace[name]
        assert found is not None, name
        if isinstance(found, type) or callable(found):
            assert found.__module__.startswith("pgstagechain"), name


def test_errors_share_one_root() -> None:
    errors = [getattr(pgstagechain, n) for n in pgstagechain.__all__ if n.endswith("Error")]
    assert errors
    for error in errors:
        assert issubclass(error, pgstagechain.PgStageChainError), error
    assert issubclass(pgstagechain.ConfigurationError, ValueError)


def test_optional_modules_import_without_their_extras_being_used() -> None:
    metrics = importlib.import_module("pgstagechain.metrics")
    assert set(metrics.__all__) == {"OUTCOMES", "Metrics", "RunObserver", "serve"}


ADMIN = {
    "CANCEL_REASON",
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
    "SKIP_REASONS",
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
}


def test_admin_is_a_public_module_with_documented_members() -> None:
    from pgstagechain import admin

    assert admin is importlib.import_module("pgstagechain.admin")
    assert set(admin.__all__) == ADMIN
    for name in admin.__all__:
        found = getattr(admin, name)
        if isinstance(found, type) or callable(found):
            assert found.__doc__, f"pgstagechain.admin.{name} has no docstring"
