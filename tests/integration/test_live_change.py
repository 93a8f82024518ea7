"""Changing the stage graph of a live pipeline: `migrate --plan` says what happens to the rows
in flight and changes nothing; `migrate` refuses what would strand rows, moves mapped ones
in the transaction that installs the new trigger, and loses none."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from pgstagechain import (
    ConfigurationError,
    ExistingRowsError,
    GraphChangeError,
    LeaseLostError,
    NotInstalledError,
    Pipeline,
    Worker,
    claim,
    complete,
    fail,
    migrate,
    plan_migration,
)
from tests.apps.live_change_app import TABLE, after, before, chain, renamed, three, two
from tests.helpers import serving, wait_for, wait_until

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}


def sql(dsn: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def everything(dsn: str) -> tuple[Any, ...]:
    """The table, the ledger, the groups and the installed config, to compare."""
    return (
        sql(dsn, "SELECT * FROM parcels ORDER BY id"),
        sql(dsn, "SELECT * FROM pgstagechain.runs ORDER BY id"),
        sql(dsn, "SELECT * FROM pgstagechain.groups ORDER BY group_key"),
        sql(dsn, "SELECT config FROM pgstagechain.pipelines"),
    )


def cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgstagechain", "--dsn", dsn, "migrate", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def walk(dsn: str, pipeline: Pipeline, key: Any, *stages: str) -> None:
    """Run ``stages`` of row ``key`` by hand, one after the other."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        for name in stages:
            claimed = await claim(conn, pipeline, name, key)
            assert claimed is not None, f"row {key} was not ready for {name}"
            await complete(conn, pipeline, claimed, {"stage": name, "key": key})
            await conn.commit()


async def claim_only(dsn: str, pipeline: Pipeline, key: int, stage: str, **how: Any) -> Any:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        claimed = await claim(conn, pipeline, stage, key, **how)
        await conn.commit()
        assert claimed is not None
        return claimed


async def positions_for_removal(dsn: str) -> Any:
    """Rows of a→b→c at every position at b: done (1), failed (2), a retry pending (3),
    a run still live (4), a run whose worker died (its lease ran out: 5); and one at
    (a, done) (6). Returns the dead run's claim."""
    sql(dsn, TABLE)
    await migrate(dsn, three)
    sql(dsn, "INSERT INTO parcels (id) SELECT generate_series(1, 6)")
    for key in range(1, 6):
        await walk(dsn, three, key, "a")
    await walk(dsn, three, 1, "b")
    await walk(dsn, three, 6, "a")
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        for key, retry_in in ((2, None), (3, 3600.0)):
            claimed = await claim(conn, three, "b", key)
            assert claimed is not None
            await fail(conn, three, claimed, "boom", retry_in=retry_in)
            await conn.commit()
    await claim_only(dsn, three, 4, "b", worker_id="old-worker")
    dead = await claim_only(dsn, three, 5, "b", worker_id="dead-worker", lease=0.2)
    await wait_until(
        lambda: _lease_over(dsn, dead.run_id), "the dead worker's lease to run out", within=30
    )
    return dead


async def _lease_over(dsn: str, run_id: int) -> bool:
    return bool(
        sql(dsn, "SELECT lease_until < now() FROM pgstagechain.runs WHERE id = %s", [run_id])[0][0]
    )


def steps(dsn: str) -> dict[int, tuple[str, str]]:
    return {k: (s, t) for k, s, t in sql(dsn, "SELECT id, step, status FROM parcels ORDER BY id")}


@pytest.mark.anyio
async def test_removing_a_stage_with_rows_at_it_is_refused_without_a_map(
    pgstagechain_dsn: str,
) -> None:
    await positions_for_removal(pgstagechain_dsn)
    was = everything(pgstagechain_dsn)
    with pytest.raises(GraphChangeError) as caught:
        await migrate(pgstagechain_dsn, two)
    refusals = caught.value.plan.refusals()
    assert any(r.startswith("1 rows at (b, done): would be stranded") for r in refusals)
    assert any(r.startswith("1 rows at (b, failed): would be stranded") for r in refusals)
    assert any(r.startswith("3 rows at (b, running): would be stranded") for r in refusals)
    assert any(r.startswith("1 live run(s) of b by worker old-worker") for r in refusals)
    assert everything(pgstagechain_dsn) == was  # nothing changed
    # a map alone does not do while the old worker still runs b
    with pytest.raises(GraphChangeError, match="live run"):
        await migrate(pgstagechain_dsn, two, maps={"b": "a"})
    assert everything(pgstagechain_dsn) == was


@pytest.mark.anyio
async def test_a_map_moves_the_rows_of_a_removed_stage_and_they_go_on(
    pgstagechain_dsn: str,
) -> None:
    dead = await positions_for_removal(pgstagechain_dsn)
    # the old worker stops: it hands its run back (a retry, due now)
    sql(
        pgstagechain_dsn,
        "UPDATE pgstagechain.runs SET state = 'expired', finished_at = now(), retry_at = now()"
        " WHERE worker_id = 'old-worker'",
    )
    await migrate(pgstagechain_dsn, two, maps={"b": "a"})
    assert steps(pgstagechain_dsn) == {
        1: ("a", "done"),  # finished b: goes on to c
        2: ("a", "failed"),  # failed at b: stays failed, at a
        3: ("new", "done"),  # b pending a retry: a runs again, then c
        4: ("new", "done"),  # handed back by the old worker: the same
        5: ("new", "done"),  # its worker died: the same, and its run is closed
        6: ("a", "done"),
    }
    closed = sql(
        pgstagechain_dsn,
        "SELECT row_key, state, retry_at IS NULL, error FROM pgstagechain.runs"
        " WHERE stage = 'b' AND row_key IN ('3', '4', '5') ORDER BY row_key",
    )
    assert [(k, s, r) for k, s, r, _e in closed] == [
        ("3", "failed", True),
        ("4", "expired", True),
        ("5", "cancelled", True),
    ]
    assert all("cancelled by migrate: stage b is no longer in the graph" in e for *_x, e in closed)
    # the dead worker's late completion is refused
    async with await psycopg.AsyncConnection.connect(pgstagechain_dsn) as conn:
        with pytest.raises(LeaseLostError):
            await complete(conn, three, dead, "late")
    await Worker(two, pgstagechain_dsn, scan_interval=0.2).run_until_idle()
    assert steps(pgstagechain_dsn) == {
        **{k: ("c", "done") for k in (1, 3, 4, 5, 6)},
        2: ("a", "failed"),
    }
    ran_a_again = sql(
        pgstagechain_dsn,
        "SELECT row_key, count(*) FROM pgstagechain.runs WHERE stage = 'a' AND state = 'succeeded'"
        " GROUP BY 1 HAVING count(*) > 1 ORDER BY 1",
    )
    assert ran_a_again == [("3", 2), ("4", 2), ("5", 2)]


@pytest.mark.anyio
async def test_reordering_with_rows_between_the_stages_is_refused(pgstagechain_dsn: str) -> None:
    sql(pgstagechain_dsn, TABLE)
    await migrate(pgstagechain_dsn, three)
    sql(pgstagechain_dsn, "INSERT INTO parcels (id) VALUES (1), (2)")
    await walk(pgstagechain_dsn, three, 1, "a", "b")  # waits for c
    await walk(pgstagechain_dsn, three, 2, "a", "b", "c")  # finished
    was = everything(pgstagechain_dsn)
    with pytest.raises(GraphChangeError) as caught:
        await migrate(pgstagechain_dsn, chain("a", "c", "b"))
    (why,) = caught.value.plan.refusals()
    assert why.startswith("1 rows at (b, done): would skip c")
    assert everything(pgstagechain_dsn) == was
    # once that row has finished, the same change asks about the finished rows, which would
    # run b again, and goes through
    await walk(pgstagechain_dsn, three, 1, "c")
    with pytest.raises(ExistingRowsError, match="2 at 'c'"):
        await migrate(pgstagechain_dsn, chain("a", "c", "b"))
    await migrate(pgstagechain_dsn, chain("a", "c", "b"), backfill=False)
    assert steps(pgstagechain_dsn) == {1: ("b", "done"), 2: ("b", "done")}


@pytest.mark.anyio
async def test_plan_changes_nothing_and_says_what_migrate_would_do(pgstagechain_dsn: str) -> None:
    await positions_for_removal(pgstagechain_dsn)
    was = everything(pgstagechain_dsn)
    planned = cli(pgstagechain_dsn, "tests.apps.live_change_app:two", "--plan", "--map", "b=a")
    assert planned.returncode == 0, planned.stderr
    out = planned.stdout
    assert "pipeline parcels: the stage graph changes" in out
    assert "installed: new → a → b → c" in out and "new:       new → a → c" in out
    assert "removed stage b (was after a)" in out
    assert "1 rows at (b, done): move to (a, done), then run c" in out
    assert "1 live run(s) of b by worker old-worker" in out and "refused:" in out
    assert everything(pgstagechain_dsn) == was
    [found] = await plan_migration(pgstagechain_dsn, two, maps={"b": "a"})
    assert found.changed and found.busy == (("b", "old-worker", 1),)
    assert everything(pgstagechain_dsn) == was
    # and migrate itself, refused, shows the same plan and changes nothing either
    refused = cli(pgstagechain_dsn, "tests.apps.live_change_app:two", "--map", "b=a")
    assert refused.returncode == 2
    assert "1 rows at (b, done): move to (a, done), then run c" in refused.stderr
    assert "migrate refused, nothing changed" in refused.stderr
    assert everything(pgstagechain_dsn) == was


@pytest.mark.anyio
async def test_a_rename_with_a_map_keeps_the_results_under_the_new_name(
    pgstagechain_dsn: str,
) -> None:
    sql(pgstagechain_dsn, TABLE)
    await migrate(pgstagechain_dsn, three)
    sql(pgstagechain_dsn, "INSERT INTO parcels (id) VALUES (1), (2), (3)")
    await walk(pgstagechain_dsn, three, 1, "a", "b")  # (b, done)
    await walk(pgstagechain_dsn, three, 2, "a")
    async with await psycopg.AsyncConnection.connect(pgstagechain_dsn) as conn:
        claimed = await claim(conn, three, "b", 2)
        assert claimed is not None
        await fail(conn, three, claimed, "model server down", retry_in=3600)  # (b, running)
        await conn.commit()
    # 3 stays at (new, done)
    refused = cli(pgstagechain_dsn, "tests.apps.live_change_app:renamed")
    assert refused.returncode == 2 and "--map b=STEP" in refused.stderr
    done = cli(pgstagechain_dsn, "tests.apps.live_change_app:renamed", "--map", "b=b2")
    assert done.returncode == 0, done.stderr
    assert "1 rows at (b, done): move to (b2, done), then run c" in done.stderr
    assert steps(pgstagechain_dsn) == {1: ("b2", "done"), 2: ("a", "done"), 3: ("new", "done")}

    seen: dict[int, Any] = {}
    reader = chain("a", "b2")

    @reader.stage(after="b2")
    async def c(ctx: Any) -> None:
        seen[ctx.key] = ctx.results.get("b2")

    await Worker(reader, pgstagechain_dsn, scan_interval=0.2).run_until_idle()
    assert seen == {
        1: {"stage": "b", "key": 1},  # ran as b before the rename: found under its new name
        2: {"stage": "b2", "key": 2},
        3: {"stage": "b2", "key": 3},
    }
    assert sql(pgstagechain_dsn, "SELECT count(*) FROM pgstagechain.runs WHERE stage = 'b'") == [
        (0,)
    ]


@pytest.mark.anyio
async def test_a_pipeline_installed_by_the_previous_version_still_migrates(
    pgstagechain_dsn: str,
) -> None:
    sql(pgstagechain_dsn, TABLE)
    await migrate(pgstagechain_dsn, three)
    # what the previous version recorded: the same graph and digest, no policies
    sql(pgstagechain_dsn, "UPDATE pgstagechain.pipelines SET config = config - 'policies'")
    sql(pgstagechain_dsn, "INSERT INTO parcels (id) VALUES (1)")
    await walk(pgstagechain_dsn, three, 1, "a", "b")
    await Worker(three, pgstagechain_dsn, scan_interval=0.2).run_until_idle()  # still current
    sql(pgstagechain_dsn, "INSERT INTO parcels (id) VALUES (2)")
    await walk(pgstagechain_dsn, three, 2, "a", "b")
    [found] = await plan_migration(pgstagechain_dsn, renamed, maps={"b": "b2"})
    assert "retry policies and time-outs: not recorded by the version that installed it" in (
        found.notes
    )
    await migrate(pgstagechain_dsn, renamed, maps={"b": "b2"})
    await Worker(renamed, pgstagechain_dsn, scan_interval=0.2).run_until_idle()
    assert steps(pgstagechain_dsn) == {1: ("c", "done"), 2: ("c", "done")}
    [config] = sql(pgstagechain_dsn, "SELECT config FROM pgstagechain.pipelines")[0]
    assert set(config["policies"]) == {"a", "b2", "c"}


@pytest.mark.anyio
async def test_a_worker_refuses_to_start_on_another_graph_and_says_how_it_differs(
    pgstagechain_dsn: str,
) -> None:
    sql(pgstagechain_dsn, TABLE)
    await migrate(pgstagechain_dsn, before)
    with pytest.raises(NotInstalledError) as caught:
        await Worker(after, pgstagechain_dsn).run_until_idle()
    assert str(caught.value) == (
        "pipeline 'parcels' changed since it was installed: its stage graph differs (added "
        "stage b (after a); moved stage c: after b (was a)): run `pgstagechain migrate "
        "APP:PIPELINE --plan` to see what that does to the rows in flight, then `migrate`"
    )


@pytest.mark.anyio
async def test_an_old_worker_leaves_new_steps_alone_and_retires_when_its_stages_move(
    pgstagechain_dsn: str,
) -> None:
    sql(pgstagechain_dsn, TABLE)
    await migrate(pgstagechain_dsn, before)
    old = Worker(chain("a", "c"), pgstagechain_dsn, scan_interval=3, worker_id="old")
    ended: list[NotInstalledError] = []

    async def run_old() -> None:
        try:
            await old.run()
        except NotInstalledError as exc:
            ended.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_old)
        await old.wait_started()
        await migrate(pgstagechain_dsn, after)
        # a row at the new step b: announced by the new trigger, not for this worker
        heard = old.stats.notifications
        sql(pgstagechain_dsn, "INSERT INTO parcels (id, step) VALUES (1, 'b')")
        await wait_until(lambda: _holds(old.stats.notifications > heard), "the announcement")
        # and its next scan sees that a and c moved: it stops claiming and ends
        await wait_until(lambda: _holds(bool(ended)), "the old worker to retire")
    assert "stage(s) a, c it serves have another place" in str(ended[0])
    assert old.stats.claimed == 0 and old.stats.malformed == 0
    assert steps(pgstagechain_dsn) == {1: ("b", "done")}
    assert sql(pgstagechain_dsn, "SELECT count(*) FROM pgstagechain.runs") == [(0,)]
    await Worker(after, pgstagechain_dsn, scan_interval=0.2).run_until_idle()
    assert steps(pgstagechain_dsn) == {1: ("c", "done")}


@pytest.mark.anyio
async def test_an_old_worker_whose_stages_keep_their_place_goes_on(pgstagechain_dsn: str) -> None:
    sql(pgstagechain_dsn, TABLE)
    await migrate(pgstagechain_dsn, chain("a", "c", "d"))
    old = Worker(chain("a", "c", "d"), pgstagechain_dsn, stages=["d"], scan_interval=0.1)
    async with serving(old):
        await migrate(pgstagechain_dsn, chain("a", "b", "c", "d"))
        scans = old.stats.scans
        await wait_until(lambda: _holds(old.stats.scans >= scans + 3), "three more scans")
        sql(pgstagechain_dsn, "INSERT INTO parcels (id, step) VALUES (1, 'c')")
        await wait_until(lambda: _holds(steps(pgstagechain_dsn) == {1: ("d", "done")}), "d to run")
    assert old.stats.succeeded == 1


async def _holds(value: bool) -> bool:
    return value


# -- adding a stage in the middle, with worker processes ------------------------------------


def start_worker(dsn: str, spec: str, name: str, *options: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pgstagechain",
            "--dsn",
            dsn,
            "--log-level",
            "WARNING",
            "worker",
            f"tests.apps.live_change_app:{spec}",
            "--worker-id",
            name,
            "--scan-interval",
            "1",
            *options,
        ],
        cwd=ROOT,
        env=ENV,
    )


def stop(workers: list[subprocess.Popen[bytes]]) -> None:
    for w in workers:
        w.terminate()
    assert [w.wait(timeout=90) for w in workers] == [0] * len(workers)


class Feeder(threading.Thread):
    """Inserts rows at (new, done), a few at a time, until stopped."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn, self.inserted, self.done = dsn, 0, threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.done.is_set():
                conn.execute(
                    "INSERT INTO parcels (id) SELECT generate_series(%s::bigint, %s)",
                    [self.inserted + 1, self.inserted + 10],
                )
                self.inserted += 10
                time.sleep(0.05)


@pytest.mark.slow
def test_a_stage_added_in_the_middle_runs_for_the_rows_that_had_not_passed_it(
    pgstagechain_dsn: str,
) -> None:
    dsn = pgstagechain_dsn
    sql(dsn, TABLE)
    anyio.run(migrate, dsn, before)
    feeder = Feeder(dsn)
    # a CPU-light pool for a, a slower one for c: rows wait at (a, done) between them
    old = [
        start_worker(dsn, "before", "old-a", "--stages", "a", "--concurrency", "4"),
        start_worker(dsn, "before", "old-c", "--stages", "c", "--concurrency", "2"),
    ]
    feeder.start()
    try:
        wait_for(
            lambda: sql(dsn, "SELECT count(*) >= 40 FROM parcels WHERE step = 'c'")[0][0],
            "rows to flow through c",
        )
        assert all(w.poll() is None for w in old)
        stop(old)  # the documented procedure: stop the workers of the stages that move
        at_migrate = steps(dsn)
        planned = cli(dsn, "tests.apps.live_change_app:after", "--plan")
        assert planned.returncode == 0, planned.stderr
        assert "added stage b (after a)" in planned.stdout
        assert "will next run the new stage b (was c)" in planned.stdout
        assert steps(dsn).items() >= at_migrate.items()  # the plan moved nothing
        done = cli(dsn, "tests.apps.live_change_app:after")
        assert done.returncode == 0, done.stderr
        new = [start_worker(dsn, "after", f"new-{n}", "--concurrency", "4") for n in range(2)]
        try:
            wait_for(
                lambda: sql(dsn, "SELECT count(*) >= %s FROM parcels", [len(at_migrate) + 60])[0][
                    0
                ],
                "more rows",
            )
            feeder.done.set()
            feeder.join(timeout=30)
            total = feeder.inserted
            wait_for(
                lambda: sql(
                    dsn,
                    "SELECT count(*) = %s FROM parcels WHERE (step, status) = ('c', 'done')",
                    [total],
                )[0][0],
                "every row to finish c",
                within=240,
            )
        finally:
            stop(new)
    finally:
        feeder.done.set()
        for w in old:
            if w.poll() is None:
                w.kill()

    passed = {k for k, (step, _status) in at_migrate.items() if step == "c"}
    before_b = set(range(1, total + 1)) - passed
    # the snapshot had rows on both sides of the new stage, and some waiting at (a, done)
    assert passed and {k for k, p in at_migrate.items() if p == ("a", "done")}
    ran = {
        stage: dict(rows)
        for stage in ("a", "b", "c")
        for rows in [
            sql(
                dsn,
                "SELECT row_key::bigint, count(*) FROM pgstagechain.runs"
                " WHERE stage = %s AND state = 'succeeded' GROUP BY 1",
                [stage],
            )
        ]
    }
    assert set(ran["b"]) == before_b  # every row that had not passed it, and none past it
    assert set(ran["a"]) == set(ran["c"]) == set(range(1, total + 1))
    assert set(ran["b"].values()) == {1}  # once each
    assert sql(dsn, "SELECT count(*) FROM parcels") == [(total,)]  # none lost
    assert sql(dsn, "SELECT count(*) FROM pgstagechain.runs WHERE state = 'running'") == [(0,)]


# -- groups ---------------------------------------------------------------------------------

JOBS = """
CREATE TABLE variants (
    id bigint PRIMARY KEY,
    job text NOT NULL,
    step text NOT NULL DEFAULT 'new',
    status text NOT NULL DEFAULT 'done'
)
"""


def jobs(*group_stages: str) -> Pipeline:
    """Rows run ``a``, then their job runs ``group_stages`` one after the other."""
    made = Pipeline(
        "variants", table="variants", step_column="step", group_column="job", start="new"
    )
    made.stage(after="new", name="a")(lambda ctx: None)
    after = "a"
    for name in group_stages:
        made.stage(after=after, name=name, group=True)(lambda ctx, name=name: {"stage": name})
        after = name
    return made


@pytest.mark.anyio
async def test_groups_at_a_removed_group_stage_are_refused_then_mapped(
    pgstagechain_dsn: str,
) -> None:
    dsn, old, new = pgstagechain_dsn, jobs("g", "h", "k"), jobs("g", "k")
    sql(dsn, JOBS)
    await migrate(dsn, old)
    sql(dsn, "INSERT INTO variants (id, job) VALUES (1, 'j1'), (2, 'j1'), (3, 'j2'), (4, 'j2')")
    for key in range(1, 5):
        await walk(dsn, old, key, "a")  # both jobs form at (a, done)
    await walk(dsn, old, "j1", "g", "h")  # j1 at (h, done): waits for k
    await walk(dsn, old, "j2", "g")
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        claimed = await claim(conn, old, "h", "j2")
        assert claimed is not None
        await fail(conn, old, claimed, "boom", retry_in=3600)  # j2 at (h, running)
        await conn.commit()
    was = everything_of_groups(dsn)
    with pytest.raises(GraphChangeError) as caught:
        await migrate(dsn, new)
    assert [r.split(":")[0] for r in caught.value.plan.refusals()] == [
        "1 groups at (h, done)",
        "1 groups at (h, running)",
    ]
    with pytest.raises(ConfigurationError, match="'a' is not a group step"):
        await migrate(dsn, new, maps={"h": "a"})
    assert everything_of_groups(dsn) == was
    await migrate(dsn, new, maps={"h": "g"})
    assert sql(dsn, "SELECT group_key, step, status FROM pgstagechain.groups ORDER BY 1") == [
        ("j1", "g", "done"),  # finished h: k runs next
        ("j2", "a", "done"),  # was running h: g runs again, then k
    ]
    await Worker(new, dsn, scan_interval=0.2).run_until_idle()
    assert sql(dsn, "SELECT group_key, step, status FROM pgstagechain.groups ORDER BY 1") == [
        ("j1", "k", "done"),
        ("j2", "k", "done"),
    ]
    assert sql(
        dsn,
        "SELECT row_key, stage, count(*) FROM pgstagechain.runs WHERE state = 'succeeded'"
        " AND stage IN ('g', 'k') GROUP BY 1, 2 ORDER BY 1, 2",
    ) == [("j1", "g", 1), ("j1", "k", 1), ("j2", "g", 2), ("j2", "k", 1)]


def everything_of_groups(dsn: str) -> tuple[Any, ...]:
    return (
        sql(dsn, "SELECT * FROM variants ORDER BY id"),
        sql(dsn, "SELECT * FROM pgstagechain.runs ORDER BY id"),
        sql(dsn, "SELECT * FROM pgstagechain.groups ORDER BY group_key"),
        sql(dsn, "SELECT config FROM pgstagechain.pipelines"),
    )
