"""benchmarks/peers.py runs the chain on every system at a tiny size and reports every figure.

The peers are an optional extra (``pip install -e '.[peers]'``): the run is skipped
without it, and the command must then stop with one line that names the extra. No
timing is asserted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgstagechain.testing import plugin

ROOT = Path(__file__).resolve().parents[2]
PEERS = str(ROOT / "benchmarks" / "peers.py")
SYSTEMS = ("pgstagechain_noconn", "pgstagechain_conn", "pgqueuer", "procrastinate")
EXTRA = ("pgqueuer", "procrastinate", "asyncpg")
MISSING = [name for name in EXTRA if importlib.util.find_spec(name) is None]


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def test_without_the_extra_the_command_names_it() -> None:
    # an entry of None in sys.modules makes that import fail, as a missing package does
    hide = "import runpy, sys; sys.modules['procrastinate'] = None; sys.argv = ['peers.py'];"
    completed = subprocess.run(
        [sys.executable, "-c", f"{hide} runpy.run_path({PEERS!r}, run_name='__main__')"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=dict(os.environ),
    )
    assert completed.returncode == 1
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert "'peers' extra" in lines[0] and "pip install -e '.[peers]'" in lines[0]
    assert completed.stdout == ""


@pytest.mark.slow
@pytest.mark.skipif(
    bool(MISSING),
    reason=f"the optional 'peers' extra is not installed ({', '.join(MISSING)} missing):"
    " pip install -e '.[peers]'",
)
def test_peers_command_reports_every_figure(pgstagechain_server: plugin.TestServer) -> None:
    name = pgstagechain_server.create_database("peers_smoke")
    try:
        dsn = make_conninfo(pgstagechain_server.dsn, dbname=name)
        completed = subprocess.run(
            [
                sys.executable,
                PEERS,
                "--dsn",
                dsn,
                "--chains",
                "20",
                "--stages",
                "3",
                "--rounds",
                "2",
                "--light-chains",
                "4",
                "--light-rate",
                "40",
                "--timeout",
                "120",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
            env=dict(os.environ),
        )
        assert completed.returncode == 0, completed.stderr[-4000:]
        report = json.loads(completed.stdout.strip().splitlines()[-1])
    finally:
        pgstagechain_server.drop_database(name)

    assert report["versions"]["pgqueuer"] and report["versions"]["procrastinate"]
    assert report["config"]["transitions_per_burst"] == 20 * 3
    assert len(report["rounds"]) == 2
    for results in report["rounds"]:
        assert set(results) == set(SYSTEMS)
        for system, figures in results.items():
            assert figures["completed"] is True, (system, figures)
            assert figures["transitions"] == 20 * 3, (system, figures)
            assert _number(figures["transitions_per_s"])
            cpu = figures["cpu_us_per_transition"]
            assert _number(cpu["worker"])
            assert cpu["server"] is None or _number(cpu["server"])
            if system == "pgstagechain_conn":
                continue  # its notification hand-over is noconn's path
            light = figures["light_latency_ms"]
            assert light["release"]["n"] == 4, (system, light)
            assert light["hand_over"]["n"] == 4 * 2, (system, light)
            assert _number(light["hand_over"]["p50"])
    for system in SYSTEMS:
        assert _number(report["median"][system]["transitions_per_s"])

    # every database the command made on the server is gone
    with psycopg.connect(pgstagechain_server.dsn, autocommit=True) as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'pgsc_bench_%'"
        ).fetchone()
    assert left == (0,)
