"""Chaos: thousands of ten-stage chains through worker processes while everything breaks.

In one run, while ``PGSTAGECHAIN_CHAOS_JOBS`` jobs of four variants each (default 600,
so 2,400 chains and 20,400 stage runs) go through three ``pgstagechain worker``
processes with a 3 s lease:

* worker processes are SIGKILLed at random moments and started again;
* the PostgreSQL server is restarted (fast shutdown) twice, each time with fresh work
  released just after it comes back;
* the workers' LISTEN backends are terminated with ``pg_terminate_backend``;
* the pipeline's channel is flooded with malformed and forged payloads;
* handlers fail on a fixed tenth of their calls (see ``tests/chaos_app.py``).

Afterwards the database alone must show: every chain finished, or failed with a
recorded reason; no stage of any row succeeded twice, and the handlers' own table holds
no duplicate execution; nothing is left running or waiting for a retry.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import psycopg
import pytest

from pgstagechain import migrate
from tests.chaos_app import EXECUTIONS_TABLE, pipeline
from tests.seed import GROUP_STAGES, ROW_STAGES, add_jobs, create_tables

pytestmark = [pytest.mark.anyio, pytest.mark.chaos, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
JOBS = int(os.environ.get("PGSTAGECHAIN_CHAOS_JOBS", "600"))
VARIANTS = 4
WORKERS = 3
WAVES = 3
LEASE = 3.0
#: The whole test gives up (and fails) after this many seconds.
DEADLINE = float(os.environ.get("PGSTAGECHAIN_CHAOS_DEADLINE", "420"))
RUNS_PER_JOB = VARIANTS * len(ROW_STAGES) + len(GROUP_STAGES)
STEPS = ["img_gen", *ROW_STAGES, *GROUP_STAGES]


@attrs.define
class Chaos:
    dsn: str
    logs: Path
    procs: dict[int, subprocess.Popen[bytes]] = attrs.field(factory=dict)
    every: list[subprocess.Popen[bytes]] = attrs.field(factory=list)
    down: set[int] = attrs.field(factory=set)  # slots killed on purpose, not yet restarted
    generation: int = 0
    kills: int = 0
    self_exits: int = 0
    restarts: int = 0
    recoveries: list[float] = attrs.field(factory=list)
    terminations: int = 0
    payloads: int = 0
    released_waves: int = 0
    finished: anyio.Event = attrs.field(factory=anyio.Event)

    def start(self, slot: int) -> None:
        self.generation += 1
        with (self.logs / f"worker-{slot}.log").open("ab") as out:
            self.procs[slot] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pgstagechain",
                    "--dsn",
                    self.dsn,
                    "--log-level",
                    "WARNING",
                    "worker",
                    "tests.chaos_app:pipeline",
                    "--lease",
                    str(LEASE),
                    "--scan-interval",
                    "1",
                    "--concurrency",
                    "16",
                    "--shutdown-timeout",
                    "5",
                    "--worker-id",
                    f"w{slot}-g{self.generation}",
                ],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        self.every.append(self.procs[slot])
        self.down.discard(slot)

    def stop_all(self) -> None:
        for proc in self.every:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.every:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def query(dsn: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(statement, params)
        return await cur.fetchall() if cur.description else []


async def query_when_up(dsn: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    """:func:`query`, waiting out a server restart."""
    while True:
        try:
            return await query(dsn, statement, params)
        except psycopg.OperationalError:
            await anyio.sleep(0.1)


async def succeeded(dsn: str) -> int:
    rows = await query_when_up(
        dsn, "SELECT count(*) FROM pgstagechain.runs WHERE state = 'succeeded'"
    )
    return int(rows[0][0])


async def until_succeeded(dsn: str, count: int) -> None:
    """Poll until at least ``count`` runs have succeeded."""
    while True:
        if await succeeded(dsn) >= count:
            return
        await anyio.sleep(0.05)


def worker_logs(logs: Path) -> str:
    return "\n".join(
        f"--- {log.name}\n{log.read_text()[-3000:]}" for log in sorted(logs.glob("*.log"))
    )


def wave_bounds(wave: int) -> tuple[int, int]:
    size = -(-JOBS // WAVES)
    return wave * size + 1, min(JOBS, (wave + 1) * size)


async def release_wave(chaos: Chaos) -> None:
    first, last = wave_bounds(chaos.released_waves)
    await query_when_up(
        chaos.dsn,
        "UPDATE jobs_variants SET status = 'done' WHERE job_id BETWEEN %s AND %s"
        " AND current_step = 'img_gen' AND status = 'running'",
        (first, last),
    )
    chaos.released_waves += 1


# -- the agents of chaos ------------------------------------------------------------------


async def supervise(chaos: Chaos) -> None:
    """Start a worker again wherever one died on its own (e.g. it booted mid-restart)."""
    while not chaos.finished.is_set():
        for slot, proc in list(chaos.procs.items()):
            if proc.poll() is not None and slot not in chaos.down:
                chaos.self_exits += 1
                chaos.start(slot)
        await anyio.sleep(0.5)


async def kill_workers(chaos: Chaos, rng: random.Random) -> None:
    while not chaos.finished.is_set():
        await anyio.sleep(rng.uniform(1.5, 4.0))
        slot = rng.randrange(WORKERS)
        proc = chaos.procs[slot]
        if proc.poll() is None:
            chaos.down.add(slot)
            proc.send_signal(signal.SIGKILL)
            await anyio.to_thread.run_sync(proc.wait)
            chaos.kills += 1
        await anyio.sleep(rng.uniform(0.1, 1.0))
        chaos.start(slot)


async def cut_listeners(chaos: Chaos, rng: random.Random) -> None:
    while not chaos.finished.is_set():
        await anyio.sleep(rng.uniform(1.0, 3.0))
        try:
            rows = await query(
                chaos.dsn,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'pgstagechain-listener'"
                " AND datname = current_database()",
            )
        except psycopg.OperationalError:
            continue
        chaos.terminations += sum(1 for (done,) in rows if done)


def hostile_payloads(rng: random.Random, count: int) -> Iterator[str]:
    for i in range(count):
        kind = rng.randrange(6)
        job = rng.randrange(1, JOBS + 1)
        key = f"{job * 100 + rng.randrange(1, VARIANTS + 1)}"
        if kind == 0:
            yield f"garbage {rng.random()} {i}"
        elif kind == 1:
            yield json.dumps({"job_variants_id": key, "status": "done", "n": i})
        elif kind == 2:  # well-formed, but the key does not fit the bigint key column
            yield json.dumps(["r", rng.choice(STEPS), f"x{rng.random()}", str(job)])
        elif kind == 3:  # a real row at a random step: claimed only if really there
            yield json.dumps(["r", rng.choice(STEPS), key, str(job)])
        elif kind == 4:  # a group at a random step
            yield json.dumps(["g", rng.choice(STEPS), str(job), str(job)])
        else:  # rows that do not exist
            yield json.dumps(["r", rng.choice(STEPS), str(10**9 + rng.randrange(10**6)), None])


async def flood(chaos: Chaos, rng: random.Random) -> None:
    while not chaos.finished.is_set():
        await anyio.sleep(rng.uniform(0.5, 1.5))
        payloads = list(dict.fromkeys(hostile_payloads(rng, 300)))
        try:
            await query(
                chaos.dsn,
                "SELECT count(pg_notify(%s, p)) FROM unnest(%s::text[]) p",
                (pipeline.channel, payloads),
            )
        except psycopg.OperationalError:
            continue
        chaos.payloads += len(payloads)


async def restart_server(chaos: Chaos, cluster: Any) -> None:
    """Restart the server, then release the next wave and time the way back to progress."""
    await anyio.to_thread.run_sync(cluster.restart)
    chaos.restarts += 1
    up = time.monotonic()
    before = await succeeded(chaos.dsn)
    if chaos.released_waves < WAVES:
        await release_wave(chaos)
    await until_succeeded(chaos.dsn, before + 1)
    chaos.recoveries.append(time.monotonic() - up)


async def progress(dsn: str) -> dict[str, int]:
    [row] = await query_when_up(
        dsn,
        """
        SELECT
          (SELECT count(*) FROM pgstagechain.groups
           WHERE pipeline = 'chaos' AND step = 'instagram_feed_gen' AND status = 'done'),
          (SELECT count(DISTINCT job_id) FROM jobs_variants WHERE status = 'failed')
          + (SELECT count(*) FROM pgstagechain.groups
             WHERE pipeline = 'chaos' AND status = 'failed'),
          (SELECT count(*) FROM pgstagechain.runs WHERE state = 'running'),
          (SELECT count(*) FROM pgstagechain.runs WHERE retry_at IS NOT NULL),
          (SELECT count(*) FROM pgstagechain.runs WHERE state = 'succeeded')
        """,
    )
    finished, failed, running, retrying, done = row
    return {
        "finished": finished,
        "failed": failed,
        "running": running,
        "retrying": retrying,
        "succeeded": done,
    }


async def conduct(chaos: Chaos, cluster: Any, rng: random.Random) -> None:
    """Release work in waves, restart the server between them, and wait for the end."""
    await release_wave(chaos)
    for _ in range(WAVES - 1):
        # Restart once the released work is about half done, so some is in flight.
        target = int(0.5 * RUNS_PER_JOB * wave_bounds(chaos.released_waves - 1)[1])
        await until_succeeded(chaos.dsn, target)
        await anyio.sleep(rng.uniform(0, 1))
        await restart_server(chaos, cluster)
    while True:
        state = await progress(chaos.dsn)
        if (
            state["finished"] + state["failed"] == JOBS
            and state["running"] == 0
            and state["retrying"] == 0
        ):
            break
        await anyio.sleep(0.5)
    chaos.finished.set()


# -- the test --------------------------------------------------------------------------------


async def test_chains_survive_chaos(
    pgstagechain_dsn: str, pgstagechain_server: Any, tmp_path: Path
) -> None:
    if pgstagechain_server.cluster is None:
        pytest.skip("the server comes from PGSTAGECHAIN_TEST_DSN and cannot be restarted here")
    dsn = pgstagechain_dsn
    create_tables(dsn)
    await query(dsn, EXECUTIONS_TABLE)
    await migrate(dsn, pipeline)
    add_jobs(dsn, jobs=JOBS, variants=VARIANTS, release=False)
    seed = int(os.environ.get("PGSTAGECHAIN_CHAOS_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    chaos = Chaos(dsn=dsn, logs=tmp_path)
    started = time.monotonic()
    for slot in range(WORKERS):
        chaos.start(slot)
    try:
        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(supervise, chaos)
                tg.start_soon(kill_workers, chaos, random.Random(rng.random()))
                tg.start_soon(cut_listeners, chaos, random.Random(rng.random()))
                tg.start_soon(flood, chaos, random.Random(rng.random()))
                await conduct(chaos, pgstagechain_server.cluster, rng)
    except TimeoutError:
        state = await progress(dsn)
        tails = await anyio.to_thread.run_sync(worker_logs, tmp_path)
        raise AssertionError(f"chaos run did not finish in {DEADLINE}s: {state}\n{tails}") from None
    finally:
        await anyio.to_thread.run_sync(chaos.stop_all)
    elapsed = time.monotonic() - started

    # -- the verdict, from the database alone ----------------------------------------------
    state = await progress(dsn)
    duplicate_runs = await query(
        dsn,
        "SELECT stage, row_key, count(*) FROM pgstagechain.runs WHERE state = 'succeeded'"
        " GROUP BY 1, 2 HAVING count(*) > 1",
    )
    duplicate_executions = await query(
        dsn,
        "SELECT stage, row_key, count(*) FROM chaos_executions GROUP BY 1, 2 HAVING count(*) > 1",
    )
    orphan_executions = await query(
        dsn,
        "SELECT e.run_id FROM chaos_executions e LEFT JOIN pgstagechain.runs r ON r.id = e.run_id"
        " WHERE r.state IS DISTINCT FROM 'succeeded'",
    )
    unexplained_failures = await query(
        dsn,
        """
        SELECT v.job_variants_id FROM jobs_variants v
        WHERE v.status = 'failed' AND NOT EXISTS (
            SELECT 1 FROM pgstagechain.runs r
            WHERE r.row_key = v.job_variants_id::text AND r.stage = v.current_step
              AND r.state IN ('failed', 'expired') AND r.error IS NOT NULL AND r.retry_at IS NULL)
        UNION ALL
        SELECT g.group_key::bigint FROM pgstagechain.groups g
        WHERE g.status = 'failed' AND NOT EXISTS (
            SELECT 1 FROM pgstagechain.runs r
            WHERE r.row_key = g.group_key AND r.stage = g.step
              AND r.state IN ('failed', 'expired') AND r.error IS NOT NULL AND r.retry_at IS NULL)
        """,
    )
    lost = await query(
        dsn,
        """
        SELECT j.job_id FROM jobs j
        WHERE NOT EXISTS (SELECT 1 FROM pgstagechain.groups g
                          WHERE g.pipeline = 'chaos' AND g.group_key = j.job_id::text
                            AND (g.status = 'failed'
                                 OR (g.step = 'instagram_feed_gen' AND g.status = 'done')))
          AND NOT EXISTS (SELECT 1 FROM jobs_variants v
                          WHERE v.job_id = j.job_id AND v.status = 'failed')
        """,
    )
    stuck_rows = await query(
        dsn,
        "SELECT count(*) FROM jobs_variants"
        " WHERE status = 'running' OR (status = 'done' AND current_step <> 'iou_eval')",
    )
    [(executions, runs_total, injected, expired)] = await query(
        dsn,
        "SELECT (SELECT count(*) FROM chaos_executions), (SELECT count(*) FROM pgstagechain.runs),"
        " (SELECT count(*) FROM pgstagechain.runs WHERE error LIKE '%%injected failure%%'),"
        " (SELECT count(*) FROM pgstagechain.runs WHERE state = 'expired')",
    )
    reasons = await query(
        dsn,
        """
        SELECT v.job_variants_id, v.current_step, r.attempt,
               right(rtrim(r.error, E'\n '), 160) AS reason
        FROM jobs_variants v
        JOIN LATERAL (SELECT attempt, error FROM pgstagechain.runs
                      WHERE row_key = v.job_variants_id::text AND stage = v.current_step
                      ORDER BY id DESC LIMIT 1) r ON true
        WHERE v.status = 'failed'
        """,
    )
    for key, step, attempt, reason in reasons:
        print(f"  failed: variant {key} at {step} after attempt {attempt}: {reason[:160]}")
    print(
        f"\nchaos (seed {seed}): {JOBS * VARIANTS} chains ({JOBS} jobs x {VARIANTS} variants)"
        f" through {WORKERS} worker processes in {elapsed:.1f}s\n"
        f"  finished {state['finished']} jobs, failed {state['failed']} (with a recorded reason),"
        f" lost {len(lost)}\n"
        f"  runs {runs_total}: succeeded {state['succeeded']}, injected failures {injected},"
        f" expired leases {expired}\n"
        f"  worker kills {chaos.kills} (self exits {chaos.self_exits}),"
        f" server restarts {chaos.restarts}, listener terminations {chaos.terminations},"
        f" hostile payloads {chaos.payloads}\n"
        f"  recovery after each restart: "
        f"{', '.join(f'{s:.2f}s' for s in chaos.recoveries)}\n"
        f"  duplicate successful runs {len(duplicate_runs)},"
        f" duplicate executions {len(duplicate_executions)}"
    )
    assert chaos.restarts >= 2 and chaos.kills >= 1 and chaos.terminations >= 1
    assert lost == []
    assert state["finished"] + state["failed"] == JOBS
    assert unexplained_failures == []
    assert duplicate_runs == []
    assert duplicate_executions == []
    assert orphan_executions == []
    assert executions == state["succeeded"]
    assert stuck_rows == [(0,)]
    assert state["running"] == 0 and state["retrying"] == 0
