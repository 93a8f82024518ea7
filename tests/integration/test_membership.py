"""Several worker processes on one pipeline: each announced key is claimed at once by one
of them only, and a worker that leaves or dies in the middle of a burst strands nothing."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgstagechain import migrate
from pgstagechain._pipeline import PARTITIONS
from tests.apps.seed import GROUP_STAGES, add_jobs, create_tables, seed_pipeline
from tests.helpers import value, wait_until

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
LAST = GROUP_STAGES[-1]


class Workers:
    """Worker processes (tests/apps/member_worker.py), each with its counters file."""

    def __init__(self, dsn: str, directory: Path, *extra: str) -> None:
        self.dsn, self.directory, self.extra = dsn, directory, extra
        self.procs: list[tuple[subprocess.Popen[str], Path]] = []

    def start(self, count: int) -> None:
        started = []
        for _ in range(count):
            out = self.directory / f"worker-{len(self.procs) + len(started)}.json"
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "tests/apps/member_worker.py"),
                    *("--dsn", self.dsn, "--out", str(out)),
                    *self.extra,
                ],
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
                env=dict(os.environ),
            )
            started.append((proc, out))
        for proc, _ in started:
            assert proc.stdout is not None
            assert proc.stdout.readline().startswith("READY"), f"exit {proc.poll()}"
        self.procs += started

    def wait_shared_out(self, within: float = 60.0) -> list[int]:
        """Wait until the workers listen to disjoint shares of the partitions (each to its
        own and the pipeline's channel: as many channels in all as partitions, plus one
        each); return how many each listens to."""
        lines: queue.Queue[tuple[int, str]] = queue.Queue()

        def read(proc: subprocess.Popen[str]) -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put((proc.pid, line))

        for proc, _ in self.procs:
            threading.Thread(target=read, args=(proc,), daemon=True).start()
        latest = {proc.pid: PARTITIONS + 1 for proc, _ in self.procs}
        deadline = time.monotonic() + within
        while sum(latest.values()) != PARTITIONS + len(latest):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"the partitions were never shared out: {latest}"
            try:
                pid, line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line.startswith("CHANNELS "):
                latest[pid] = int(line.split()[1])
        return list(latest.values())

    def stop(self) -> dict[str, int]:
        """SIGTERM every live one; the sum of the counters of those that wrote them."""
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        total: dict[str, int] = {}
        for proc, out in self.procs:
            proc.wait(timeout=60)
            if out.exists():
                for name, count in json.loads(out.read_text()).items():
                    total[name] = total.get(name, 0) + count
        return total


@contextmanager
def workers(dsn: str, directory: Path, *extra: str) -> Iterator[Workers]:
    group = Workers(dsn, directory, *extra)
    try:
        yield group
    finally:
        for proc, _ in group.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


async def members_listed(dsn: str, count: int) -> None:
    """Wait until ``count`` listening workers hold their membership locks."""

    async def listed() -> bool:
        found = await value(
            dsn,
            "SELECT count(DISTINCT pid) FROM pg_locks"
            " WHERE locktype = 'advisory' AND objsubid = 2 AND granted",
        )
        return bool(found == count)

    await wait_until(listed, f"{count} workers to join")


def release_one_job_at_a_time(dsn: str, jobs: list[int]) -> None:
    """One commit (and so one batch of notifications) per job, like an upstream system."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for job in jobs:
            conn.execute("UPDATE jobs_variants SET status = 'done' WHERE job_id = %s", (job,))
            time.sleep(0.002)  # pacing, not a barrier: the jobs arrive one after another


async def all_done(dsn: str, jobs: int) -> None:
    async def done() -> bool:
        count = await value(
            dsn,
            "SELECT count(*) FROM pgstagechain.groups WHERE step = %s AND status = 'done'",
            (LAST,),
        )
        return bool(count == jobs)

    await wait_until(done, "every job to finish", within=120)


async def prepared(dsn: str, jobs: int) -> list[int]:
    create_tables(dsn)

    async def noop(ctx: Any) -> None:
        return None

    await migrate(dsn, seed_pipeline(noop))
    return add_jobs(dsn, jobs=jobs, variants=4, release=False)


async def test_three_workers_claim_each_announced_key_once(
    pgstagechain_dsn: str, tmp_path: Path
) -> None:
    jobs = await prepared(pgstagechain_dsn, 60)
    with workers(pgstagechain_dsn, tmp_path) as group:
        group.start(3)
        await members_listed(pgstagechain_dsn, 3)
        # each listens to its own third of the partitions, and the pipeline's channel
        listening = group.wait_shared_out()
        assert all(20 <= count - 1 <= 22 for count in listening), listening
        release_one_job_at_a_time(pgstagechain_dsn, jobs)
        await all_done(pgstagechain_dsn, len(jobs))
        stats = group.stop()
    # Once, each of the three tried every announced key and two of them lost: about
    # 2 * (4 + 1) * 60 = 600 keys lost, as many claims that got nothing.
    assert stats["races_lost"] <= 30, stats
    assert stats["claimed"] == len(jobs) * (4 * 8 + 2)
    # Each announcement (4 rows released, the group formed, the group done: 6 per job) was
    # heard by the one worker that owns its key's partition, where each of the three used to
    # hear all of them (3 * 6 * 60 = 1 080); beyond them, the workers' joining and leaving
    # notices on the pipeline's channel.
    announced = len(jobs) * 6
    assert announced <= stats["notifications"] <= announced + 20, stats
    assert stats["left_to_peers"] == 0, stats
    # claims that got nothing: each worker's scan of its 10 stages when it starts, when it
    # hears another leave (3 * 10 + 3 * 2 * 10), and when it takes partitions over from one
    # that joined or left (a scan of its 10 stages each time, a few times in all), where
    # there were about 600 before workers knew each other
    assert stats["claims_empty"] <= 180, stats


async def test_a_worker_that_stops_mid_burst_strands_nothing(
    pgstagechain_dsn: str, tmp_path: Path
) -> None:
    jobs = await prepared(pgstagechain_dsn, 60)
    # no probe to fall back on: only the worker's leaving notice can re-drive its keys
    with workers(pgstagechain_dsn, tmp_path, "--sleep", "0.01") as group:
        group.start(3)
        await members_listed(pgstagechain_dsn, 3)
        release_one_job_at_a_time(pgstagechain_dsn, jobs[:30])
        leaving, _ = group.procs[0]
        leaving.send_signal(signal.SIGTERM)
        release_one_job_at_a_time(pgstagechain_dsn, jobs[30:])
        leaving.wait(timeout=60)
        await all_done(pgstagechain_dsn, len(jobs))
        stats = group.stop()
    assert stats["races_lost"] <= 20, stats


async def test_a_worker_killed_mid_burst_strands_nothing(
    pgstagechain_dsn: str, tmp_path: Path
) -> None:
    jobs = await prepared(pgstagechain_dsn, 60)
    extra = ("--sleep", "0.01", "--scan-interval", "1", "--lease", "2")
    with workers(pgstagechain_dsn, tmp_path, *extra) as group:
        group.start(3)
        await members_listed(pgstagechain_dsn, 3)
        release_one_job_at_a_time(pgstagechain_dsn, jobs[:30])
        doomed, _ = group.procs[0]
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
        release_one_job_at_a_time(pgstagechain_dsn, jobs[30:])
        # its keys wait for the survivors' next probe; its runs, for their leases
        await all_done(pgstagechain_dsn, len(jobs))
        stats = group.stop()
    assert stats["races_lost"] <= 40, stats
    rerun = await value(
        pgstagechain_dsn,
        "SELECT count(*) - count(DISTINCT (stage, row_key)) FROM pgstagechain.runs"
        " WHERE state = 'succeeded'",
    )
    assert rerun == 0
