"""benchmarks/explain_scanner.py and explain_complete.py keep working (tiny size); their plans
are read by people."""

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


def test_explain_complete_shows_each_part_of_a_chained_completion(pgstagechain_server: Any) -> None:
    name = pgstagechain_server.create_database("explain_complete")
    try:
        shown = subprocess.run(
            [sys.executable, "benchmarks/explain_complete.py", "--rows", "200", "--batch", "50"],
            cwd=ROOT,
            env={**os.environ, "PGSTAGECHAIN_DSN": pgstagechain_server.dsn_for(name)},
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        ).stdout
    finally:
        pgstagechain_server.drop_database(name)
    # the runs closed, the user's rows moved on and the next runs recorded: one batch each
    for part in ("Update on runs", "Update on bench_variants"):
        assert any(part in line and "rows=50 " in line for line in shown.splitlines()), part
    assert "Insert on runs" in shown
    assert "Execution Time" in shown
