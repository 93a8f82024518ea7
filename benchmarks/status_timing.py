"""How long `pgstagechain status` takes on 5 000 rows in mixed states.

Run from the repository root: ``python benchmarks/status_timing.py``. It starts its own
throwaway PostgreSQL, runs 3 000 rows through the seed's pipeline, leaves the other 2 000
waiting at every step (a few running or waiting for a retry), then times the command as a
subprocess and the status queries on their own.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import anyio
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgstagechain import Worker, claim, fail, migrate
from pgstagechain.admin import status
from pgstagechain.testing import TemporaryCluster
from tests.apps.cli_app import pipeline
from tests.apps.seed import ROW_STAGES, add_jobs, create_tables


async def fill(dsn: str) -> None:
    create_tables(dsn)
    await migrate(dsn, pipeline)
    add_jobs(dsn, jobs=1000, variants=5, release=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE jobs_variants SET status = 'done' WHERE job_id <= 600")
    await Worker(pipeline, dsn, concurrency=50, scan_interval=1).run_until_idle()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i, step in enumerate(["img_gen", *ROW_STAGES[:-1]]):
            conn.execute(
                "UPDATE jobs_variants SET current_step = %s, status = 'done'"
                " WHERE job_id > 600 AND job_id %% 8 = %s",
                (step, i),
            )
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT job_variants_id FROM jobs_variants"
            " WHERE current_step = 'img_gen' AND status = 'done' LIMIT 40"
        )
        for n, (key,) in enumerate(await cur.fetchall()):
            got = await claim(conn, pipeline, ROW_STAGES[0], key)
            if got is not None and n % 2:
                await fail(conn, pipeline, got, "busy", retry_in=600)


async def time_queries(dsn: str) -> list[float]:
    seconds = []
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for _ in range(10):
            started = time.perf_counter()
            await status(conn, pipeline)
            seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    with TemporaryCluster() as cluster:
        dsn = cluster.dsn()
        anyio.run(fill, dsn)
        with psycopg.connect(dsn) as conn:
            rows = conn.execute("SELECT count(*) FROM jobs_variants").fetchone()
            runs = conn.execute("SELECT count(*) FROM pgstagechain.runs").fetchone()
        command = [sys.executable, "-m", "pgstagechain", "--dsn", dsn, "status"]
        command.append("tests.apps.cli_app:pipeline")
        walls = []
        for _ in range(5):
            started = time.perf_counter()
            shown = subprocess.run(command, capture_output=True, text=True, check=True)
            walls.append(time.perf_counter() - started)
        queries = anyio.run(time_queries, dsn)
    print(shown.stdout)
    print(f"rows {rows[0] if rows else '?'}, runs {runs[0] if runs else '?'}")
    print(f"command wall: median {statistics.median(walls):.3f} s, max {max(walls):.3f} s")
    print(
        f"status queries: median {statistics.median(queries) * 1000:.1f} ms,"
        f" max {max(queries) * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
