"""EXPLAIN (ANALYZE, BUFFERS) of one batched completion that chains its runs on.

Builds the benchmark's table (``bench_app``: 8 row stages, then 2 group stages) with
``--rows`` rows, claims them all at the first row stage, takes them through the first
``--stages`` row stages in completions of ``--batch`` runs chained to the next stage (as a
worker does under load), then prints the plan of the next such completion, executed for
real inside a transaction that is rolled back. It starts a throwaway cluster unless
``PGSTAGECHAIN_DSN`` names an empty database to work in. Run from the repository root::

    python benchmarks/explain_complete.py [--rows 4000] [--batch 200] [--stages 4]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import anyio
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_app
from pgstagechain import migrate
from pgstagechain._claim import claimer_for  # the statements themselves are internal
from pgstagechain._context import Claim
from pgstagechain.testing import TemporaryCluster


async def explain(dsn: str, rows: int, batch: int, stages: int) -> None:
    pipeline = bench_app.build_pipeline(8, 2, connection=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(bench_app.DDL)  # type: ignore[arg-type]
        conn.execute(
            "INSERT INTO bench_jobs SELECT j, 't' FROM generate_series(1, %s) j", (rows // 4 + 1,)
        )
        conn.execute(
            "INSERT INTO bench_variants (job_variants_id, job_id, img_asset_id, tenant_id)"
            " SELECT j, 1 + (j - 1) / 4, 'a', 't' FROM generate_series(1, %s) j",
            (rows,),
        )
    await migrate(dsn, pipeline)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        claimer = await claimer_for(conn, pipeline)
        await conn.execute("UPDATE bench_variants SET status = 'done'")
        claims: list[Claim] = []
        while got := await claimer.claim(conn, "row_1", limit=batch, worker_id="explain"):
            claims += got
        names = [f"row_{i + 1}" for i in range(stages + 1)]
        for stage in names[:-1]:
            following: list[Claim] = []
            for start in range(0, len(claims), batch):
                part = claims[start : start + batch]
                items = [(c.run_id, c.token, c.row_key, None, True) for c in part]
                _, chained = await claimer.complete_many(
                    conn, stage, False, items, worker_id="explain", lease=30.0
                )
                following += [chained[c.token] for c in part]
            claims = following
        items = [(c.run_id, c.token, c.row_key, None, True) for c in claims[:batch]]
        text, params = claimer._complete_params(names[-1], False, items, "explain", 30.0)
        async with conn.transaction(force_rollback=True):
            cur = await conn.execute(f"EXPLAIN (ANALYZE, BUFFERS) {text}", params)  # type: ignore[arg-type]
            print("\n".join(line for (line,) in await cur.fetchall()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--stages", type=int, default=4, help="row stages completed before")
    args = parser.parse_args()
    if not 0 <= args.stages < 8:
        parser.error("--stages must be between 0 and 7 (the pipeline has 8 row stages)")
    given = os.environ.get("PGSTAGECHAIN_DSN")
    if given:
        anyio.run(explain, given, args.rows, args.batch, args.stages)
        return
    with TemporaryCluster() as cluster:
        anyio.run(explain, cluster.dsn(), args.rows, args.batch, args.stages)


if __name__ == "__main__":
    main()
