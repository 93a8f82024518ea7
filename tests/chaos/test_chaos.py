"""Chaos: some 1,600 ten-stage chains through worker processes while everything breaks.

In one run, while ``PGSTAGECHAIN_CHAOS_JOBS`` jobs of four variants each (default 400,
so 1,600 chains and 13,600 stage runs) go through three ``pgstagechain worker`` processes
with a 3 s lease, one of them serving only the first four stages:

* the stages run every way a stage can (``tests/apps/chaos_app.py``): ``async def`` and
  ``def`` handlers, with a connection they write on and without one (batched
  completions); a few calls take longer than a server restart;
* worker processes are SIGKILLed at random moments and started again;
* the PostgreSQL server crashes (``pg_ctl restart -m immediate``: what was not yet on
  disk is gone), once right after a burst of claims, and is restarted cleanly
  (``-m fast``), each time with fresh work released just after it comes back;
* backends of the workers (listeners, claim and completion links, handler connections)
  are terminated with ``pg_terminate_backend``;
* the pipeline's channel is flooded with hostile payloads: garbage, forgeries for real
  rows at any step, keys that fit no column, lone surrogates, NULs, nested JSON, deep
  nesting up to the size limit, huge numbers;
* handlers fail on a fixed tenth of their calls.

Afterwards the database alone must show: every chain finished, or failed with a recorded
reason; no stage of any row or group succeeded twice, and the handlers' own table holds
no duplicate execution and none for a run that did not succeed; every stored result
belongs to its own row and stage; no row or group at ``(stage, running)`` without a live
run. No worker process may have exited on its own.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import psycopg
import pytest

from pgstagechain import migrate
from tests.apps.chaos_app import EXECUTIONS_TABLE, RECORDING_STAGES, pipeline
from tests.apps.seed import GROUP_STAGES, ROW_STAGES, add_jobs, create_tables
from tests.chaos.crash import crash, wal_writer_held
from tests.helpers import query, query_when_up

pytestmark = [pytest.mark.anyio, pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
JOBS = int(os.environ.get("PGSTAGECHAIN_CHAOS_JOBS", "400"))
VARIANTS = 4
WORKERS = 3
#: stages of the worker in slot 1 (a "GPU pool"); the others serve every stage
PARTIAL_STAGES = ROW_STAGES[:4]
#: one server restart between two waves of released work: the first is a crash just
#: after a burst of claims (see :func:`crash_after_claims`), the others come once the
#: released work is about half done
RESTART_MODES = ("immediate", "fast", "immediate", "immediate")
WAVES = len(RESTART_MODES) + 1
LEASE = 3.0
#: The whole test gives up (and fails) after this many seconds.
DEADLINE = float(os.environ.get("PGSTAGECHAIN_CHAOS_DEADLINE", "300"))
#: ... or once no run succeeded for this long while work is left (something is stuck).
STALL = float(os.environ.get("PGSTAGECHAIN_CHAOS_STALL", "30"))
RUNS_PER_JOB = VARIANTS * len(ROW_STAGES) + len(GROUP_STAGES)
STEPS = ["img_gen", *ROW_STAGES, *GROUP_STAGES]
BACKENDS = (
    "pgstagechain-listener",
    "pgstagechain-control",
    "pgstagechain-finisher",
    "pgstagechain-handler",
)

#: Payloads that once stopped every worker, sent in each round of the flood.
NAMED_PAYLOADS = [
    "[" * 7999,
    '{"a":' * 1599,
    '["r","img_gen","\\ud800",null]',
    '["r","img_gen","101","\\udc00"]',
    '["g","iou_eval","\\ud83d","1"]',
    '["t","vlm_analyze","\\udfff",null]',
    '["r","img_gen",{"a":{"b":[1,{"c":null}]}},null]',
    '["r","img_gen",[["101"]],"1"]',
    '["r","img_gen","10\\u00001",null]',
    '["r","img_gen","101","\\u0000"]',
    '["r","img_gen",' + "9" * 5000 + ",null]",
    '["r","img_gen","' + "9" * 40 + '","1"]',
    '["r","img_gen","1e999","1"]',
    '["r","img_gen","101",1e999]',
]


@attrs.define
class Chaos:
    dsn: str
    logs: Path
    procs: dict[int, subprocess.Popen[bytes]] = attrs.field(factory=dict)
    every: list[subprocess.Popen[bytes]] = attrs.field(factory=list)
    down: set[int] = attrs.field(factory=set)  # slots killed on purpose, not yet restarted
    generation: int = 0
    kills: int = 0
    exits: list[str] = attrs.field(factory=list)  # workers that exited on their own
    restarts: Counter[str] = attrs.field(factory=Counter)
    recoveries: list[str] = attrs.field(factory=list)
    terminations: Counter[str] = attrs.field(factory=Counter)
    payloads: int = 0
    #: (stage, key) of each run id seen just before the first crash
    before_crash: dict[int, tuple[str, str]] = attrs.field(factory=dict)
    released_waves: int = 0
    #: set after the first crash: the other agents wait for it, so that nothing commits
    #: synchronously (a NOTIFY does) between the claims that crash is meant to lose and it
    storm: anyio.Event = attrs.field(factory=anyio.Event)
    finished: anyio.Event = attrs.field(factory=anyio.Event)

    def start(self, slot: int) -> None:
        self.generation += 1
        stages = ["--stages", ",".join(PARTIAL_STAGES)] if slot == 1 else []
        path = [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]
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
                    "tests.apps.chaos_app:pipeline",
                    *stages,
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
                env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)},
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


def tail(log: Path, size: int = 3000) -> str:
    """The end of a worker's log, after the last exceptions it names (a traceback of
    nested task groups puts the cause far from its end)."""
    text = log.read_text(errors="replace")
    errors = [
        line.strip(" |")
        for line in text.splitlines()
        if ("Error: " in line or "Exception: " in line) and "ExceptionGroup" not in line
    ]
    return f"--- {log.name}: last errors {errors[-3:]}\n{text[-size:]}"


def worker_logs(logs: Path) -> str:
    return "\n".join(tail(log) for log in sorted(logs.glob("*.log")))


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
    """A worker that exits on its own (a notification, a restart, anything) fails the run."""
    while not chaos.finished.is_set():
        for slot, proc in list(chaos.procs.items()):
            code = proc.poll()
            if code is not None and slot not in chaos.down:
                chaos.exits.append(f"worker slot {slot} exited with {code}")
                log = await anyio.to_thread.run_sync(tail, chaos.logs / f"worker-{slot}.log")
                raise AssertionError(f"a worker exited on its own (exit {code}):\n{log}")
        await anyio.sleep(0.2)


async def kill_workers(chaos: Chaos, rng: random.Random) -> None:
    await chaos.storm.wait()
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


async def cut_backends(chaos: Chaos, rng: random.Random) -> None:
    """Terminate workers' backends: every listener, and a few others of any kind."""
    await chaos.storm.wait()
    while not chaos.finished.is_set():
        await anyio.sleep(rng.uniform(1.0, 3.0))
        try:
            rows = await query(
                chaos.dsn,
                "SELECT application_name, pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database()"
                " AND (application_name = 'pgstagechain-listener'"
                "      OR (application_name = ANY(%s) AND random() < 0.2))",
                (list(BACKENDS),),
            )
        except psycopg.OperationalError:
            continue
        chaos.terminations.update(name for name, done in rows if done)


def hostile_payloads(rng: random.Random, count: int) -> Iterator[str]:
    yield from NAMED_PAYLOADS
    for i in range(count):
        kind = rng.randrange(11)
        job = rng.randrange(1, JOBS + 1)
        key = f"{job * 100 + rng.randrange(1, VARIANTS + 1)}"
        step = rng.choice(STEPS)
        if kind == 0:
            yield f"garbage {rng.random()} {i}"
        elif kind == 1:
            yield json.dumps({"job_variants_id": key, "status": "done", "n": i})
        elif kind == 2:  # well-formed, but the key does not fit the bigint key column
            yield json.dumps(["r", step, f"x{rng.random()}", str(job)])
        elif kind == 3:  # a real row at a random step: claimed only if really there
            yield json.dumps(["r", step, key, str(job)])
        elif kind == 4:  # a group at a random step
            yield json.dumps(["g", step, str(job), str(job)])
        elif kind == 5:  # rows that do not exist
            yield json.dumps(["r", step, str(10**9 + rng.randrange(10**6)), None])
        elif kind == 6:  # deep nesting, up to the size limit
            yield rng.choice(["[", '{"a":', '["r",']) * rng.randrange(1, 1600)
        elif kind == 7:  # a lone surrogate, escaped, anywhere
            where = rng.randrange(3)
            parts = [json.dumps(step), json.dumps(key), json.dumps(str(job))]
            parts[where] = f'"{key}\\u{rng.randrange(0xD800, 0xE000):04x}"'
            yield f'["{rng.choice("rgt")}",{",".join(parts)}]'
        elif kind == 8:  # nested JSON as the key or the group
            nested = {"k": [key, {"deeper": [job, None]}]}
            yield json.dumps(["r", step, nested, str(job)] if i % 2 else ["r", step, key, nested])
        elif kind == 9:  # a NUL in the key, the group or the step
            yield json.dumps(
                rng.choice(
                    [["r", step, key + "\0", str(job)], ["r", step, key, "\0"], ["r", "\0", key]]
                )
            )
        else:  # numbers: huge, out of range, out of float
            yield rng.choice(
                [
                    f'["r","{step}",{"9" * rng.randrange(20, 7000)},null]',
                    json.dumps(["r", step, "9" * rng.randrange(20, 900), str(job)]),
                    f'["r","{step}","{key}",1e999]',
                    f'["r","{step}",-1e999,"{job}"]',
                ]
            )


async def flood(chaos: Chaos, rng: random.Random) -> None:
    await chaos.storm.wait()
    while not chaos.finished.is_set():
        await anyio.sleep(rng.uniform(0.5, 1.5))
        payloads = [p for p in dict.fromkeys(hostile_payloads(rng, 300)) if len(p) < 8000]
        try:
            await query(
                chaos.dsn,
                "SELECT count(pg_notify(%s, p)) FROM unnest(%s::text[]) p",
                (pipeline.channel, payloads),
            )
        except psycopg.OperationalError:
            continue
        chaos.payloads += len(payloads)


async def restart_server(
    chaos: Chaos, cluster: Any, mode: str, *, held_wal_writer: int | None = None
) -> None:
    """Restart the server, then release the next wave and time the way back to progress."""
    if mode == "immediate":
        await anyio.to_thread.run_sync(crash, cluster, held_wal_writer)
    else:
        await anyio.to_thread.run_sync(cluster.restart, mode)
    chaos.restarts[mode] += 1
    up = time.monotonic()
    before = await succeeded(chaos.dsn)
    if chaos.released_waves < WAVES:
        await release_wave(chaos)
    await until_succeeded(chaos.dsn, before + 1)
    chaos.recoveries.append(f"{time.monotonic() - up:.2f}s ({mode})")


async def crash_after_claims(chaos: Chaos, cluster: Any) -> None:
    """Release the first wave and crash the server as soon as workers claimed some of it,
    before any of those runs completed, with the WAL writer held: the claims, committed
    asynchronously, are lost (as the last ~0.2 s of them are in any crash)."""
    listening = 0
    while listening < WORKERS:  # started, and done with their start-up commits
        await anyio.sleep(0.05)
        [(listening,)] = await query(
            chaos.dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'pgstagechain-listener'",
        )
    with wal_writer_held(chaos.dsn) as wal_writer:
        await release_wave(chaos)
        claimed = 0
        while claimed < 16:
            await anyio.sleep(0.01)
            [(claimed,)] = await query(chaos.dsn, "SELECT count(*) FROM pgstagechain.runs")
        chaos.before_crash = {
            run_id: (stage, key)
            for run_id, stage, key in await query(
                chaos.dsn, "SELECT id, stage, row_key FROM pgstagechain.runs"
            )
        }
        await restart_server(chaos, cluster, "immediate", held_wal_writer=wal_writer)
    chaos.storm.set()


async def crash_figures(chaos: Chaos) -> tuple[int, int]:
    """Of the claims seen just before the first crash: how many it took back, and how many
    of their run ids were later given to another row's or stage's run."""
    after = {
        run_id: (stage, key)
        for run_id, stage, key in await query(
            chaos.dsn,
            "SELECT id, stage, row_key FROM pgstagechain.runs WHERE id = ANY(%s)",
            (list(chaos.before_crash),),
        )
    }
    lost = sum(1 for run_id, run in chaos.before_crash.items() if after.get(run_id) != run)
    reused = sum(1 for run_id, run in chaos.before_crash.items() if after.get(run_id, run) != run)
    return lost, reused


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


async def conduct(chaos: Chaos, cluster: Any, rng: random.Random) -> bool:
    """Release work in waves, restart the server between them, and wait for the end.
    False if the work stalled (no run succeeded for ``STALL`` seconds) before it ended."""
    await crash_after_claims(chaos, cluster)
    for mode in RESTART_MODES[1:]:
        # Restart once the released work is about half done, so some is in flight.
        target = int(0.5 * RUNS_PER_JOB * wave_bounds(chaos.released_waves - 1)[1])
        await until_succeeded(chaos.dsn, target)
        await anyio.sleep(rng.uniform(0, 1))
        await restart_server(chaos, cluster, mode)
    last_change, last_count = time.monotonic(), -1
    while True:
        state = await progress(chaos.dsn)
        if (
            state["finished"] + state["failed"] == JOBS
            and state["running"] == 0
            and state["retrying"] == 0
        ):
            outcome = True
            break
        if state["succeeded"] != last_count:
            last_change, last_count = time.monotonic(), state["succeeded"]
        elif time.monotonic() - last_change > STALL:
            outcome = False
            break
        await anyio.sleep(0.5)
    chaos.finished.set()
    return outcome


# -- the verdict, from the database alone --------------------------------------------------

MISPLACED_RESULTS = """
SELECT r.id, r.stage, r.row_key, r.result::text FROM pgstagechain.runs r
WHERE r.pipeline = 'chaos' AND r.state = 'succeeded'
  AND (r.result ->> 'key' IS DISTINCT FROM r.row_key
       OR r.result ->> 'stage' IS DISTINCT FROM r.stage)
ORDER BY r.id LIMIT 20
"""
DUPLICATE_RUNS = """
SELECT stage, row_key, count(*) FROM pgstagechain.runs
WHERE pipeline = 'chaos' AND state = 'succeeded'
GROUP BY 1, 2 HAVING count(*) > 1 LIMIT 20
"""
DUPLICATE_EXECUTIONS = """
SELECT stage, row_key, count(*) FROM chaos_executions GROUP BY 1, 2 HAVING count(*) > 1 LIMIT 20
"""
# an execution recorded on ctx.conn committed with its completion: its run succeeded,
# and is a run of the same stage of the same row
STRAY_EXECUTIONS = """
SELECT e.run_id, e.stage, e.row_key, r.stage, r.row_key, r.state FROM chaos_executions e
LEFT JOIN pgstagechain.runs r ON r.id = e.run_id
WHERE r.state IS DISTINCT FROM 'succeeded' OR r.stage IS DISTINCT FROM e.stage
   OR r.row_key IS DISTINCT FROM e.row_key
LIMIT 20
"""
# at (stage, running), a row or group has a live run: running, or failed with a retry due
ORPHANS = """
SELECT 'row', v.job_variants_id::text, v.current_step FROM jobs_variants v
WHERE v.status = 'running' AND v.current_step <> 'img_gen' AND NOT EXISTS (
    SELECT 1 FROM pgstagechain.runs r
    WHERE r.pipeline = 'chaos' AND r.row_key = v.job_variants_id::text
      AND r.stage = v.current_step AND (r.state = 'running' OR r.retry_at IS NOT NULL))
UNION ALL
SELECT 'group', g.group_key, g.step FROM pgstagechain.groups g
WHERE g.pipeline = 'chaos' AND g.status = 'running' AND NOT EXISTS (
    SELECT 1 FROM pgstagechain.runs r
    WHERE r.pipeline = 'chaos' AND r.row_key = g.group_key AND r.stage = g.step
      AND (r.state = 'running' OR r.retry_at IS NOT NULL))
LIMIT 20
"""
UNEXPLAINED_FAILURES = """
SELECT v.job_variants_id::text FROM jobs_variants v
WHERE v.status = 'failed' AND NOT EXISTS (
    SELECT 1 FROM pgstagechain.runs r
    WHERE r.row_key = v.job_variants_id::text AND r.stage = v.current_step
      AND r.state IN ('failed', 'expired') AND r.error IS NOT NULL AND r.retry_at IS NULL)
UNION ALL
SELECT g.group_key FROM pgstagechain.groups g
WHERE g.status = 'failed' AND NOT EXISTS (
    SELECT 1 FROM pgstagechain.runs r
    WHERE r.row_key = g.group_key AND r.stage = g.step
      AND r.state IN ('failed', 'expired') AND r.error IS NOT NULL AND r.retry_at IS NULL)
"""
LOST_JOBS = """
SELECT j.job_id FROM jobs j
WHERE NOT EXISTS (SELECT 1 FROM pgstagechain.groups g
                  WHERE g.pipeline = 'chaos' AND g.group_key = j.job_id::text
                    AND (g.status = 'failed'
                         OR (g.step = 'instagram_feed_gen' AND g.status = 'done')))
  AND NOT EXISTS (SELECT 1 FROM jobs_variants v
                  WHERE v.job_id = j.job_id AND v.status = 'failed')
ORDER BY 1 LIMIT 20
"""
FAILURE_REASONS = """
SELECT v.job_variants_id, v.current_step, r.attempt, right(rtrim(r.error, E'\n '), 160)
FROM jobs_variants v
JOIN LATERAL (SELECT attempt, error FROM pgstagechain.runs
              WHERE row_key = v.job_variants_id::text AND stage = v.current_step
              ORDER BY id DESC LIMIT 1) r ON true
WHERE v.status = 'failed'
"""


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
    ended = False
    try:
        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(supervise, chaos)
                tg.start_soon(kill_workers, chaos, random.Random(rng.random()))
                tg.start_soon(cut_backends, chaos, random.Random(rng.random()))
                tg.start_soon(flood, chaos, random.Random(rng.random()))
                ended = await conduct(chaos, pgstagechain_server.cluster, rng)
        survivors = [slot for slot, proc in chaos.procs.items() if proc.poll() is None]
    except TimeoutError:
        state = await progress(dsn)
        tails = await anyio.to_thread.run_sync(worker_logs, tmp_path)
        raise AssertionError(f"chaos run did not finish in {DEADLINE}s: {state}\n{tails}") from None
    finally:
        await anyio.to_thread.run_sync(chaos.stop_all)
    elapsed = time.monotonic() - started

    state = await progress(dsn)
    misplaced = await query(dsn, MISPLACED_RESULTS)
    duplicate_runs = await query(dsn, DUPLICATE_RUNS)
    duplicate_executions = await query(dsn, DUPLICATE_EXECUTIONS)
    stray_executions = await query(dsn, STRAY_EXECUTIONS)
    orphans = await query(dsn, ORPHANS)
    unexplained_failures = await query(dsn, UNEXPLAINED_FAILURES)
    lost = await query(dsn, LOST_JOBS)
    [(executions, recorded_successes, runs_total, injected, expired)] = await query(
        dsn,
        "SELECT (SELECT count(*) FROM chaos_executions),"
        " (SELECT count(*) FROM pgstagechain.runs WHERE state = 'succeeded'"
        "  AND stage = ANY(%s)),"
        " (SELECT count(*) FROM pgstagechain.runs),"
        " (SELECT count(*) FROM pgstagechain.runs WHERE error LIKE '%%injected failure%%'),"
        " (SELECT count(*) FROM pgstagechain.runs WHERE state = 'expired')",
        (RECORDING_STAGES,),
    )
    lost_claims, reused_ids = await crash_figures(chaos)
    for key, step, attempt, reason in await query(dsn, FAILURE_REASONS):
        print(f"  failed: variant {key} at {step} after attempt {attempt}: {reason[:160]}")
    print(
        f"\nchaos (seed {seed}): {JOBS * VARIANTS} chains ({JOBS} jobs x {VARIANTS} variants)"
        f" through {WORKERS} worker processes in {elapsed:.1f}s\n"
        f"  finished {state['finished']} jobs, failed {state['failed']} (with a recorded reason),"
        f" lost {len(lost)}\n"
        f"  runs {runs_total}: succeeded {state['succeeded']}, injected failures {injected},"
        f" expired leases {expired}\n"
        f"  worker kills {chaos.kills}, exits on their own {len(chaos.exits)},"
        f" server restarts {dict(chaos.restarts)},"
        f" backends terminated {sum(chaos.terminations.values())}"
        f" {dict(chaos.terminations)}, hostile payloads {chaos.payloads}\n"
        f"  recovery after each restart: {', '.join(chaos.recoveries)};"
        f" claims lost in the first crash {lost_claims} of {len(chaos.before_crash)},"
        f" their run ids reused {reused_ids}\n"
        f"  misplaced results {len(misplaced)}, duplicate successful runs {len(duplicate_runs)},"
        f" duplicate executions {len(duplicate_executions)},"
        f" stray executions {len(stray_executions)}, orphaned rows and groups {len(orphans)}"
    )
    if not ended:
        print(await anyio.to_thread.run_sync(worker_logs, tmp_path))
    assert chaos.restarts == Counter(RESTART_MODES)
    assert chaos.kills >= 1 and chaos.terminations["pgstagechain-listener"] >= 1
    assert chaos.exits == [] and sorted(survivors) == list(range(WORKERS))
    assert misplaced == [], "results stored on another row's or stage's run"
    assert duplicate_runs == []
    assert duplicate_executions == []
    assert stray_executions == []
    assert orphans == [], "rows or groups at (stage, running) without a live run"
    assert unexplained_failures == []
    assert lost == []
    assert ended, f"the work stalled for {STALL}s before it was done: {state}"
    assert state["finished"] + state["failed"] == JOBS
    assert executions == recorded_successes
    assert state["running"] == 0 and state["retrying"] == 0
    stuck_rows = await query(
        dsn,
        "SELECT count(*) FROM jobs_variants"
        " WHERE status = 'running' OR (status = 'done' AND current_step <> 'iou_eval')",
    )
    assert stuck_rows == [(0,)]
