"""The reliability layer against a real server: retries, timeouts, leases, rescue,
listener health, hostile notifications, server restarts, shutdown and poll-only mode.

Waits poll the database with a generous deadline; nothing asserts how fast anything is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from pgstagechain import (
    LeaseLostError,
    PermanentError,
    Pipeline,
    RecoveryScanner,
    Retry,
    StageContext,
    Worker,
    claim,
    complete,
    migrate,
)
from tests.apps.seed import add_jobs, create_tables, seed_pipeline
from tests.helpers import holds, listen_to_all, query, serving, value, wait_until

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
Handler = Callable[[StageContext[Any]], Awaitable[Any]]


# -- helpers --------------------------------------------------------------------------------


def two_stages(
    first: Handler,
    second: Handler | None = None,
    *,
    name: str = "rel",
    retry: Retry | None = None,
    timeout: float | None = None,
) -> Pipeline:
    """vlm_analyze -> yolo_detect over the seed's variants table."""
    pipeline = Pipeline(
        name, table="jobs_variants", key="job_variants_id", group_column="job_id", start="img_gen"
    )
    pipeline.stage(after="img_gen", name="vlm_analyze", retry=retry, timeout=timeout)(first)

    async def passthrough(ctx: StageContext[Any]) -> None:
        return None

    pipeline.stage(after="vlm_analyze", name="yolo_detect")(second or passthrough)
    return pipeline


async def runs_of(dsn: str, key: str, stage: str) -> list[tuple[Any, ...]]:
    """(attempt, state, error, retry_at, started_at, finished_at) of each run, in order."""
    return await query(
        dsn,
        "SELECT attempt, state, error, retry_at, started_at, finished_at FROM pgstagechain.runs"
        " WHERE row_key = %s AND stage = %s ORDER BY id",
        (key, stage),
    )


async def variant(dsn: str, key: int) -> tuple[str, str]:
    rows = await query(
        dsn, "SELECT current_step, status FROM jobs_variants WHERE job_variants_id = %s", (key,)
    )
    return rows[0][0], rows[0][1]


async def release(dsn: str, where: str = "TRUE") -> None:
    """Set variants at (img_gen, running) to (img_gen, done): the chain starts."""
    await query(
        dsn,
        "UPDATE jobs_variants SET status = 'done'"
        f" WHERE current_step = 'img_gen' AND status = 'running' AND {where}",
    )


# -- retries, permanent errors, timeouts --------------------------------------------------


async def test_failing_handler_is_retried_with_backoff_then_fails(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    calls: list[int] = []

    async def always_fails(ctx: StageContext[Any]) -> None:
        calls.append(ctx.attempt)
        raise RuntimeError(f"model server said no (attempt {ctx.attempt})")

    retry = Retry(max_attempts=3, base_delay=0.2, max_delay=1.0)
    pipeline = two_stages(always_fails, retry=retry)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=1)

    stats = await Worker(pipeline, pgstagechain_dsn, scan_interval=0.2).run_until_idle()

    assert calls == [1, 2, 3]
    assert (stats.retried, stats.failed, stats.succeeded) == (2, 1, 0)
    assert await variant(pgstagechain_dsn, 101) == ("vlm_analyze", "failed")
    runs = await runs_of(pgstagechain_dsn, "101", "vlm_analyze")
    assert [(a, s) for a, s, *_ in runs] == [(1, "failed"), (2, "failed"), (3, "failed")]
    for attempt, _state, error, retry_at, _started, _finished in runs:
        assert f"model server said no (attempt {attempt})" in error
        assert "RuntimeError" in error  # the traceback is kept
        assert retry_at is None  # nothing pending any more
    # Each retry waited at least the lower bound of its jittered backoff.
    for n in (1, 2):
        waited = (runs[n][4] - runs[n - 1][5]).total_seconds()
        assert waited >= 0.5 * min(retry.max_delay, retry.base_delay * 2 ** (n - 1))


async def test_permanent_error_skips_retries(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    calls: list[int] = []

    async def refuses(ctx: StageContext[Any]) -> None:
        calls.append(ctx.attempt)
        raise PermanentError("image is not an image")

    pipeline = two_stages(refuses, retry=Retry(max_attempts=5, base_delay=0.01))
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=1)

    stats = await Worker(pipeline, pgstagechain_dsn, scan_interval=0.2).run_until_idle()

    assert calls == [1]
    assert (stats.retried, stats.failed) == (0, 1)
    assert await variant(pgstagechain_dsn, 101) == ("vlm_analyze", "failed")
    [(attempt, state, error, retry_at, *_)] = await runs_of(pgstagechain_dsn, "101", "vlm_analyze")
    assert (attempt, state, retry_at) == (1, "failed", None)
    assert "PermanentError: image is not an image" in error


async def test_stage_timeout_cancels_the_handler_and_counts_as_an_attempt(
    pgstagechain_dsn: str,
) -> None:
    create_tables(pgstagechain_dsn)
    cancelled: list[int] = []

    async def hangs_once(ctx: StageContext[Any]) -> dict[str, int]:
        if ctx.attempt == 1:
            try:
                await anyio.sleep(3600)
            except anyio.get_cancelled_exc_class():
                cancelled.append(ctx.attempt)
                raise
        return {"attempt": ctx.attempt}

    pipeline = two_stages(hangs_once, retry=Retry(max_attempts=2, base_delay=0.01), timeout=0.5)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=1)

    stats = await Worker(pipeline, pgstagechain_dsn, scan_interval=0.2).run_until_idle()

    assert cancelled == [1]
    assert (stats.timed_out, stats.retried, stats.failed) == (1, 1, 0)
    runs = await runs_of(pgstagechain_dsn, "101", "vlm_analyze")
    assert [(a, s) for a, s, *_ in runs] == [(1, "failed"), (2, "succeeded")]
    assert "TimeoutError" in runs[0][2] and "0.5s" in runs[0][2]
    assert await variant(pgstagechain_dsn, 101) == ("yolo_detect", "done")


# -- leases and rescue --------------------------------------------------------------------


def start_worker_process(dsn: str, app: str, *extra: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pgstagechain", "--dsn", dsn, "worker", app, *extra],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])},
        )


async def test_sigkilled_worker_is_rescued_after_its_lease(
    pgstagechain_dsn: str, tmp_path: Path
) -> None:
    from tests.apps.chaos_app import sleepy

    create_tables(pgstagechain_dsn)
    await migrate(pgstagechain_dsn, sleepy)
    add_jobs(pgstagechain_dsn, jobs=1, variants=1)
    proc = start_worker_process(
        pgstagechain_dsn,
        "tests.apps.chaos_app:sleepy",
        "--lease",
        "1",
        "--worker-id",
        "doomed",
        log=tmp_path / "worker.log",
    )
    try:

        async def handler_running() -> bool:
            assert proc.poll() is None, (tmp_path / "worker.log").read_text()
            return bool(
                await value(
                    pgstagechain_dsn,
                    "SELECT count(*) FROM pgstagechain.runs"
                    " WHERE worker_id = 'doomed' AND state = 'running'",
                )
            )

        await wait_until(handler_running, "the subprocess to claim the row")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # The dead worker's claim is still there, and nobody renews it.
    assert await variant(pgstagechain_dsn, 101) == ("vlm_analyze", "running")

    async def lease_ran_out() -> bool:
        return bool(
            await value(
                pgstagechain_dsn,
                "SELECT bool_and(lease_until < clock_timestamp()) FROM pgstagechain.runs"
                " WHERE state = 'running'",
            )
        )

    await wait_until(lease_ran_out, "the dead worker's lease to run out")
    rescuer = Worker(sleepy, pgstagechain_dsn, scan_interval=0.2, worker_id="rescuer")
    stats = await rescuer.run_until_idle()

    assert stats.rescued == 1
    assert await variant(pgstagechain_dsn, 101) == ("yolo_detect", "done")
    runs = await query(
        pgstagechain_dsn,
        "SELECT attempt, state, worker_id, error FROM pgstagechain.runs"
        " WHERE stage = 'vlm_analyze' ORDER BY id",
    )
    assert [r[:3] for r in runs] == [(1, "expired", "doomed"), (2, "succeeded", "rescuer")]
    assert "lease expired" in runs[0][3]


async def test_completion_after_rescue_raises_lease_lost_and_rolls_back(
    pgstagechain_dsn: str,
) -> None:
    create_tables(pgstagechain_dsn)
    await query(pgstagechain_dsn, "CREATE TABLE side_effects (run_id bigint, attempt int)")
    scanner_reports: list[int] = []

    async def slow_then_rescued(ctx: StageContext[Any]) -> None:
        await ctx.conn.execute(
            "INSERT INTO side_effects VALUES (%s, %s)", (ctx.run_id, ctx.attempt)
        )
        if ctx.attempt == 1:
            # The worker "froze" past its lease and another process rescued the row.
            await query(
                pgstagechain_dsn,
                "UPDATE pgstagechain.runs SET lease_until = now() - interval '1 second'"
                " WHERE id = %s",
                (ctx.run_id,),
            )
            report = await RecoveryScanner(pipeline, pgstagechain_dsn).scan()
            scanner_reports.append(report.expired_leases)

    pipeline = two_stages(slow_then_rescued, retry=Retry(max_attempts=3, base_delay=0.01))
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=1)

    stats = await Worker(pipeline, pgstagechain_dsn, lease=30, scan_interval=0.2).run_until_idle()

    assert scanner_reports == [1]
    assert stats.lease_lost == 1
    runs = await runs_of(pgstagechain_dsn, "101", "vlm_analyze")
    assert [(a, s) for a, s, *_ in runs] == [(1, "expired"), (2, "succeeded")]
    # The first attempt's write was rolled back with its rejected completion.
    assert await query(pgstagechain_dsn, "SELECT attempt FROM side_effects") == [(2,)]
    assert await variant(pgstagechain_dsn, 101) == ("yolo_detect", "done")


async def test_manual_completion_after_rescue_raises_lease_lost(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    await query(pgstagechain_dsn, "CREATE TABLE side_effects (note text)")

    async def unused(ctx: StageContext[Any]) -> None:
        return None

    pipeline = two_stages(unused, retry=Retry(max_attempts=2))
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=1)

    async with await psycopg.AsyncConnection.connect(pgstagechain_dsn, autocommit=True) as conn:
        claimed = await claim(conn, pipeline, "vlm_analyze", 101, lease=0.05)
        assert claimed is not None
        assert await claim(conn, pipeline, "vlm_analyze", 101) is None  # already ours
        await anyio.sleep(0.2)  # the lease runs out
        report = await RecoveryScanner(pipeline, pgstagechain_dsn).scan()
        assert report.expired_leases == 1
        with pytest.raises(LeaseLostError):
            async with conn.transaction():
                await conn.execute("INSERT INTO side_effects VALUES ('written by the loser')")
                await complete(conn, pipeline, claimed, {"late": True})
    assert await value(pgstagechain_dsn, "SELECT count(*) FROM side_effects") == 0
    # The row still waits for its retry at (vlm_analyze, running), untouched by the loser.
    assert await variant(pgstagechain_dsn, 101) == ("vlm_analyze", "running")
    runs = await runs_of(pgstagechain_dsn, "101", "vlm_analyze")
    assert [(a, s, r is not None) for a, s, _, r, *_ in runs] == [(1, "expired", True)]


# -- the listener and the channel ---------------------------------------------------------


async def test_listener_reconnects_and_catches_up_on_missed_rows(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    pipeline = seed_pipeline(lambda ctx: {"ok": True})
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=2, variants=2, release=False)
    dbname = psycopg.conninfo.conninfo_to_dict(pgstagechain_dsn)["dbname"]
    # No periodic scan: only the scan after a re-LISTEN can find the missed rows.
    worker = Worker(pipeline, pgstagechain_dsn, scan_interval=3600)
    async with serving(worker):
        assert worker.listener is not None
        first_pid = worker.listener.backend_pid
        # Operators (and the chaos test) find listeners by their application_name.
        assert await query(
            pgstagechain_dsn,
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgstagechain-listener'"
            " AND datname = current_database()",
        ) == [(first_pid,)]
        admin = psycopg.conninfo.make_conninfo(pgstagechain_dsn, dbname="postgres")
        async with (
            await psycopg.AsyncConnection.connect(admin, autocommit=True) as c,
            await psycopg.AsyncConnection.connect(pgstagechain_dsn, autocommit=True) as inside,
        ):
            # Keep the listener out while the rows land on done: their NOTIFYs reach nobody.
            await c.execute(
                psycopg.sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(
                    psycopg.sql.Identifier(dbname)
                )
            )
            try:
                await c.execute("SELECT pg_terminate_backend(%s)", (first_pid,))
                listener = worker.listener
                await wait_until(
                    holds(lambda: listener.backend_pid is None),
                    "the listener to notice it was cut off",
                )
                await inside.execute(
                    "UPDATE jobs_variants SET status = 'done' WHERE current_step = 'img_gen'"
                )
                await wait_until(
                    holds(lambda: listener.stats.reconnects >= 2), "a refused reconnection"
                )
                assert worker.stats.claimed == 0
            finally:
                await c.execute(
                    psycopg.sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(
                        psycopg.sql.Identifier(dbname)
                    )
                )

        async def chain_finished() -> bool:
            return bool(
                await value(
                    pgstagechain_dsn,
                    "SELECT count(*) = 2 FROM pgstagechain.groups"
                    " WHERE step = 'instagram_feed_gen' AND status = 'done'",
                )
            )

        await wait_until(chain_finished, "the chains to finish after the reconnect")
        assert worker.listener.backend_pid not in (None, first_pid)
        assert worker.listener.stats.connects >= 2
    assert worker.stats.failed == 0


async def test_malformed_and_forged_notifications_never_run_a_stage(
    pgstagechain_dsn: str,
) -> None:
    create_tables(pgstagechain_dsn)
    ran: list[tuple[str, str]] = []

    async def handler(ctx: StageContext[Any]) -> None:
        ran.append((ctx.stage, ctx.claim.row_key))

    pipeline = seed_pipeline(handler)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=2, release=False)
    malformed = [
        *(f"not json {i}" for i in range(200)),
        *(json.dumps(["r", "img_gen", str(i)]) for i in range(100)),  # three items
        *(json.dumps(["x", "img_gen", str(i), None]) for i in range(100)),  # unknown kind
        *(json.dumps(["r", i, "101", None]) for i in range(100)),  # step not a name
        *(json.dumps(["r", "img_gen", i, None]) for i in range(100)),  # key not a string
        *(json.dumps(["r", "img_gen", "k" * 2000 + str(i), None]) for i in range(50)),
        *(json.dumps({"job_variants_id": str(i), "status": "done"}) for i in range(100)),
    ]
    forged = [
        *(json.dumps(["r", "img_gen", str(90_000 + i), "1"]) for i in range(200)),  # no such row
        json.dumps(["r", "img_gen", "101", "1"]),  # real rows, but not at (img_gen, done)
        json.dumps(["r", "overlay", "102", "1"]),
        json.dumps(["g", "iou_eval", "1", "1"]),  # a group that never formed
        json.dumps(["r", "instagram_feed_gen", "101", "1"]),  # the last step: nothing follows
    ]
    # Well-formed, but the key is not a bigint: the claim's cast fails in the database.
    uncastable = [
        json.dumps(["r", "img_gen", "'; DROP TABLE jobs; --", None]),
        json.dumps(["r", "vlm_analyze", "1e999", "1"]),
    ]
    worker = Worker(pipeline, pgstagechain_dsn, scan_interval=3600)
    async with serving(worker):
        # its start-up scans done (while one is due, ready rows go before announced keys)
        await wait_until(holds(lambda: worker.idle), "the start-up scans")
        async with await psycopg.AsyncConnection.connect(pgstagechain_dsn, autocommit=True) as c:
            await c.execute(
                "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) p", (pipeline.channel, uncastable)
            )
            await wait_until(holds(lambda: worker.stats.notifications == 2), "the first two")
            # tried (and refused) before the flood, which is claimed as ready rows instead
            await wait_until(holds(lambda: worker.stats.malformed == 2), "the first two tried")
            for chunk in range(0, len(malformed) + len(forged), 100):
                await c.execute(
                    "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) p",
                    (pipeline.channel, (malformed + forged)[chunk : chunk + 100]),
                )

        total = len(uncastable) + len(malformed) + len(forged)
        await wait_until(
            holds(lambda: worker.stats.notifications >= total), "every notification to arrive"
        )
        await wait_until(holds(lambda: worker.idle), "the forged hints to be tried")
        assert worker.stats.malformed == len(malformed) + len(uncastable)
        assert worker.stats.claimed == 0
        assert ran == []
        assert await value(pgstagechain_dsn, "SELECT count(*) FROM pgstagechain.runs") == 0
        assert await query(
            pgstagechain_dsn, "SELECT DISTINCT current_step, status FROM jobs_variants"
        ) == [("img_gen", "running")]

        # The flood did not hurt the worker: a real chain still runs.
        await release(pgstagechain_dsn)

        async def finished() -> bool:
            return bool(
                await value(
                    pgstagechain_dsn,
                    "SELECT count(*) FROM pgstagechain.groups WHERE step = 'instagram_feed_gen'"
                    " AND status = 'done'",
                )
            )

        await wait_until(finished, "the real chain to finish")
    assert len(ran) == 2 * 8 + 2


async def test_chain_survives_a_server_restart(
    pgstagechain_dsn: str, pgstagechain_server: Any
) -> None:
    if pgstagechain_server.cluster is None:
        pytest.skip("the server comes from PGSTAGECHAIN_TEST_DSN and cannot be restarted here")
    create_tables(pgstagechain_dsn)
    await query(pgstagechain_dsn, "CREATE TABLE side_effects (stage text, row_key text)")

    async def handler(ctx: StageContext[Any]) -> None:
        await anyio.sleep(0.05)
        await ctx.conn.execute(
            "INSERT INTO side_effects VALUES (%s, %s)", (ctx.stage, ctx.claim.row_key)
        )

    retry = Retry(max_attempts=5, base_delay=0.1, max_delay=1.0)
    pipeline = seed_pipeline(handler, retry=retry)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=4, variants=3)
    worker = Worker(pipeline, pgstagechain_dsn, lease=2, scan_interval=0.5, concurrency=6)
    async with serving(worker):

        async def some_progress() -> bool:
            return bool(
                await value(
                    pgstagechain_dsn,
                    "SELECT count(*) >= 12 FROM pgstagechain.runs WHERE state = 'succeeded'",
                )
            )

        await wait_until(some_progress, "the chain to get going")
        await anyio.to_thread.run_sync(pgstagechain_server.cluster.restart)

        async def finished() -> bool:
            try:
                return bool(
                    await value(
                        pgstagechain_dsn,
                        "SELECT count(*) = 4 FROM pgstagechain.groups"
                        " WHERE step = 'instagram_feed_gen' AND status = 'done'",
                    )
                )
            except psycopg.OperationalError:
                return False

        await wait_until(finished, "every chain to finish after the restart", within=120)
    assert worker.stats.db_errors > 0  # the restart was felt
    assert worker.listener is not None and worker.listener.stats.connects >= 2
    assert await value(pgstagechain_dsn, "SELECT count(*) FROM jobs_variants") == 12
    assert (
        await query(
            pgstagechain_dsn,
            "SELECT stage, row_key FROM pgstagechain.runs WHERE state = 'succeeded'"
            " GROUP BY 1, 2 HAVING count(*) > 1",
        )
        == []
    )
    assert (
        await query(
            pgstagechain_dsn,
            "SELECT stage, row_key FROM side_effects GROUP BY 1, 2 HAVING count(*) > 1",
        )
        == []
    )
    assert await value(pgstagechain_dsn, "SELECT count(*) FROM side_effects") == 12 * 8 + 4 * 2
    assert (
        await value(
            pgstagechain_dsn, "SELECT count(*) FROM pgstagechain.runs WHERE state = 'running'"
        )
        == 0
    )


# The pool's own background reconnection attempts made while the server shuts down can
# leave half-made connections to the garbage collector (a ResourceWarning inside psycopg_pool).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_idle_pooled_connections_do_not_cost_attempts_after_a_restart(
    pgstagechain_dsn: str, pgstagechain_server: Any
) -> None:
    if pgstagechain_server.cluster is None:
        pytest.skip("the server comes from PGSTAGECHAIN_TEST_DSN and cannot be restarted here")
    create_tables(pgstagechain_dsn)

    async def reads(ctx: StageContext[Any]) -> None:
        await ctx.conn.execute("SELECT 1")

    pipeline = two_stages(reads, reads)  # default Retry: a single attempt, no second chance
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=4, release=False)
    worker = Worker(pipeline, pgstagechain_dsn, scan_interval=0.2, concurrency=4)
    async with serving(worker):
        await release(pgstagechain_dsn, "job_variants_id IN (101, 102)")

        async def settled(count: int) -> bool:
            try:
                return count == await value(
                    pgstagechain_dsn,
                    "SELECT count(*) FROM jobs_variants WHERE (current_step, status)"
                    " IN (('yolo_detect', 'done'), ('vlm_analyze', 'failed'),"
                    " ('yolo_detect', 'failed'))",
                )
            except psycopg.OperationalError:
                return False

        await wait_until(lambda: settled(2), "the first rows to finish")
        # The pool now holds idle connections that the restart is about to kill.
        await anyio.to_thread.run_sync(pgstagechain_server.cluster.restart)
        await release(pgstagechain_dsn, "job_variants_id IN (103, 104)")
        await wait_until(lambda: settled(4), "the rows released after the restart to settle")
    assert await query(
        pgstagechain_dsn, "SELECT DISTINCT current_step, status FROM jobs_variants"
    ) == [("yolo_detect", "done")]
    assert worker.stats.failed == 0


# -- shutdown ----------------------------------------------------------------------------


async def test_graceful_stop_lets_in_flight_handlers_finish(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    started = anyio.Event()
    finished: list[int] = []

    async def takes_a_moment(ctx: StageContext[Any]) -> None:
        started.set()
        await anyio.sleep(0.5)
        finished.append(ctx.key)

    pipeline = two_stages(takes_a_moment)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=3)
    worker = Worker(pipeline, pgstagechain_dsn, shutdown_timeout=30)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await started.wait()
        worker.stop()
    # run() returned only after the handlers finished and their completions committed.
    assert sorted(finished) == [101, 102, 103]
    assert await query(
        pgstagechain_dsn,
        "SELECT DISTINCT state FROM pgstagechain.runs WHERE stage = 'vlm_analyze'",
    ) == [("succeeded",)]
    assert await query(
        pgstagechain_dsn, "SELECT DISTINCT current_step, status FROM jobs_variants"
    ) == [("vlm_analyze", "done")]


async def test_stop_past_the_deadline_hands_runs_to_another_worker(
    pgstagechain_dsn: str,
) -> None:
    create_tables(pgstagechain_dsn)
    started = anyio.Event()
    seen: list[tuple[int, str]] = []

    async def stuck_first_time(ctx: StageContext[Any]) -> None:
        seen.append((ctx.attempt, ctx.worker_id))
        if ctx.attempt == 1:
            started.set()
            await anyio.sleep(3600)

    pipeline = two_stages(stuck_first_time)  # default Retry: one attempt
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=1)
    first = Worker(pipeline, pgstagechain_dsn, shutdown_timeout=0.3, lease=30, worker_id="first")
    async with anyio.create_task_group() as tg:
        tg.start_soon(first.run)
        await started.wait()
        first.stop()
    [(attempt, state, error, retry_at, *_)] = await runs_of(pgstagechain_dsn, "101", "vlm_analyze")
    assert (attempt, state) == (1, "expired")
    assert "worker stopped before the run finished" in error
    # Released, not left to its 30 s lease: the retry is due now.
    assert retry_at is not None
    assert await value(pgstagechain_dsn, "SELECT %s <= now()", (retry_at,))

    stats = await Worker(pipeline, pgstagechain_dsn, worker_id="second").run_until_idle()
    assert stats.claimed == 2  # the handed-back run, then the next stage
    assert seen == [(1, "first"), (2, "second")]
    assert await variant(pgstagechain_dsn, 101) == ("yolo_detect", "done")


# -- poll-only mode and the recovery scanner ---------------------------------------------


async def test_poll_only_mode_finishes_a_chain(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    pipeline = seed_pipeline(lambda ctx: None)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=2, variants=2)
    worker = Worker(pipeline, pgstagechain_dsn, listen=False, poll_interval=0.1)
    async with serving(worker):
        assert worker.listener is None
        listeners = await value(
            pgstagechain_dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgstagechain-listener'"
            " AND datname = current_database()",
        )
        assert listeners == 0

        async def finished() -> bool:
            return bool(
                await value(
                    pgstagechain_dsn,
                    "SELECT count(*) = 2 FROM pgstagechain.groups"
                    " WHERE step = 'instagram_feed_gen' AND status = 'done'",
                )
            )

        await wait_until(finished, "the chains to finish by polling alone")
    assert worker.stats.notifications == 0
    assert worker.stats.succeeded == 4 * 8 + 2 * 2


async def test_recovery_scan_renotifies_stuck_work_and_closes_dead_leases(
    pgstagechain_dsn: str,
) -> None:
    create_tables(pgstagechain_dsn)
    pipeline = seed_pipeline(lambda ctx: None, retry=Retry(max_attempts=2))
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=3, variants=2, release=False)
    # Nobody listens while these land on done: their notifications are gone.
    await query(
        pgstagechain_dsn,
        "UPDATE jobs_variants SET status = 'done' WHERE job_id = 1",  # (img_gen, done)
    )
    await query(
        pgstagechain_dsn,
        "UPDATE jobs_variants SET current_step = 'planner', status = 'done' WHERE job_id = 2",
    )
    await query(  # a whole job at the fan-in step: its group forms, and is stuck too
        pgstagechain_dsn,
        "UPDATE jobs_variants SET current_step = 'iou_eval', status = 'done' WHERE job_id = 3",
    )
    async with await psycopg.AsyncConnection.connect(pgstagechain_dsn, autocommit=True) as conn:
        dead = await claim(conn, pipeline, "vlm_analyze", 101, lease=0.05, worker_id="gone")
        assert dead is not None
        await anyio.sleep(0.2)  # the lease runs out

    async with await psycopg.AsyncConnection.connect(pgstagechain_dsn, autocommit=True) as ears:
        await ears.execute(listen_to_all(pipeline))
        report = await RecoveryScanner(pipeline, pgstagechain_dsn).scan()
        heard = []
        async for note in ears.notifies(timeout=2.0):
            heard.append(tuple(json.loads(note.payload)))

    assert report.expired_leases == 1
    assert report.renotified_rows == 3  # 102 at img_gen; 201, 202 at planner
    assert report.renotified_groups == 1
    assert sorted(heard, key=str) == sorted(
        [
            ("r", "img_gen", "102", "1"),
            ("r", "planner", "201", "2"),
            ("r", "planner", "202", "2"),
            ("g", "iou_eval", "3", "3"),
            ("t", "vlm_analyze", "101", None),  # the dead run's retry is due now
        ],
        key=str,
    )
    [(attempt, state, error, retry_at, *_)] = await runs_of(pgstagechain_dsn, "101", "vlm_analyze")
    assert (attempt, state) == (1, "expired")
    assert "worker gone" in error and retry_at is not None
    assert report.next_retry_at == retry_at
    # A second scan finds no dead lease, and re-announces the same (still unclaimed) work.
    again = await RecoveryScanner(pipeline, pgstagechain_dsn).scan()
    assert (again.expired_leases, again.renotified_rows, again.renotified_groups) == (0, 3, 1)

    # The re-driven work then runs to the end through the normal path.
    stats = await Worker(pipeline, pgstagechain_dsn, scan_interval=0.2).run_until_idle()
    assert stats.failed == 0
    assert (
        await value(
            pgstagechain_dsn,
            "SELECT count(*) FROM pgstagechain.groups WHERE step = 'instagram_feed_gen'"
            " AND status = 'done'",
        )
        == 3
    )


async def test_deep_scan_closes_a_dead_run_whose_row_was_moved_by_hand(
    pgstagechain_dsn: str,
) -> None:
    # Live runs are found through their rows at (stage, running); a row an operator moved
    # elsewhere hides its dead run from the regular scan, the deep scan still closes it.
    create_tables(pgstagechain_dsn)
    pipeline = seed_pipeline(lambda ctx: None)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=2)
    async with await psycopg.AsyncConnection.connect(pgstagechain_dsn, autocommit=True) as conn:
        hidden = await claim(conn, pipeline, "vlm_analyze", 101, lease=0.05, worker_id="gone")
        visible = await claim(conn, pipeline, "vlm_analyze", 102, lease=0.05, worker_id="gone")
        assert hidden is not None and visible is not None
    await query(
        pgstagechain_dsn,
        "UPDATE jobs_variants SET current_step = 'planner', status = 'failed'"
        " WHERE job_variants_id = 101",
    )
    await anyio.sleep(0.2)  # both leases run out

    regular = await RecoveryScanner(pipeline, pgstagechain_dsn).scan()
    assert regular.expired_leases == 1
    assert [r[1] for r in await runs_of(pgstagechain_dsn, "102", "vlm_analyze")] == ["expired"]
    assert [r[1] for r in await runs_of(pgstagechain_dsn, "101", "vlm_analyze")] == ["running"]

    deep = await RecoveryScanner(pipeline, pgstagechain_dsn).scan(deep=True)
    assert deep.expired_leases == 1
    [(attempt, state, error, *_)] = await runs_of(pgstagechain_dsn, "101", "vlm_analyze")
    assert (attempt, state) == (1, "expired") and "worker gone" in error
    # The row stays where the operator put it.
    assert await variant(pgstagechain_dsn, 101) == ("planner", "failed")
