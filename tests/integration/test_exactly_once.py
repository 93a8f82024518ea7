"""The seed's shape end to end through four worker processes: every stage runs exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import psycopg
import pytest

from pgstagechain import migrate
from tests.apps.noop_app import pipeline
from tests.apps.seed import GROUP_STAGES, ROW_STAGES, add_jobs, create_tables

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
JOBS, VARIANTS, WORKERS = 300, 4, 4


def start_worker(dsn: str, n: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pgstagechain",
            "--dsn",
            dsn,
            "--log-level",
            "WARNING",
            "worker",
            "tests.apps.noop_app:pipeline",
            "--concurrency",
            "20",
            "--worker-id",
            f"w{n}",
            "--scan-interval",
            "2",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])},
    )


async def test_four_processes_run_every_stage_exactly_once(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    await migrate(pgstagechain_dsn, pipeline)
    await anyio.to_thread.run_sync(drive, pgstagechain_dsn)


def drive(pgstagechain_dsn: str) -> None:
    workers = [start_worker(pgstagechain_dsn, n) for n in range(WORKERS)]
    try:
        with psycopg.connect(pgstagechain_dsn, autocommit=True) as conn:
            deadline = time.monotonic() + 60
            while conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgstagechain-listener'"
            ).fetchone() != (WORKERS,):
                assert time.monotonic() < deadline, "workers did not start listening"
                time.sleep(0.1)
            add_jobs(pgstagechain_dsn, jobs=JOBS, variants=VARIANTS)
            deadline = time.monotonic() + 240
            while conn.execute(
                "SELECT count(*) FROM pgstagechain.groups WHERE step = 'instagram_feed_gen' AND status = 'done'"
            ).fetchone() != (JOBS,):
                assert time.monotonic() < deadline, "chains did not finish"
                assert all(w.poll() is None for w in workers), "a worker died"
                time.sleep(0.2)
    finally:
        for w in workers:
            w.terminate()
        codes = [w.wait(timeout=60) for w in workers]
    assert codes == [0] * WORKERS  # SIGTERM drains and exits cleanly

    with psycopg.connect(pgstagechain_dsn) as conn:
        per_stage = dict(
            conn.execute(
                "SELECT stage, count(*) FROM pgstagechain.runs WHERE state = 'succeeded' GROUP BY 1"
            ).fetchall()
        )
        duplicates = conn.execute(
            "SELECT count(*) FROM (SELECT 1 FROM pgstagechain.runs"
            " GROUP BY stage, row_key HAVING count(*) > 1) d"
        ).fetchone()
        other = conn.execute(
            "SELECT count(*) FROM pgstagechain.runs WHERE state <> 'succeeded'"
        ).fetchone()
        spread = conn.execute("SELECT count(DISTINCT worker_id) FROM pgstagechain.runs").fetchone()
        rows = conn.execute(
            "SELECT current_step, status, count(*) FROM jobs_variants GROUP BY 1, 2"
        ).fetchall()
    assert per_stage == {
        **{s: JOBS * VARIANTS for s in ROW_STAGES},
        **{s: JOBS for s in GROUP_STAGES},
    }
    assert duplicates == (0,)
    assert other == (0,)
    assert rows == [("iou_eval", "done", JOBS * VARIANTS)]
    assert spread is not None and spread[0] >= 2  # the work really was shared
