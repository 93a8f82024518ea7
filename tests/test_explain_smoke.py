"""benchmarks/explain_scanner.py keeps working (tiny size); its plans are read by people."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_explain_script_prints_every_plan(pgstagechain_server: Any) -> None:
    name = pgstagechain_server.create_database("explain")
    try:
        shown = subprocess.run(
            [sys.executable, "benchmarks/explain_scanner.py", "--rows", "2000", "--stuck", "20"],
            cwd=ROOT,
            env={**os.environ, "PGSTAGECHAIN_DSN": pgstagechain_server.dsn_for(name)},
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        ).stdout
    finally:
        pgstagechain_server.drop_database(name)
    for statement in ("pending", "claim_rows_ready", "renotify_rows", "expire_leases"):
        assert f"=== {statement} " in shown
    assert shown.count("Execution Time") == 4
    # the 20 dead leases among 220 live runs are found (through their rows) and closed
    expire = shown.split("=== expire_leases ")[1]
    assert "Update on runs" in expire and "rows=20 loops=1" in expire
