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
    "StageContext",
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
    "fail",
    # installing
    "migrate",
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
