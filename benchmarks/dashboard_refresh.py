"""How long one dashboard refresh takes on a million-row table, and the plans of its queries.

Run from the repository root: ``python benchmarks/dashboard_refresh.py [--rows N]``. It
starts its own throwaway PostgreSQL, installs the seed's pipeline on ``jobs_variants``,
fills it with N rows (default 1 000 000) in the states of a pipeline at work: most
finished, a backlog waiting at every step, some running, some failed, and a run ledger
of a busy day (about N runs, the last hour's denser). Then it times one refresh (every
statement of :meth:`pgstagechain.dashboard.Dashboard.read`, one round on one connection)
several times and prints the median, and each statement's plan (``auto_explain``).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgstagechain import migrate
from pgstagechain.dashboard import Dashboard
from pgstagechain.testing import TemporaryCluster
from tests.apps.cli_app import pipeline
from tests.apps.seed import GROUP_STAGES, ROW_STAGES, create_tables

STEPS = ["img_gen", *ROW_STAGES]
WAITING_PER_STEP = 500
RUNNING_PER_STAGE = 50
FAILED = 1000

FILL = """
INSERT INTO jobs (job_id, tenant_id, current_step, status)
SELECT j, 'tenant-' || (j %% 7), 'img_gen', 'running' FROM generate_series(1, %(jobs)s) j;

INSERT INTO jobs_variants (job_variants_id, job_id, img_asset_id, tenant_id, current_step, status)
SELECT j * 10 + v, j, 'asset-' || j || '-' || v, 'tenant-' || (j %% 7), 'iou_eval', 'done'
FROM generate_series(1, %(jobs)s) j, generate_series(1, 5) v;

-- a backlog at every step, some rows running at every stage, some failed at overlay
WITH picked AS (
    SELECT job_variants_id AS k, row_number() OVER (ORDER BY job_variants_id DESC) AS n
    FROM jobs_variants ORDER BY job_variants_id DESC LIMIT %(moved)s
)
UPDATE jobs_variants t SET
    current_step = CASE
        WHEN p.n <= %(waiting)s THEN (%(steps)s::text[])[1 + p.n %% 8]
        WHEN p.n <= %(waiting)s + %(running)s THEN (%(stages)s::text[])[1 + p.n %% 8]
        ELSE 'overlay' END,
    status = CASE
        WHEN p.n <= %(waiting)s THEN 'done'
        WHEN p.n <= %(waiting)s + %(running)s THEN 'running'
        ELSE 'failed' END
FROM picked p WHERE t.job_variants_id = p.k;

-- the groups: most done at the last stage, the newest jobs' not formed yet
INSERT INTO pgstagechain.groups (pipeline, group_key, step, status, updated_at)
SELECT 'feedly', j::text, 'instagram_feed_gen', 'done', now() - interval '1 hour'
FROM generate_series(1, %(jobs)s - %(moved)s / 5) j;
"""

RUNS = """
-- a busy day: runs finishing steadily over the last 24 hours, in the order they finished
INSERT INTO pgstagechain.runs (pipeline, stage, row_key, attempt, state, worker_id,
                               started_at, lease_until, finished_at, error)
SELECT 'feedly', (%(stages)s::text[])[1 + (i %% 8)], (i * 10 + 1)::text, 1,
       CASE WHEN i %% 97 = 0 THEN 'failed' ELSE 'succeeded' END, 'w' || (i %% 4),
       f - interval '2 seconds', f + interval '30 seconds', f,
       CASE WHEN i %% 97 = 0 THEN 'TimeoutError: model server did not answer' END
FROM generate_series(1, %(runs)s) i,
     LATERAL (SELECT clock_timestamp() - ((%(runs)s - i)::float / %(runs)s) * interval '24 hours' AS f) x;

-- the previous stage's run of every waiting row; a live run of every running one;
-- the failed run of every failed one
INSERT INTO pgstagechain.runs (pipeline, stage, row_key, attempt, state, worker_id,
                               started_at, lease_until, finished_at, error)
SELECT 'feedly', t.current_step, t.job_variants_id::text, 1,
       CASE t.status WHEN 'done' THEN 'succeeded' WHEN 'running' THEN 'running' ELSE 'failed' END,
       'w' || (t.job_variants_id %% 4),
       clock_timestamp() - interval '5 minutes', clock_timestamp() + interval '30 seconds',
       CASE WHEN t.status <> 'running' THEN clock_timestamp() - (t.job_variants_id %% 600) * interval '1 second' END,
       CASE WHEN t.status = 'failed' THEN 'PermanentError: cannot overlay: unreadable image' END
FROM jobs_variants t
WHERE NOT (t.current_step = 'iou_eval' AND t.status = 'done') AND t.current_step <> 'img_gen';

-- what autovacuum does soon after a load: statistics, the visibility map (index-only
-- scans) and the block-range summaries of the run ledger (autosummarize)
VACUUM ANALYZE;
"""


def fill(dsn: str, rows: int) -> dict[str, int]:
    jobs = rows // 5
    moved = WAITING_PER_STEP * 8 + RUNNING_PER_STAGE * 8 + FAILED
    params: dict[str, Any] = {
        "jobs": jobs,
        "moved": moved,
        "waiting": WAITING_PER_STEP * 8,
        "running": RUNNING_PER_STAGE * 8,
        "steps": STEPS,
        "stages": ROW_STAGES,
        "runs": rows,
    }
    create_tables(dsn)
    anyio.run(migrate, dsn, pipeline)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE jobs_variants DISABLE TRIGGER USER")  # bulk load, no NOTIFY
        for statement in (FILL + RUNS).split(";\n"):
            if statement.strip():
                conn.execute(statement, params)  # type: ignore[arg-type]
        conn.execute("ALTER TABLE jobs_variants ENABLE TRIGGER USER")
        counts = {
            "rows": conn.execute("SELECT count(*) FROM jobs_variants").fetchone()[0],  # type: ignore[index]
            "runs": conn.execute("SELECT count(*) FROM pgstagechain.runs").fetchone()[0],  # type: ignore[index]
            "groups": conn.execute("SELECT count(*) FROM pgstagechain.groups").fetchone()[0],  # type: ignore[index]
        }
    return counts


async def refresh_times(dsn: str, times: int) -> list[float]:
    board = Dashboard(pipeline, dsn)
    found = []
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await board.read(conn, None)  # warm: the catalog and the statements, once per process
        for _ in range(times):
            started = time.perf_counter()
            await board.read(conn, None)
            found.append(time.perf_counter() - started)
    return found


class Recording(psycopg.AsyncCursor[Any]):
    """A cursor that notes every statement it runs, with its parameters."""

    seen: list[tuple[Any, Any]] = []

    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        Recording.seen.append((query, params))
        return await super().execute(query, params, **kwargs)


async def plans(dsn: str) -> list[tuple[str, float, list[str]]]:
    """Every statement of one refresh: its text, its time and its plan (EXPLAIN ANALYZE)."""
    board = Dashboard(pipeline, dsn)
    found = []
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await board.read(conn, None)
        conn.cursor_factory = Recording
        Recording.seen.clear()
        await board.read(conn, None)
        conn.cursor_factory = psycopg.AsyncCursor
        for query, params in list(Recording.seen):
            text = query.as_string(conn) if isinstance(query, sql.Composable) else str(query)
            cur = await conn.execute(
                "EXPLAIN (ANALYZE, COSTS OFF, SUMMARY ON) " + text,  # type: ignore[operator]
                params,
            )
            lines = [r[0] for r in await cur.fetchall()]
            total = next(
                (
                    float(m.group(1))
                    for line in lines
                    if (m := re.search(r"Execution Time: ([0-9.]+)", line))
                ),
                0.0,
            )
            found.append((" ".join(text.split()), total, lines))
    return found


def summary(text: str, total: float, lines: list[str]) -> str:
    """The statement's name or start, its time, and which scans it used."""
    scans = sorted(
        {
            f"{kind}{' using ' + index if index else ''} on {table}"
            for line in lines
            for kind, index, table in re.findall(
                r"((?:Index Only |Index |Bitmap Index |Bitmap Heap |Seq )Scan)(?: using (\w+))? on (\S+)",
                line,
            )
        }
    )
    return f"{total:7.2f} ms  {text[:100]}\n             {'; '.join(scans) or 'no table scan'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--times", type=int, default=9)
    parser.add_argument("--full-plans", action="store_true", help="print every plan in full")
    args = parser.parse_args()
    with TemporaryCluster() as cluster:
        dsn = cluster.dsn()
        started = time.perf_counter()
        counts = fill(dsn, args.rows)
        print(f"filled in {time.perf_counter() - started:.0f} s: {counts}")
        print(
            f"waiting {WAITING_PER_STEP} at each of {len(STEPS)} steps, running "
            f"{RUNNING_PER_STAGE} at each of {len(ROW_STAGES)} stages, {FAILED} failed; "
            f"group stages {', '.join(GROUP_STAGES)}"
        )
        seconds = anyio.run(refresh_times, dsn, args.times)
        found = anyio.run(plans, dsn)
    print(
        f"refresh (one round, {len(found)} statements): median {statistics.median(seconds) * 1000:.1f} ms,"
        f" min {min(seconds) * 1000:.1f} ms, max {max(seconds) * 1000:.1f} ms over {len(seconds)}"
    )
    for text, total, lines in found:
        print(summary(text, total, lines))
        if args.full_plans:
            print("\n".join("    " + line for line in lines))


if __name__ == "__main__":
    main()
