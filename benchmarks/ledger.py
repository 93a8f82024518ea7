"""What the size of the run ledger costs the hot statements, and the ledger under retention.

Part 1: the claim, the completion and the recovery scanner's statements (the probe
``pending`` and ``expire_leases``) timed with a ledger of ``--small`` finished runs, then
again after filling it up to ``--size`` (by ``INSERT ... SELECT generate_series``: four
pipelines, five stages, five runs per row key, 3 % not succeeded, 30 % with a result,
finished over the last 30 days). Each statement is run ``--iterations`` times for real
(claim one row of the second stage, which reads the first stage's result from the ledger,
then complete it); medians and 95th percentiles in milliseconds, and the plan of one
execution by ``EXPLAIN (ANALYZE, BUFFERS)``, rolled back: the buffers it touched and how it
reached the ledger (never a sequential scan).

Part 2: a worker under a steady load (``--rate`` rows a second through three row stages)
with ``Retention(finished=--window seconds)`` applied every ``--every`` seconds, for
``--seconds``; the ledger's row count, ``pg_total_relation_size`` and the table's own size
every five seconds. Deleted runs are reclaimed by autovacuum (a minute apart by default),
so the size settles after a couple of its rounds.

Prints one JSON line. Run from the repository root (the default is a quick look; the
figures in docs/benchmarks.md are for ``--size 10000000``)::

    python benchmarks/ledger.py [--size 1000000] [--seconds 60]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgstagechain import Pipeline, Retention, Worker, migrate
from pgstagechain._claim import claimer_for  # the statements themselves are internal
from pgstagechain._recovery import probe
from pgstagechain.testing import TemporaryCluster

STAGES = ("first", "second", "third")
WAITING = 3000  # rows waiting at (first, done), each with its first run in the ledger

TABLE = """
CREATE TABLE IF NOT EXISTS bench_items (
    id bigint PRIMARY KEY,
    current_step text NOT NULL DEFAULT 'new',
    status text NOT NULL DEFAULT 'done'
)
"""

FILL = """
INSERT INTO pgstagechain.runs (pipeline, stage, row_key, group_key, attempt, state, worker_id,
                               started_at, lease_until, finished_at, error, result)
SELECT (ARRAY['bench', 'bench', 'other_a', 'other_b', 'other_c'])[1 + (i / 5) %% 5],
       (ARRAY['first', 'second', 'third', 'gather', 'publish'])[1 + i %% 5],
       (1000000000 + i / 5)::text, (1000000000 + i / 50)::text, 1,
       CASE WHEN i %% 100 < 97 THEN 'succeeded' WHEN i %% 100 < 99 THEN 'failed'
            ELSE 'expired' END,
       'filler', at - interval '1 second', at, at,
       CASE WHEN i %% 100 >= 97 THEN 'it broke' END,
       CASE WHEN i %% 10 < 3 THEN '{"score": 0.5}'::jsonb END
FROM generate_series(%(start)s::bigint, %(stop)s::bigint - 1) i,
     LATERAL (SELECT now() - interval '30 days'
                     + (i::float8 / %(stop)s) * interval '30 days' AS at) t
"""


def bench_pipeline(retention: Retention | None = None) -> Pipeline:
    pipeline = Pipeline("bench", table="bench_items", start="new", retention=retention)

    async def handler(ctx: Any) -> dict[str, Any]:
        return {"stage": ctx.stage}

    previous = "new"
    for name in STAGES:
        pipeline.stage(after=previous, name=name)(handler)
        previous = name
    return pipeline


def fill(dsn: str, upto: int) -> float:
    """Top the ledger up to ``upto`` filler runs; seconds it took (with VACUUM ANALYZE)."""
    started = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pgstagechain.runs WHERE worker_id = 'filler'")
        have = int(row.fetchone()[0])  # type: ignore[index]
        step = 1_000_000
        for start in range(have, upto, step):
            conn.execute(FILL, {"start": start, "stop": min(upto, start + step)})
        conn.execute("VACUUM ANALYZE pgstagechain.runs")
        conn.execute("VACUUM ANALYZE bench_items")
    return time.perf_counter() - started


def prepare_rows(dsn: str, first_key: int) -> None:
    """Rows waiting at (first, done), each with the result of its first stage in the ledger."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")  # no notifications for these
        conn.execute(
            "INSERT INTO bench_items (id, current_step, status)"
            " SELECT k, 'first', 'done' FROM generate_series(%s::bigint, %s::bigint - 1) k",
            (first_key, first_key + WAITING),
        )
        conn.execute(
            "INSERT INTO pgstagechain.runs (pipeline, stage, row_key, attempt, state, worker_id,"
            " lease_until, finished_at, result)"
            " SELECT 'bench', 'first', k::text, 1, 'succeeded', 'bench', now(), now(),"
            ' \'{"stage": "first"}\' FROM generate_series(%s::bigint, %s::bigint - 1) k',
            (first_key, first_key + WAITING),
        )
        conn.execute("ANALYZE bench_items")


def ledger_access(plan: dict[str, Any]) -> list[str]:
    """How a plan reaches the ledger: scan type and index of every node on ``runs``."""
    found = []
    if plan.get("Relation Name") == "runs":
        found.append(
            f"{plan['Node Type']}" + (f" {plan['Index Name']}" if "Index Name" in plan else "")
        )
    for child in plan.get("Plans", []):
        found += ledger_access(child)
    return found


def buffers(plan: dict[str, Any]) -> int:
    return int(plan.get("Shared Hit Blocks", 0)) + int(plan.get("Shared Read Blocks", 0))


async def explain(conn: psycopg.AsyncConnection[Any], text: Any, params: Any) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of one statement, executed and rolled back."""
    async with conn.transaction():
        cur = await conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {text}", params)
        found = await cur.fetchone()
        assert found is not None
        (tree,) = found[0]
        raise psycopg.Rollback()
    root = tree["Plan"]
    return {
        "execution_ms": round(tree.get("Execution Time", 0.0), 3),
        "buffers": buffers(root),
        "ledger_access": sorted(set(ledger_access(root))),
    }


async def time_statements(dsn: str, pipeline: Pipeline, iterations: int) -> dict[str, Any]:
    """Claim one row of `second`, complete it; probe; expire: each timed, then explained."""
    timings: dict[str, list[float]] = {"claim": [], "complete": [], "pending": [], "expire": []}
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        claimer = await claimer_for(conn, pipeline)
        served = list(pipeline)

        async def timed(name: str, call: Any) -> Any:
            started = time.perf_counter()
            found = await call
            timings[name].append((time.perf_counter() - started) * 1000)
            return found

        for _ in range(iterations):
            claims = await timed("claim", claimer.claim(conn, "second", worker_id="bench"))
            assert claims and claims[0].results == {"first": {"stage": "first"}}, claims
            await timed("complete", claimer.complete(conn, claims[0], '{"stage": "second"}'))
            await timed("pending", probe(conn, claimer, served))
            await timed("expire", claimer.expire(conn))

        # the plans, each statement executed once more and rolled back
        stages = list(pipeline)
        plans = {
            "claim": await explain(
                conn,
                claimer.text("claim_rows_ready"),
                claimer.params(
                    stage="second",
                    after="first",
                    keys=None,
                    limit=1,
                    worker="bench",
                    lease=30.0,
                    ancestors=claimer.ancestors("second"),
                ),
            )
        }
        claims = await claimer.claim(conn, "second", worker_id="bench")
        item = (claims[0].run_id, claims[0].token, claims[0].row_key, '{"a": 1}', False)
        plans["complete"] = await explain(
            conn, *claimer._complete_params("second", False, [item], "bench", 30.0)
        )
        await claimer.complete(conn, claims[0], None)
        plans["pending"] = await explain(
            conn,
            claimer.text("pending"),
            claimer.params(row_steps=[s.after for s in stages], group_steps=[]),
        )
        plans["expire"] = await explain(
            conn,
            claimer.text("expire_leases"),
            claimer.params(
                stages=[s.name for s in stages],
                afters=[s.after for s in stages],
                max_attempts=[3 for _ in stages],
                is_group=[False for _ in stages],
                run_ids=[],
                tokens=[],
                reason=None,
                free=False,
                deep=False,
            ),
        )
    return {
        name: {
            "median_ms": round(statistics.median(values), 3),
            "p95_ms": round(sorted(values)[max(0, int(len(values) * 0.95) - 1)], 3),
            **plans[name],
        }
        for name, values in timings.items()
    }


async def ledger_size(conn: psycopg.AsyncConnection[Any]) -> list[int]:
    """Runs in the ledger, its size with indexes and its table's size alone, in bytes."""
    cur = await conn.execute(
        "SELECT count(*), pg_total_relation_size('pgstagechain.runs'),"
        " pg_relation_size('pgstagechain.runs') FROM pgstagechain.runs"
    )
    found = await cur.fetchone()
    assert found is not None
    return [int(v) for v in found]


async def steady(
    dsn: str, *, rate: int, seconds: float, window: float, every: float
) -> dict[str, Any]:
    """Rows fed at ``rate`` a second through three stages, retention on; the ledger sampled."""
    retention = Retention(finished=dt.timedelta(seconds=window), every=dt.timedelta(seconds=every))
    pipeline = bench_pipeline(retention)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("DROP TABLE IF EXISTS bench_items")
        await conn.execute(TABLE)
        await conn.execute("TRUNCATE pgstagechain.runs")
    await migrate(dsn, pipeline)
    worker = Worker(pipeline, dsn, concurrency=20)
    samples: list[list[float]] = []
    async with (
        anyio.create_task_group() as tg,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
    ):
        tg.start_soon(worker.run)
        await worker.wait_started()
        started = time.monotonic()
        key = 0
        next_sample = 0.0
        while (elapsed := time.monotonic() - started) < seconds:
            batch = max(1, rate // 10)
            await conn.execute(
                "INSERT INTO bench_items (id) SELECT generate_series(%s::bigint, %s::bigint)",
                (key, key + batch - 1),
            )
            key += batch
            if elapsed >= next_sample:
                samples.append([round(elapsed, 1), *await ledger_size(conn)])
                next_sample += 5.0
            await anyio.sleep(0.1)
        worker.stop()
        samples.append([round(time.monotonic() - started, 1), *await ledger_size(conn)])
        finished = await (
            await conn.execute("SELECT count(*) FROM bench_items WHERE current_step = 'third'")
        ).fetchone()
    last_third = [s for s in samples if s[0] >= seconds * 2 / 3]
    return {
        "rate_rows_per_s": rate,
        "runs_per_s": rate * len(STAGES),
        "window_s": window,
        "every_s": every,
        "rows_fed": key,
        "rows_through": int(finished[0]) if finished else 0,
        "samples_t_runs_bytes_heap_bytes": samples,
        "last_third_bytes": [min(s[2] for s in last_third), max(s[2] for s in last_third)],
        "last_third_runs": [min(s[1] for s in last_third), max(s[1] for s in last_third)],
    }


async def measure(dsn: str, args: argparse.Namespace) -> dict[str, Any]:
    pipeline = bench_pipeline()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(TABLE)
    await migrate(dsn, pipeline)
    report: dict[str, Any] = {"sizes": {}}
    first_key = 1
    for size in (args.small, args.size):
        fill_seconds = await anyio.to_thread.run_sync(fill, dsn, size)
        prepare_rows(dsn, first_key)
        first_key += WAITING
        with psycopg.connect(dsn) as conn:
            runs, total = conn.execute(
                "SELECT count(*), pg_total_relation_size('pgstagechain.runs')"
                " FROM pgstagechain.runs"
            ).fetchone()  # type: ignore[misc]
        report["sizes"][str(size)] = {
            "ledger_runs": runs,
            "ledger_bytes": total,
            "fill_seconds": round(fill_seconds, 1),
            "statements": await time_statements(dsn, pipeline, args.iterations),
        }
    report["steady"] = await steady(
        dsn, rate=args.rate, seconds=args.seconds, window=args.window, every=args.every
    )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="a server to use (default: a throwaway cluster)")
    parser.add_argument("--small", type=int, default=10_000, help="finished runs, first")
    parser.add_argument("--size", type=int, default=1_000_000, help="finished runs, then")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--rate", type=int, default=100, help="rows a second, steady part")
    parser.add_argument("--seconds", type=float, default=180.0, help="length of the steady part")
    parser.add_argument("--window", type=float, default=5.0, help="Retention(finished=...)")
    parser.add_argument("--every", type=float, default=2.0, help="Retention(every=...)")
    args = parser.parse_args()
    if args.dsn:
        report = anyio.run(measure, args.dsn, args)
    else:
        with TemporaryCluster(settings={"shared_buffers": "256MB"}) as cluster:
            report = anyio.run(measure, cluster.dsn(), args)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
