"""The benchmark command runs end to end at a tiny size and reports every figure.

No timing is asserted: only that each key is there with a sane type, and that every
burst completed all of its transitions.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgstagechain.testing import plugin

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _percentiles(found: object) -> None:
    """Latencies are differences of two clocks read in two threads or processes: a
    notification can be timestamped on receipt before its sender saw its commit return, so
    a tiny sample's p50 may be a few µs below zero."""
    assert isinstance(found, dict)
    for key in ("p50", "p95", "p99", "max"):
        value = found[key]
        assert isinstance(value, int | float) and math.isfinite(value), (key, found)
    assert found["p50"] <= found["p95"] <= found["p99"] <= found["max"]
    assert isinstance(found["n"], int) and found["n"] > 0


def test_benchmark_command_reports_every_figure(pgstagechain_server: plugin.TestServer) -> None:
    name = pgstagechain_server.create_database("bench_smoke")
    try:
        # The command makes its own databases on the server it is given.
        dsn = make_conninfo(pgstagechain_server.dsn, dbname=name)
        completed = subprocess.run(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "run.py"),
                "--dsn",
                dsn,
                "--chains",
                "24",
                "--workers",
                "1,2",
                "--modes",
                "noconn,conn",
                "--steady-rate",
                "40",
                "--steady-seconds",
                "0.5",
                "--idle-seconds",
                "1",
                "--backlog",
                "400",
                "--backlog-seconds",
                "0.5",
                "--commit-clients",
                "1,4",
                "--commit-seconds",
                "1",
                "--floor-samples",
                "10",
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

    for mode in ("noconn", "conn"):
        for workers in ("1", "2"):
            assert _number(report["transitions_per_s"][mode][workers])
            cpu = report["cpu_us_per_transition"][f"{mode}_x{workers}"]
            assert _number(cpu["worker"])
            assert cpu["server"] is None or _number(cpu["server"])
    for burst in report["bursts"]:
        assert burst["completed"] is True, burst
        assert burst["transitions"] == burst["expected_transitions"] == 24 * 8 + 6 * 2
        assert burst["worker_stats"]["failed"] == 0
    _percentiles(report["latency_ms"]["burst"])
    _percentiles(report["latency_ms"]["steady"])
    _percentiles(report["floor_ms"]["notify"])
    _percentiles(report["floor_ms"]["update_round_trip"])
    kinds = {"release", "row_to_row", "fan_in", "group_to_group"}
    for figures in (report["steady"], report["bursts"][0]):
        assert set(figures["latency_ms_by_kind"]) == kinds
        for found in figures["latency_ms_by_kind"].values():
            _percentiles(found)
    assert report["latency_ms"]["basis"] in ("commit_ack", "finished_at")
    # Where a hand-over through a notification spends its time: every segment, both kinds.
    attribution = report["steady"]["hop_attribution_ms"]
    assert set(attribution) == {"release", "fan_in"}, attribution
    segments = ("notify", "to_dispatcher", "before_claim", "claim", "to_handler", "total")
    for found in attribution.values():
        assert found["n"] > 0
        assert all(isinstance(found[name], float | int) for name in segments), found
        assert _number(found["claim"]) and _number(found["total"])
    for clients in ("1", "4"):
        assert (
            _number(report["server_commit_tps"][clients])
            and report["server_commit_tps"][clients] > 0
        )
    idle = report["idle_queries_per_min"]
    assert _number(idle["worker"]) and _number(idle["polling_1s"])
    assert isinstance(idle["method"], str)
    rss = report["worker_rss_mb"]
    for key in ("start", "end", "peak"):
        assert _number(rss[key]) and rss[key] > 0
    assert rss["rows"] == 400
    assert isinstance(report["machine"]["cpus"], int)

    # Nothing is left behind on the server: every benchmark database was dropped.
    with psycopg.connect(pgstagechain_server.dsn, autocommit=True) as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'pgsc_bench_%'"
        ).fetchone()
    assert left == (0,)


def test_claim_after_idle_reports_every_statement() -> None:
    """benchmarks/claim_after_idle.py runs at a tiny size (its own server); no timing asserted."""
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "claim_after_idle.py"), "--samples", "24"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    for phase in ("after_gap", "back_to_back"):
        kinds = report[phase]
        assert set(kinds) == {"select_1", "update_1_row", "update_4_rows", "claim_4_rows"}
        for found in kinds.values():
            assert _number(found["p50"]) and _number(found["p90"]) and found["p50"] > 0
