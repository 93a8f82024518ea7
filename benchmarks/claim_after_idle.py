"""What the claim of a release costs on its own, after a pause and back to back.

Run from the repository root: ``python benchmarks/claim_after_idle.py [--gap 0.03]``. It
starts its own throwaway PostgreSQL, installs the benchmark pipeline, and on one
connection set up as the worker's control connection (``synchronous_commit = off``,
generic plans) times, interleaved, after ``--gap`` seconds of quiet and again with no
pause: ``SELECT 1``; a one-row ``UPDATE … RETURNING`` on a small table (the floor of
``run.py``); an ``UPDATE … RETURNING *`` of a job's 4 rows of the user's table; the
by-key claim of those 4 rows (what a release's hand-over sends). Prints one JSON line of
medians and 90th percentiles in ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_app
from pgstagechain import migrate
from pgstagechain._claim import claimer_for
from pgstagechain._dispatch import GENERIC_PLANS
from pgstagechain.testing import TemporaryCluster

KINDS = ("select_1", "update_1_row", "update_4_rows", "claim_4_rows")


def summary(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {
        "p50": round(statistics.median(values) * 1000, 3),
        "p90": round(values[int(len(values) * 0.9)] * 1000, 3),
    }


async def measure(dsn: str, samples: int, gap: float) -> dict[str, dict[str, float]]:
    pipeline = bench_app.build_pipeline()
    jobs = list(range(1, samples // 2 * len(KINDS) + 1))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(bench_app.DDL)
        conn.execute("CREATE TABLE floor (id int PRIMARY KEY, v bigint NOT NULL)")
        conn.execute("INSERT INTO floor SELECT g, 0 FROM generate_series(1, 1000) g")
        conn.execute("INSERT INTO bench_jobs SELECT j, 't' FROM unnest(%s::bigint[]) j", (jobs,))
        conn.execute(
            "INSERT INTO bench_variants (job_variants_id, job_id, img_asset_id, tenant_id)"
            " SELECT j * 1000 + v, j, 'a', 't' FROM unnest(%s::bigint[]) j,"
            " generate_series(1, 4) v",
            (jobs,),
        )
        conn.execute("ANALYZE bench_variants")
    await migrate(dsn, pipeline)
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as release,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as control,
    ):
        await control.execute("SET synchronous_commit = off")
        await control.execute(GENERIC_PLANS)
        claimer = await claimer_for(control, pipeline)
        job = 0
        for sample in range(samples // 2):
            for kind in KINDS:
                job += 1
                keys = [str(job * 1000 + v) for v in range(1, 5)]
                await release.execute(
                    "UPDATE bench_variants SET status = 'done' WHERE job_id = %s", (job,)
                )
                if gap:
                    await anyio.sleep(gap)
                started = time.perf_counter()
                if kind == "select_1":
                    await control.execute("SELECT 1")
                elif kind == "update_1_row":
                    await control.execute(
                        "UPDATE floor SET v = v + 1 WHERE id = %s RETURNING v", (sample + 1,)
                    )
                elif kind == "update_4_rows":
                    await control.execute(
                        "UPDATE bench_variants SET current_step = 'row_1', status = 'running'"
                        " WHERE job_variants_id = ANY(%s::bigint[]) RETURNING *",
                        ([int(k) for k in keys],),
                    )
                else:
                    claims, _ = await claimer.claim_within_limits(
                        control, "row_1", keys=keys, limit=4, worker_id="w", lease=30.0
                    )
                    assert len(claims) == 4, claims
                times[kind].append(time.perf_counter() - started)
    skip = min(10, samples // 8)  # the first statements plan and warm up
    return {kind: summary(found[skip:]) for kind, found in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=240, help="statements, all kinds together")
    parser.add_argument("--gap", type=float, default=0.03, help="seconds of quiet before each")
    args = parser.parse_args()
    result: dict[str, Any] = {"gap_s": args.gap}
    with TemporaryCluster() as cluster:
        admin = cluster.dsn()
        for name, gap in (("after_gap", args.gap), ("back_to_back", 0.0)):
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {name}")
            result[name] = anyio.run(measure, cluster.dsn(name), args.samples, gap)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
