"""A worker stopped while it is still starting exits cleanly, not killed by the signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_while_the_app_loads_exits_zero(pgstagechain_dsn: str, tmp_path: Path) -> None:
    marker = tmp_path / "starting"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pgstagechain",
            "--dsn",
            pgstagechain_dsn,
            "worker",
            "tests.apps.slow_start_app:pipeline",
        ],
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
            "PGSC_TEST_STARTING": str(marker),
        },
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the worker never started loading its app"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped before it started" in err
