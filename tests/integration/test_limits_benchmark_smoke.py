"""``benchmarks/limits.py`` runs end to end at a tiny size and reports its figures (no
timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pgstagechain.testing import plugin

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("limited", ["one", "every"])
def test_limits_benchmark_reports_both_pipelines(
    pgstagechain_server: plugin.TestServer, limited: str
) -> None:
    completed = subprocess.run(
        [
            *(sys.executable, str(ROOT / "benchmarks" / "limits.py")),
            *("--dsn", pgstagechain_server.dsn, "--rows", "40", "--repeats", "1"),
            *("--limited", limited),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["stages"] == 10 and report["rows"] == 40
    assert report["limit"].startswith("max_running=1000 on ")
    for label in ("plain", "limited"):
        assert report[label]["transitions_per_s"] > 0
        assert report[label]["cpu_us_per_transition"] >= 0
