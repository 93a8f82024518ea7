"""The cost of a stage limit that is never reached: transitions per second and CPU per
transition of a ten-stage no-op chain, without limits and with ``max_running`` set far
above what the worker could ever run at once.

    python benchmarks/limits.py [--rows 3000] [--repeats 3] [--limited one|every] [--dsn DSN]

``--limited one`` (the default) limits the middle stage (``row_5``); ``every`` limits all
ten. Runs alternate (plain, limited, plain, ...) on a fresh database each, in one worker
in this process (concurrency 50), after a smaller run to warm up, against a PostgreSQL started
for the purpose (fsync on) unless ``--dsn`` names one. CPU is this process's plus the server's, per transition. Progress goes to stderr;
stdout gets one JSON line with the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_app
from benchmarks.run import ServerCpu, log
from pgstagechain import Pipeline, Worker, migrate
from pgstagechain.testing import TemporaryCluster

STAGES = 10
#: far above the worker's concurrency: never reached
NEVER_REACHED = 1000
CONCURRENCY = 50


def chain(limited: str | None) -> Pipeline:
    """The ten-stage chain; ``limited`` is None, ``one`` (row_5) or ``every``."""
    pipeline = bench_app.build_pipeline(STAGES, 0, connection=False)
    for stage in pipeline:
        if limited == "every" or (limited == "one" and stage.name == "row_5"):
            stage.max_running = NEVER_REACHED
    return pipeline


def fresh_database(admin: str, name: str) -> str:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = psycopg.conninfo.make_conninfo(admin, dbname=name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(bench_app.DDL)
    return dsn


def settled(admin: str, name: str) -> None:
    """Wait until no backend of database ``name`` is left (its CPU is then counted)."""
    with psycopg.connect(admin, autocommit=True) as conn:
        while conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,)
        ).fetchone() != (0,):
            time.sleep(0.05)


def one_run(admin: str, name: str, limited: str | None, rows: int) -> dict[str, Any]:
    dsn = fresh_database(admin, name)
    pipeline = chain(limited)
    anyio.run(migrate, dsn, pipeline)
    bench_app.RECORD = False
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO bench_jobs SELECT g, 't' FROM generate_series(1, %s) g", (rows,))
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (job_variants_id, job_id, img_asset_id, tenant_id,"
                " current_step, status)"
                " SELECT g, g, 'a', 't', %s, 'done' FROM generate_series(1, %s) g"
            ).format(sql.Identifier(bench_app.TABLE)),
            (bench_app.START_STEP, rows),
        )
        conn.execute("VACUUM ANALYZE")
    settled(admin, name)
    server = ServerCpu(admin)
    worker = Worker(pipeline, dsn, concurrency=CONCURRENCY)
    cpu_before, server_before = sum(os.times()[:2]), server.seconds() or 0.0
    started = time.perf_counter()
    anyio.run(worker.run_until_idle)
    wall = time.perf_counter() - started
    cpu = sum(os.times()[:2]) - cpu_before
    settled(admin, name)
    server_cpu = (server.seconds() or 0.0) - server_before
    with psycopg.connect(dsn, autocommit=True) as conn:
        done = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE current_step = %s AND status = 'done'").format(
                sql.Identifier(bench_app.TABLE)
            ),
            (f"row_{STAGES}",),
        ).fetchone()
    assert done is not None and done[0] == rows, f"only {done} of {rows} rows finished"
    transitions = rows * STAGES
    return {
        "transitions_per_s": transitions / wall,
        "worker_cpu_us_per_transition": cpu / transitions * 1e6,
        "server_cpu_us_per_transition": server_cpu / transitions * 1e6,
        "cpu_us_per_transition": (cpu + server_cpu) / transitions * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limited", choices=["one", "every"], default="one")
    parser.add_argument(
        "--dsn", help="a server to use (databases limits_* are created there) instead of one"
    )
    args = parser.parse_args()
    cluster = None if args.dsn else TemporaryCluster()
    admin = args.dsn
    if cluster is not None:
        cluster.start()
        admin = cluster.dsn()
    found: dict[str, list[dict[str, Any]]] = {"plain": [], "limited": []}
    names: list[str] = []
    try:
        names.append(f"limits_{os.getpid()}_warm_up")
        one_run(admin, names[-1], None, max(1, args.rows // 5))
        for i in range(args.repeats):
            for label, limited in (("plain", None), ("limited", args.limited)):
                names.append(f"limits_{os.getpid()}_{label}_{i}")
                figures = one_run(admin, names[-1], limited, args.rows)
                log(
                    f"{label} #{i + 1}: " + json.dumps({k: round(v, 1) for k, v in figures.items()})
                )
                found[label].append(figures)
    finally:
        if cluster is not None:
            cluster.remove()
        else:
            with psycopg.connect(admin, autocommit=True) as conn:
                for name in names:
                    conn.execute(
                        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                            sql.Identifier(name)
                        )
                    )
    medians = {
        label: {key: round(statistics.median(r[key] for r in runs), 2) for key in runs[0]}
        for label, runs in found.items()
    }
    print(
        json.dumps(
            {
                "stages": STAGES,
                "rows": args.rows,
                "limit": f"max_running={NEVER_REACHED} on "
                + ("row_5" if args.limited == "one" else "every stage"),
                "concurrency": CONCURRENCY,
                "repeats": args.repeats,
                **medians,
                "throughput_change_pct": round(
                    (
                        medians["limited"]["transitions_per_s"]
                        / medians["plain"]["transitions_per_s"]
                        - 1
                    )
                    * 100,
                    1,
                ),
                "cpu_change_pct": round(
                    (
                        medians["limited"]["cpu_us_per_transition"]
                        / medians["plain"]["cpu_us_per_transition"]
                        - 1
                    )
                    * 100,
                    1,
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
