"""Fan-in under failure, late members and re-runs, through two worker processes.

A member fails for good under each policy (the group waits and is shown stalled / proceeds
with the failure in ``ctx.failed_members`` / fails with a recorded reason); members
inserted one by one never form their group early when the group's size is declared; a
member retried after its group formed makes the group form again, and every formation runs
each group stage exactly once.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgstagechain import admin, migrate
from tests.apps import fan_in_app
from tests.apps.fan_in_app import GROUP_STAGES, create_tables
from tests.apps.seed import add_jobs
from tests.helpers import query, value, wait_listening, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
WORKERS = 2
LAST = GROUP_STAGES[-1]


@contextmanager
def workers(dsn: str, name: str) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``WORKERS`` worker processes for ``tests.apps.fan_in_app:<name>``, stopped on exit."""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pgstagechain",
                "--dsn",
                dsn,
                "--log-level",
                "ERROR",
                "worker",
                f"tests.apps.fan_in_app:{name}",
                "--concurrency",
                "8",
                "--worker-id",
                f"w{n}",
                "--scan-interval",
                "1",
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])},
        )
        for n in range(WORKERS)
    ]
    try:
        wait_listening(dsn, WORKERS)
        yield procs
    finally:
        for proc in procs:
            proc.terminate()
        assert [proc.wait(timeout=60) for proc in procs] == [0] * WORKERS


async def setup(dsn: str, name: str, doomed: list[str]) -> None:
    create_tables(dsn)
    await migrate(dsn, getattr(fan_in_app, name))
    await query(dsn, "INSERT INTO doomed SELECT unnest(%s::text[])", (doomed,))


async def group_at(dsn: str, job: int) -> tuple[str, str] | None:
    found = await query(
        dsn, "SELECT step, status FROM pgstagechain.groups WHERE group_key = %s", (str(job),)
    )
    return (found[0][0], found[0][1]) if found else None


async def row_at(dsn: str, key: int) -> tuple[str, str]:
    found = await query(
        dsn, "SELECT current_step, status FROM jobs_variants WHERE job_variants_id = %s", (key,)
    )
    return found[0][0], found[0][1]


async def seen(dsn: str, job: int) -> list[tuple[str, list[str], dict[str, Any]]]:
    """What each run of a group stage of ``job`` was given, in order."""
    found = await query(
        dsn,
        "SELECT stage, members, failed FROM fan_in_seen WHERE job_id = %s ORDER BY id",
        (str(job),),
    )
    return [(stage, members, failed) for stage, members, failed in found]


async def succeeded_group_runs(dsn: str, job: int) -> dict[str, int]:
    found = await query(
        dsn,
        "SELECT stage, count(*) FROM pgstagechain.runs WHERE row_key = %s"
        " AND stage = ANY(%s) AND state = 'succeeded' GROUP BY stage",
        (str(job), GROUP_STAGES),
    )
    return dict(found)


async def finished(dsn: str, jobs: list[int]) -> bool:
    return all([await group_at(dsn, j) == (LAST, "done") for j in jobs])


async def heal_and_retry(dsn: str, pipeline: Any, key: int) -> None:
    await query(dsn, "DELETE FROM doomed")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        assert await admin.retry(conn, pipeline, key=str(key)) == [str(key)]


async def test_all_done_waits_shows_the_group_stalled_and_forms_once_the_member_is_retried(
    pgstagechain_dsn: str,
) -> None:
    dsn = pgstagechain_dsn
    await setup(dsn, "all_done", ["102"])
    with workers(dsn, "all_done"):
        add_jobs(dsn, jobs=3, variants=3)
        await wait_until(lambda: finished(dsn, [2, 3]), "jobs 2 and 3 to finish")
        await wait_until(
            lambda: _eq(row_at(dsn, 102), ("ocr_eval", "failed")), "variant 102 to fail"
        )
        await wait_until(
            lambda: _eq(row_at(dsn, 103), ("ocr_eval", "done")), "variant 103 to finish"
        )
        assert await group_at(dsn, 1) is None  # waits for every member
        attempts = await query(
            dsn,
            "SELECT attempt, state FROM pgstagechain.runs WHERE row_key = '102'"
            " AND stage = 'ocr_eval' ORDER BY id",
        )
        assert attempts == [(1, "failed"), (2, "failed")]  # both of its attempts
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            status = await admin.status(conn, fan_in_app.all_done)
            first = status[GROUP_STAGES[0]]
            assert (first.stalled, first.partial) == (1, 0)
            assert first.to_json()["stalled"] == 1
            (issue,) = await admin.group_issues(conn, fan_in_app.all_done)
            assert (issue.group_key, issue.state, issue.fan_in) == ("1", "stalled", "all_done")
            assert "102" in issue.reason and "OCR could not read variant 102" in issue.reason
            assert issue.failed_members["102"].stage == "ocr_eval"
            found = await admin.history(conn, fan_in_app.all_done, "1", group=True)
            assert found.step is None and found.issue == issue

        await heal_and_retry(dsn, fan_in_app.all_done, 102)
        await wait_until(lambda: finished(dsn, [1]), "job 1 to finish after the retry")
    assert await seen(dsn, 1) == [(s, ["101", "102", "103"], {}) for s in GROUP_STAGES]
    for job in (1, 2, 3):
        assert await succeeded_group_runs(dsn, job) == dict.fromkeys(GROUP_STAGES, 1)


async def test_settled_proceeds_without_the_failed_member_and_forms_again_when_it_is_retried(
    pgstagechain_dsn: str,
) -> None:
    dsn = pgstagechain_dsn
    await setup(dsn, "settled", ["102", "301", "302", "303"])
    with workers(dsn, "settled"):
        add_jobs(dsn, jobs=3, variants=3)
        await wait_until(lambda: finished(dsn, [1, 2]), "jobs 1 and 2 to finish")
        await wait_until(
            lambda: _eq(group_at(dsn, 3), (GROUP_STAGES[0], "failed")), "job 3 to fail"
        )
        first = await seen(dsn, 1)
        assert [(stage, members) for stage, members, _ in first] == [
            (s, ["101", "103"]) for s in GROUP_STAGES
        ]
        for _, _, failed in first:
            assert list(failed) == ["102"] and failed["102"]["stage"] == "ocr_eval"
            assert "OCR could not read variant 102" in failed["102"]["error"]
        assert await seen(dsn, 3) == []
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            status = await admin.status(conn, fan_in_app.settled)
            assert (status[GROUP_STAGES[0]].stalled, status[GROUP_STAGES[0]].partial) == (0, 1)
            failures = {
                f.key: f
                for f in await admin.failures(conn, fan_in_app.settled)
                if f.level == "group"
            }
            assert list(failures) == ["3"]
            assert "every member failed" in (failures["3"].error or "")
            issues = {i.group_key: i for i in await admin.group_issues(conn, fan_in_app.settled)}
            assert (issues["1"].state, issues["3"].state) == ("partial", "failed")

        # the failed member healed and retried: the group forms again, and each of its
        # stages runs once more, now with every member
        await heal_and_retry(dsn, fan_in_app.settled, 102)
        await wait_until(
            lambda: _eq(succeeded_group_runs(dsn, 1), dict.fromkeys(GROUP_STAGES, 2)),
            "job 1's group stages to run again",
        )
        await wait_until(lambda: finished(dsn, [1]), "job 1 to finish again")
    assert (await seen(dsn, 1))[2:] == [(s, ["101", "102", "103"], {}) for s in GROUP_STAGES]
    assert await succeeded_group_runs(dsn, 2) == dict.fromkeys(GROUP_STAGES, 1)


async def test_fail_fast_fails_the_group_with_the_members_reason(pgstagechain_dsn: str) -> None:
    dsn = pgstagechain_dsn
    await setup(dsn, "fail_fast", ["102"])
    with workers(dsn, "fail_fast"):
        add_jobs(dsn, jobs=2, variants=3)
        await wait_until(lambda: finished(dsn, [2]), "job 2 to finish")
        await wait_until(
            lambda: _eq(group_at(dsn, 1), (GROUP_STAGES[0], "failed")), "job 1 to fail"
        )
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            (failure,) = [
                f for f in await admin.failures(conn, fan_in_app.fail_fast) if f.level == "group"
            ]
            assert failure.key == "1" and failure.stage == GROUP_STAGES[0]
            assert "member 102 failed at ocr_eval" in (failure.error or "")
            assert "OCR could not read variant 102" in (failure.error or "")
            found = await admin.history(conn, fan_in_app.fail_fast, "1", group=True)
            assert [r.worker_id for r in found.runs] == ["pgstagechain-fan-in"]
        # the other members still finish their own stages; the group stays failed
        for key in (101, 103):
            await wait_until(lambda k=key: _eq(row_at(dsn, k), ("ocr_eval", "done")), f"{key}")
        assert await group_at(dsn, 1) == (GROUP_STAGES[0], "failed")
        assert await seen(dsn, 1) == []

        await heal_and_retry(dsn, fan_in_app.fail_fast, 102)
        await wait_until(lambda: finished(dsn, [1]), "job 1 to finish after the retry")
    assert await seen(dsn, 1) == [(s, ["101", "102", "103"], {}) for s in GROUP_STAGES]
    assert await succeeded_group_runs(dsn, 1) == dict.fromkeys(GROUP_STAGES, 1)


async def test_members_inserted_one_by_one_never_form_their_group_early(
    pgstagechain_dsn: str,
) -> None:
    """Each round inserts the variants of many jobs one at a time in a random order, and at
    random points waits for every variant inserted so far to finish its row stages: the
    first members of a job are then done while the rest do not exist yet."""
    dsn = pgstagechain_dsn
    await setup(dsn, "sized", [])
    sizes: dict[int, int] = {}
    with workers(dsn, "sized"):
        for round_ in range(4):
            rng = random.Random(round_)
            jobs = {round_ * 100 + j: rng.randint(1, 4) for j in range(1, 16)}
            sizes.update(jobs)
            await query(
                dsn,
                "INSERT INTO jobs (job_id, tenant_id) SELECT unnest(%s::bigint[]), 't'",
                (list(jobs),),
            )
            order = [(job, v) for job, size in jobs.items() for v in range(1, size + 1)]
            rng.shuffle(order)
            for job, v in order:
                await query(
                    dsn,
                    "INSERT INTO jobs_variants (job_variants_id, job_id, img_asset_id,"
                    " tenant_id, current_step, status, variant_count)"
                    " VALUES (%s, %s, 'a', 't', 'img_gen', 'done', %s)",
                    (job * 100 + v, job, jobs[job]),
                )
                if rng.random() < 0.3:
                    await wait_until(
                        lambda: _eq(
                            value(
                                dsn,
                                "SELECT count(*) FROM jobs_variants"
                                " WHERE (current_step, status) <> ('ocr_eval', 'done')",
                            ),
                            0,
                        ),
                        "the variants inserted so far to finish their row stages",
                    )
            await wait_until(lambda j=list(jobs): finished(dsn, j), f"round {round_} to finish")
    for job, size in sizes.items():
        expected = sorted(str(job * 100 + v) for v in range(1, size + 1))
        assert await seen(dsn, job) == [(s, expected, {}) for s in GROUP_STAGES], job


async def _eq(awaitable: Any, expected: Any) -> bool:
    return bool(await awaitable == expected)
