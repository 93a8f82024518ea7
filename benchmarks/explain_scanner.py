"""EXPLAIN (ANALYZE, BUFFERS) of the recovery scanner's statements on a large table.

Builds the seed's variants table with 1,000,000 rows (250,000 jobs of 4 variants),
almost all finished at (iou_eval, done) with their groups finished, and 1,000 rows stuck
at (planner, done); a run ledger with a million finished runs, some live leases, some
dead ones and some pending retries. Then it installs a pipeline of the seed's shape and
prints the plans of what a worker runs while idle and what the scanner runs, each
executed for real inside a transaction that is rolled back:

* ``pending``: the worker's probe, once per scan interval;
* ``claim_rows_ready``: claim up to 100 ready rows of a stage;
* ``renotify_rows``: re-send the notifications of stuck rows;
* ``expire_leases``: close runs whose lease ran out (found through their rows at
  ``(stage, running)``).

It starts a throwaway cluster (``pgstagechain.testing.TemporaryCluster``) unless
``PGSTAGECHAIN_DSN`` names a server, where it works in a schema of its own and removes
it afterwards. Run from the repository root::

    python benchmarks/explain_scanner.py [--rows 1000000] [--stuck 1000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import anyio
import psycopg
from psycopg import sql

from pgstagechain import Pipeline, migrate, uninstall
from pgstagechain._claim import claimer_for  # the statements themselves are internal
from pgstagechain.testing import TemporaryCluster

SCHEMA = "pgstagechain_bench"
ROW_STAGES = [
    "vlm_analyze",
    "yolo_detect",
    "planner",
    "overlay",
    "vlm_judge",
    "ocr_eval",
    "readability_eval",
    "iou_eval",
]
GROUP_STAGES = ["ad_copy_gen_kor", "instagram_feed_gen"]
VARIANTS = 4


def build_pipeline() -> Pipeline:
    pipeline = Pipeline(
        "explain_bench",
        schema=SCHEMA,
        table="jobs_variants",
        key="job_variants_id",
        group_column="job_id",
        extra_columns=["tenant_id", "img_asset_id"],
        start="img_gen",
    )

    async def handler(ctx: Any) -> None:
        return None

    previous = "img_gen"
    for name in ROW_STAGES:
        pipeline.stage(after=previous, name=name)(handler)
        previous = name
    for name in GROUP_STAGES:
        pipeline.stage(after=previous, name=name, group=True)(handler)
        previous = name
    return pipeline


def load(conn: psycopg.Connection[Any], rows: int, stuck: int) -> None:
    """Create and fill the tables; the pipeline is installed afterwards (no trigger yet)."""
    jobs = rows // VARIANTS
    ident = sql.Identifier(SCHEMA)
    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(ident))
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(ident))
    conn.execute(sql.SQL("SET search_path TO {}, public").format(ident))
    conn.execute(
        """
        CREATE TABLE jobs (
            job_id bigint PRIMARY KEY, tenant_id text NOT NULL,
            current_step text, status text);
        CREATE TABLE jobs_variants (
            job_variants_id bigint PRIMARY KEY,
            job_id bigint NOT NULL REFERENCES jobs,
            img_asset_id text NOT NULL,
            tenant_id text NOT NULL,
            current_step text NOT NULL DEFAULT 'img_gen',
            status text NOT NULL DEFAULT 'running',
            updated_at timestamptz NOT NULL DEFAULT now());
        """
    )
    conn.execute(
        "INSERT INTO jobs SELECT j, 'tenant-' || j %% 50, 'instagram_feed_gen', 'done'"
        " FROM generate_series(1, %s) j",
        (jobs,),
    )
    # Stuck variants are spread over the last jobs, one per job.
    conn.execute(
        """
        INSERT INTO jobs_variants (job_variants_id, job_id, img_asset_id, tenant_id,
                                   current_step, status)
        SELECT j * 10 + v, j, 'asset-' || j || '-' || v, 'tenant-' || j %% 50,
               CASE WHEN j > %(jobs)s - %(stuck)s AND v = 1 THEN 'planner' ELSE 'iou_eval' END,
               'done'
        FROM generate_series(1, %(jobs)s) j, generate_series(1, %(variants)s) v
        """,
        {"jobs": jobs, "stuck": stuck, "variants": VARIANTS},
    )


def load_ledger(conn: psycopg.Connection[Any], rows: int, stuck: int, pipeline: str) -> None:
    """Runs and groups: the history a busy pipeline leaves, plus a little live work."""
    jobs = rows // VARIANTS
    conn.execute(
        """
        INSERT INTO pgstagechain.groups (pipeline, group_key, step, status)
        SELECT %(pipeline)s, j::text, 'instagram_feed_gen', 'done'
        FROM generate_series(1, %(jobs)s - %(stuck)s) j
        """,
        {"pipeline": pipeline, "jobs": jobs, "stuck": stuck},
    )
    # A million finished runs (the last row stage of every variant).
    conn.execute(
        """
        INSERT INTO pgstagechain.runs (pipeline, stage, row_key, group_key, attempt, state,
                                       worker_id, started_at, lease_until, finished_at, result)
        SELECT %(pipeline)s, 'iou_eval', (j * 10 + v)::text, j::text, 1, 'succeeded', 'w1',
               now() - interval '1 hour', now() - interval '1 hour', now() - interval '59 minutes',
               '{"iou": 0.1}'
        FROM generate_series(1, %(jobs)s) j, generate_series(1, %(variants)s) v
        """,
        {"pipeline": pipeline, "jobs": jobs, "variants": VARIANTS},
    )
    # Live runs: 200 with a valid lease, 20 whose worker died, 50 failed awaiting a retry;
    # their rows are at (overlay, running), which is how the scanner finds them.
    conn.execute(
        sql.SQL(
            "INSERT INTO {}.jobs_variants (job_variants_id, job_id, img_asset_id, tenant_id,"
            " current_step, status)"
            " SELECT 10000000 + i, 1, 'live', 'tenant-1', 'overlay', 'running'"
            " FROM generate_series(1, 270) i"
        ).format(sql.Identifier(SCHEMA))
    )
    conn.execute(
        """
        INSERT INTO pgstagechain.runs (pipeline, stage, row_key, attempt, worker_id,
                                       lease_until, state, finished_at, retry_at)
        SELECT %(pipeline)s, 'overlay', (10000000 + i)::text, 1, 'w2',
               CASE WHEN i <= 20 THEN now() - interval '5 seconds'
                    ELSE now() + interval '30 seconds' END,
               CASE WHEN i > 220 THEN 'failed' ELSE 'running' END,
               CASE WHEN i > 220 THEN now() END,
               CASE WHEN i > 220 THEN now() + interval '1 minute' END
        FROM generate_series(1, 270) i
        """,
        {"pipeline": pipeline},
    )


STATEMENTS: dict[str, dict[str, Any]] = {
    "pending": {},
    "claim_rows_ready": {"stage": "overlay", "after": "planner", "limit": 100},
    "renotify_rows": {"limit": 10_000},
    "expire_leases": {"run_ids": [], "tokens": [], "reason": None, "free": False},
}


def rows_updated(plan: dict[str, Any], relation: str) -> int:
    """Rows the plan's UPDATE of ``relation`` touched (anywhere in it, CTEs included)."""
    found = 0
    if plan.get("Node Type") == "ModifyTable" and plan.get("Relation Name") == relation:
        found += int(plan.get("Actual Rows", 0))
    for child in plan.get("Plans", []):
        found += rows_updated(child, relation)
    return found


async def explain(dsn: str, pipeline: Pipeline, *, as_json: bool = False) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        claimer = await claimer_for(conn, pipeline)
        report: dict[str, dict[str, Any]] = {}
        stages = list(pipeline)
        common = {
            "row_steps": [s.after for s in stages if not s.group],
            "group_steps": [s.after for s in stages if s.group],
            "stages": [s.name for s in stages],
            "afters": [s.after for s in stages],
            "max_attempts": [s.retry.max_attempts for s in stages],
            "is_group": [s.group for s in stages],
            "keys": None,
            "worker": "explain",
            "lease": 30.0,
        }
        for name, extra in STATEMENTS.items():
            params = claimer.params(**common, **extra)
            if "stage" in extra:
                params["ancestors"] = claimer.ancestors(extra["stage"])
            text = claimer.text(name)
            started = time.perf_counter()
            options = "ANALYZE, BUFFERS, FORMAT JSON" if as_json else "ANALYZE, BUFFERS, COSTS OFF"
            cur = await conn.execute(f"EXPLAIN ({options}) {text}", params)  # type: ignore[arg-type]
            found = await cur.fetchall()
            elapsed = (time.perf_counter() - started) * 1000
            await conn.rollback()  # claims, notifications and expiries are not kept
            if as_json:
                (tree,) = found[0][0]
                report[name] = {
                    "round_trip_ms": round(elapsed, 3),
                    "execution_ms": tree["Execution Time"],
                    "runs_updated": rows_updated(tree["Plan"], "runs"),
                }
            else:
                plan = "\n".join(line for (line,) in found)
                print(f"\n=== {name} ({elapsed:.1f} ms round trip) ===\n{plan}")
        if as_json:
            print(json.dumps(report))


@contextlib.contextmanager
def server() -> Iterator[str]:
    given = os.environ.get("PGSTAGECHAIN_DSN")
    if given:
        yield given
        return
    with TemporaryCluster(settings={"shared_buffers": "256MB"}) as cluster:
        yield cluster.dsn()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--stuck", type=int, default=1_000)
    parser.add_argument("--json", action="store_true", help="one JSON line of figures, no plans")
    args = parser.parse_args()
    pipeline = build_pipeline()
    with server() as dsn:
        started = time.perf_counter()
        with psycopg.connect(dsn, autocommit=True) as conn:
            load(conn, args.rows, args.stuck)
        anyio.run(migrate, dsn, pipeline)  # trigger and the (step, status) and group indexes
        with psycopg.connect(dsn, autocommit=True) as conn:
            load_ledger(conn, args.rows, args.stuck, pipeline.name)
            conn.execute(sql.SQL("ANALYZE {}.jobs_variants").format(sql.Identifier(SCHEMA)))
            conn.execute("ANALYZE pgstagechain.runs")
            conn.execute("ANALYZE pgstagechain.groups")
            counts = conn.execute(
                sql.SQL(
                    "SELECT count(*), count(*) FILTER (WHERE current_step <> 'iou_eval')"
                    " FROM {}.jobs_variants"
                ).format(sql.Identifier(SCHEMA))
            ).fetchone()
            version = conn.execute("SHOW server_version").fetchone()
        assert counts is not None and version is not None
        print(
            f"PostgreSQL {version[0]}: {counts[0]:,} rows, {counts[1]:,} stuck at (planner, done);"
            f" loaded in {time.perf_counter() - started:.1f}s"
        )
        try:
            anyio.run(lambda: explain(dsn, pipeline, as_json=args.json))
        finally:
            if os.environ.get("PGSTAGECHAIN_DSN"):

                async def clean() -> None:
                    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
                        await uninstall(c, pipeline, purge=True)
                        await c.execute(
                            sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(SCHEMA))
                        )

                anyio.run(clean)


if __name__ == "__main__":
    main()
