"""benchmarks/explain_scanner.py keeps working (tiny size); its plans are read by people."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def explain(server: Any, *options: str) -> str:
    name = server.create_database("explain")
    try:
        return subprocess.run(
            [
                sys.executable,
                "benchmarks/explain_scanner.py",
                *("--rows", "2000", "--stuck", "20"),
                *options,
            ],
            cwd=ROOT,
            env={**os.environ, "PGSTAGECHAIN_DSN": server.dsn_for(name)},
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        ).stdout
    finally:
        server.drop_database(name)


def test_explain_script_measures_every_statement(pgstagechain_server: Any) -> None:
    report = json.loads(explain(pgstagechain_server, "--json").strip().splitlines()[-1])
    assert set(report) == {"pending", "claim_rows_ready", "renotify_rows", "expire_leases"}
    for figures in report.values():
        assert figures["execution_ms"] >= 0 and figures["round_trip_ms"] > 0
    # the 20 dead leases among 220 live runs are found (through their rows) and closed
    assert report["expire_leases"]["runs_updated"] == 20
    assert report["pending"]["runs_updated"] == 0


def test_explain_script_prints_a_plan_for_people(pgstagechain_server: Any) -> None:
    shown = explain(pgstagechain_server)
    for statement in ("pending", "claim_rows_ready", "renotify_rows", "expire_leases"):
        assert f"=== {statement} " in shown
