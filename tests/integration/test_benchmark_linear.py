"""The benchmark command on a linear chain (row stages only, no group stage) at a tiny size.

The linear shape is the one the peers are compared on: every phase that depends on the
shape (bursts, steady latency by kind of hand-over, the backlog) must wait for every row
to be through its last stage and count every transition. No timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from psycopg.conninfo import make_conninfo

from pgstagechain.testing import plugin

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ROW_STAGES = 10
CHAINS = 24


def test_benchmark_runs_on_a_linear_chain(pgstagechain_server: plugin.TestServer) -> None:
    name = pgstagechain_server.create_database("bench_linear")
    try:
        dsn = make_conninfo(pgstagechain_server.dsn, dbname=name)
        completed = subprocess.run(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "run.py"),
                "--dsn",
                dsn,
                "--row-stages",
                str(ROW_STAGES),
                "--group-stages",
                "0",
                "--chains",
                str(CHAINS),
                "--workers",
                "1,2",
                "--modes",
                "noconn,conn",
                "--steady-rate",
                "40",
                "--steady-seconds",
                "0.5",
                "--backlog",
                "400",
                "--backlog-seconds",
                "0.5",
                "--skip",
                "commit,floor,idle",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        assert completed.returncode == 0, completed.stderr[-4000:]
        report = json.loads(completed.stdout.strip().splitlines()[-1])
    finally:
        pgstagechain_server.drop_database(name)

    assert report["config"]["transitions_per_burst"] == CHAINS * ROW_STAGES
    assert len(report["bursts"]) == 4
    for burst in report["bursts"]:
        assert burst["completed"] is True, burst
        assert burst["transitions"] == CHAINS * ROW_STAGES
        assert burst["worker_stats"]["failed"] == 0
        assert set(burst["latency_ms_by_kind"]) == {"release", "row_to_row"}
        assert burst["latency_ms_by_kind"]["release"]["n"] == CHAINS

    steady = report["steady"]
    # every row released in the steady phase went through all ten stages before it ended
    assert steady["transitions"] == steady["rows"] * ROW_STAGES, steady
    assert steady["completed"] is True
    kinds = steady["latency_ms_by_kind"]
    assert set(kinds) == {"release", "row_to_row"}
    assert kinds["release"]["n"] == steady["rows"]
    assert kinds["row_to_row"]["n"] == steady["rows"] * (ROW_STAGES - 1)

    backlog = report["worker_rss_mb"]
    assert backlog["rows"] == 400 and backlog["transitions_done"] > 0
    assert backlog["peak"] > 0
