"""pgstagechain benchmark: throughput, latency, CPU cost, idle traffic and memory of workers.

    python benchmarks/run.py [--dsn DSN] [--chains N] [--workers 1,2] [--modes noconn,conn]

Starts its own PostgreSQL (``pgstagechain.testing.TemporaryCluster``, fsync on) unless
``--dsn`` names a server (a role that may CREATE DATABASE; throwaway databases named
``pgsc_bench_*`` are created and dropped there). Progress goes to stderr; the last line
of stdout is one JSON object with every figure. See docs/benchmarks.md for the method.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: what a burst mode passes to bench_worker.py --connection
MODES = {"noconn": 0, "conn": 1, "write": 2}
sys.path.insert(0, str(ROOT))

from benchmarks import bench_app  # noqa: E402
from pgstagechain import migrate  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- /proc -----------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may contain spaces: fields start after the last ')'
    return text[text.rindex(")") + 2 :].split()


def proc_cpu(pid: int, children: bool = False) -> float:
    """Seconds of CPU (user + system) of ``pid``; with ``children`` also of reaped children."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # fields[0] is 'state' (field 3): utime is field 14 -> index 11
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def proc_ppid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def proc_status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class ServerCpu:
    """CPU seconds of one PostgreSQL server: the postmaster, its children, and reaped children."""

    def __init__(self, admin_dsn: str) -> None:
        self.postmaster: int | None = None
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None
            backend = int(row[0])
            parent = proc_ppid(backend)
            if parent is not None and _comm(parent) in ("postgres", "postmaster"):
                self.postmaster = parent

    @property
    def available(self) -> bool:
        return self.postmaster is not None

    def seconds(self) -> float | None:
        if self.postmaster is None:
            return None
        total = proc_cpu(self.postmaster, children=True)
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                pid = int(entry.name)
                if proc_ppid(pid) == self.postmaster:
                    total += proc_cpu(pid)
        return total


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


# -- statistics ----------------------------------------------------------------------------------


def by_kind(found: Sequence[tuple[str, float]]) -> dict[str, dict[str, float | int | None]]:
    """:func:`percentiles` per kind of hand-over."""
    kinds: dict[str, list[float]] = {}
    for kind, seconds in found:
        kinds.setdefault(kind, []).append(seconds)
    return {kind: percentiles(values) for kind, values in sorted(kinds.items())}


def percentiles(values_s: Sequence[float]) -> dict[str, float | int | None]:
    """p50/p95/p99/max in milliseconds (nearest rank) and the sample count."""
    if not values_s:
        return {"p50": None, "p95": None, "p99": None, "max": None, "n": 0}
    ordered = sorted(values_s)

    def rank(q: float) -> float:
        index = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
        return round(ordered[index] * 1000, 3)

    return {
        "p50": rank(0.50),
        "p95": rank(0.95),
        "p99": rank(0.99),
        "max": round(ordered[-1] * 1000, 3),
        "n": len(ordered),
    }


# -- databases -------------------------------------------------------------------------------------


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        admin_dsn: str,
        bindir: Path | None,
        server_log: Path | None = None,
    ) -> None:
        self.args = args
        self.server_log = server_log
        self.admin_dsn = admin_dsn
        self.bindir = bindir
        self.counter = 0
        self.polls = 0
        self.lock = threading.Lock()
        self.databases: list[str] = []
        self.server_cpu = ServerCpu(admin_dsn)
        self.rows, self.groups = bench_app.stage_names(args.row_stages, args.group_stages)
        self.tmp = Path(tempfile.mkdtemp(prefix="pgsc-bench-"))

    # databases

    def new_database(self, purpose: str) -> str:
        with self.lock:
            self.counter += 1
            name = f"pgsc_bench_{os.getpid()}_{self.counter}_{purpose}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.databases.append(name)
        dsn = make_conninfo(self.admin_dsn, dbname=name)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(bench_app.DDL)
        return dsn

    def drop_databases(self) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            for name in self.databases:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
        self.databases.clear()

    def install(self, dsn: str, connection: bool) -> None:
        pipeline = bench_app.build_pipeline(
            self.args.row_stages, self.args.group_stages, connection=connection
        )
        anyio.run(migrate, dsn, pipeline)

    def add_rows(self, dsn: str, rows: int, first_job: int = 1) -> list[int]:
        """Insert ``rows`` variants, ``group_size`` per job, at (img_gen, running)."""
        size = self.args.group_size
        jobs = max(1, -(-rows // size))
        job_ids = list(range(first_job, first_job + jobs))
        with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
            conn.execute(
                "INSERT INTO bench_jobs SELECT j, 'tenant-' || (j %% 7) FROM unnest(%s::bigint[]) j",
                (job_ids,),
            )
            conn.execute(
                "INSERT INTO bench_variants (job_variants_id, job_id, img_asset_id, tenant_id)"
                " SELECT j * 1000 + v, j, 'asset-' || j || '-' || v, 'tenant-' || (j %% 7)"
                " FROM unnest(%s::bigint[]) j, generate_series(1, %s) v",
                (job_ids, size),
            )
            conn.execute("ANALYZE bench_variants")
        return job_ids

    def finish_target(self, rows: int) -> int:
        """What :meth:`done_count` reads once ``rows`` rows are through: groups, or rows
        when the pipeline has no group stage."""
        return max(1, -(-rows // self.args.group_size)) if self.groups else rows

    def expected_transitions(self, rows: int) -> int:
        jobs = max(1, -(-rows // self.args.group_size))
        return rows * len(self.rows) + jobs * len(self.groups)

    # workers

    def concurrency_for(self, count: int) -> int:
        """Runs in flight per worker process: ``--concurrency`` for one or two processes;
        for more, shared so that the total stays that of two (unless
        ``--fixed-concurrency``)."""
        if self.args.fixed_concurrency or count <= 2:
            return int(self.args.concurrency)
        return max(1, self.args.concurrency * 2 // count)

    def start_workers(
        self, dsn: str, count: int, connection: int, tag: str, *, record: bool = True
    ) -> list[tuple[subprocess.Popen[str], Path]]:
        started = []
        for index in range(count):
            out = self.tmp / f"{tag}-{index}.json"
            command = [
                sys.executable,
                str(HERE / "bench_worker.py"),
                "--dsn",
                dsn,
                "--row-stages",
                str(self.args.row_stages),
                "--group-stages",
                str(self.args.group_stages),
                "--connection",
                str(int(connection)),
                "--concurrency",
                str(self.concurrency_for(count)),
                "--batch-size",
                str(self.args.batch_size),
                "--out",
                str(out),
            ]
            if not record:
                command.append("--no-record")
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
            started.append((proc, out))
        for proc, _ in started:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("READY"):
                self.stop_workers(started)
                raise RuntimeError(f"benchmark worker did not start (exit {proc.poll()})")
        return started

    def stop_workers(
        self, workers: list[tuple[subprocess.Popen[str], Path]]
    ) -> list[dict[str, Any]]:
        for proc, _ in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        reports = []
        for proc, out in workers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if out.exists():
                reports.append(json.loads(out.read_text()))
                out.unlink()
        return reports

    # measuring

    def done_count(self, conn: psycopg.Connection[Any]) -> int:
        self.polls += 1  # the benchmark's own statements, left out of statements_per_transition
        if self.groups:
            row = conn.execute(
                "SELECT count(*) FROM pgstagechain.groups WHERE pipeline = 'bench'"
                " AND step = %s AND status = 'done'",
                (self.groups[-1],),
            ).fetchone()
        else:
            row = conn.execute(
                "SELECT count(*) FROM bench_variants WHERE current_step = %s AND status = 'done'",
                (self.rows[-1],),
            ).fetchone()
        assert row is not None
        return int(row[0])

    def wait_done(self, conn: psycopg.Connection[Any], target: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.done_count(conn) >= target:
                return True
            time.sleep(0.05)
        return False

    def latencies(
        self,
        dsn: str,
        reports: list[dict[str, Any]],
        released: dict[str, tuple[float, float]],
    ) -> tuple[list[tuple[str, float]], str]:
        """Seconds from each (step, done) commit to the start of the next handler, by kind
        of hand-over: ``release`` (the first stage, woken by the benchmark's own update),
        ``row_to_row``, ``fan_in`` (the first group stage) and ``group_to_group``.

        Each hand-over is timed from when its commit was acknowledged: for completions, as
        the committing worker saw it (else the server's ``finished_at``); for releases, as
        the benchmark saw its own UPDATE return (``released`` maps job ids to that and to
        when the UPDATE was sent). On a busy machine the next handler can start before the
        acknowledgement is noticed; the commit lies between the two times, and the earlier
        one is used then, so no hand-over is timed below zero.
        """
        acks: dict[str, float] = {}  # by the run's claim token
        for report in reports:
            acks.update(dict(report["acks"]))
        with psycopg.connect(dsn) as conn:
            runs = conn.execute(
                "SELECT token::text, stage, row_key, group_key,"
                " extract(epoch FROM finished_at)::float8"
                " FROM pgstagechain.runs WHERE pipeline = 'bench' AND state = 'succeeded'"
            ).fetchall()
        basis = "commit_ack" if acks else "finished_at"
        # (acknowledged, finished) of each (stage, key), and of each group's last member
        done: dict[tuple[str, str], tuple[float, float]] = {}
        group_ready: dict[str, tuple[float, float]] = {}
        last_row = self.rows[-1]
        for token, stage, row_key, group_key, finished in runs:
            acked = acks.get(token) if acks else finished
            if acked is None:
                continue
            done[(stage, row_key)] = (acked, finished)
            if stage == last_row and group_key is not None:
                known = group_ready.get(group_key, (0.0, 0.0))
                group_ready[group_key] = (max(known[0], acked), max(known[1], finished))
        previous = dict(zip(self.rows, [None, *self.rows], strict=False))
        gprevious = dict(zip(self.groups, [None, *self.groups], strict=False))

        def since(times: tuple[float, float] | None, started: float) -> float | None:
            if times is None:
                return None
            acked, finished = times
            return started - (acked if acked <= started else finished)

        found: list[tuple[str, float]] = []
        for report in reports:
            for stage, key, started in report["starts"]:
                seconds: float | None
                if stage in previous:
                    before = previous[stage]
                    if before is None:
                        kind = "release"
                        seconds = since(released.get(str(int(key) // 1000)), started)
                    else:
                        kind, seconds = "row_to_row", since(done.get((before, key)), started)
                else:
                    gbefore = gprevious[stage]
                    if gbefore is None:
                        kind, seconds = "fan_in", since(group_ready.get(key), started)
                    else:
                        kind = "group_to_group"
                        seconds = since(done.get((gbefore, key)), started)
                if seconds is not None:
                    found.append((kind, seconds))
        return found, basis

    def hop_attribution(
        self,
        dsn: str,
        reports: list[dict[str, Any]],
        released: dict[str, tuple[float, float]],
    ) -> dict[str, dict[str, Any]]:
        """Where a hand-over through a notification spends its time, per kind (``release``,
        ``fan_in``): the median of each segment, in ms, from the timestamps the benchmark
        worker takes (see ``bench_worker.instrument_hops``):

        ``notify`` commit acknowledged → notification handed to the hints; ``to_dispatcher``
        → the dispatcher's pass that claimed it began; ``before_claim`` → claim sent;
        ``claim`` → claim returned; ``to_handler`` → handler started; ``total``.
        """
        first_row, last_row = self.rows[0], self.rows[-1]
        first_group = self.groups[0] if self.groups else None
        acks: dict[str, float] = {}
        for report in reports:
            acks.update(dict(report["acks"]))
        with psycopg.connect(dsn) as conn:
            runs = conn.execute(
                "SELECT token::text, group_key, extract(epoch FROM finished_at)::float8"
                " FROM pgstagechain.runs WHERE pipeline = 'bench' AND state = 'succeeded'"
                " AND stage = %s",
                (last_row,),
            ).fetchall()
        group_ready: dict[str, float] = {}
        for token, group_key, finished in runs:
            if group_key is not None:
                acked = acks.get(token, finished)
                group_ready[group_key] = max(group_ready.get(group_key, 0.0), acked)
        segments: dict[str, dict[str, list[float]]] = {}
        names = ("notify", "to_dispatcher", "before_claim", "claim", "to_handler", "total")
        for report in reports:
            hops = report.get("hops")
            if not hops:
                continue
            heard: dict[tuple[str, str], float] = {}
            for at, payload in hops["notes"]:
                with contextlib.suppress(ValueError, TypeError):
                    kind, step, key, _ = json.loads(payload)
                    heard.setdefault((kind + step, key), at)
            claimed: dict[tuple[str, str], tuple[float, float]] = {}
            for sent, returned, stage, keys in hops["claims"]:
                for key in keys:
                    claimed.setdefault((stage, key), (sent, returned))
            wakes = sorted(hops["wakes"])
            for stage, key, started in report["starts"]:
                if stage == first_row:
                    kind, base = "release", released.get(str(int(key) // 1000), (None,))[0]
                    received = heard.get(("r" + bench_app.START_STEP, key))
                elif stage == first_group:
                    kind, base = "fan_in", group_ready.get(key)
                    received = heard.get(("g" + last_row, key))
                else:
                    continue
                claim = claimed.get((stage, key))
                if base is None or received is None or claim is None:
                    continue
                sent, returned = claim
                index = bisect.bisect_right(wakes, sent) - 1
                woke = max(received, wakes[index]) if index >= 0 else received
                values = (
                    received - base,
                    woke - received,
                    sent - woke,
                    returned - sent,
                    started - returned,
                    started - base,
                )
                into = segments.setdefault(kind, {name: [] for name in names})
                for name, value in zip(names, values, strict=True):
                    into[name].append(value)
        return {
            kind: {
                **{name: round(statistics.median(v) * 1000, 3) for name, v in found.items()},
                "n": len(found["total"]),
            }
            for kind, found in sorted(segments.items())
            if found["total"]
        }

    def cpu_snapshot(
        self, workers: list[tuple[subprocess.Popen[str], Path]]
    ) -> tuple[float, float | None]:
        return (
            sum(proc_cpu(proc.pid) for proc, _ in workers),
            self.server_cpu.seconds(),
        )

    # -- scenarios -------------------------------------------------------------------------------

    def burst(self, mode: str, count: int, profile: Path | None = None) -> dict[str, Any]:
        connection = MODES[mode]
        rows = self.args.chains
        dsn = self.new_database(f"burst_{mode}_{count}")
        self.install(dsn, bool(connection))
        job_ids = self.add_rows(dsn, rows)
        expected = self.expected_transitions(rows)
        name = conninfo_to_dict(dsn)["dbname"]
        logged = self.server_log is not None
        if logged:  # every statement of this database, in the server log (a few hundred)
            with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("ALTER DATABASE {} SET log_statement = 'all'").format(
                        sql.Identifier(name)
                    )
                )
        xacts0 = self._quiet_xacts(name)
        polls0 = self.polls
        workers = self.start_workers(dsn, count, connection, f"burst-{mode}-{count}")
        spy = None
        try:
            if profile is not None:
                spy = start_py_spy(workers[0][0].pid, profile)
            time.sleep(0.3)
            with psycopg.connect(dsn, autocommit=True) as conn:
                if logged:
                    conn.execute("SET log_statement = 'none'")  # not the benchmark's own
                w0 = self._server_time()
                cpu0 = self.cpu_snapshot(workers)
                t_sent = time.time()
                with conn.transaction():
                    conn.execute(
                        "UPDATE bench_variants SET status = 'done', updated_at = now()"
                        " WHERE current_step = 'img_gen' AND status = 'running'"
                    )
                t_release = time.time()
                row = conn.execute(
                    "SELECT extract(epoch FROM clock_timestamp())::float8"
                ).fetchone()
                assert row is not None
                t0_server = float(row[0])
                finished = self.wait_done(conn, self.finish_target(rows), self.args.burst_timeout)
                cpu1 = self.cpu_snapshot(workers)
                w1 = self._server_time()
                row = conn.execute(
                    "SELECT count(*), extract(epoch FROM max(finished_at))::float8"
                    " FROM pgstagechain.runs WHERE pipeline = 'bench' AND state = 'succeeded'"
                ).fetchone()
                assert row is not None
                transitions, t_end = int(row[0]), float(row[1] or t0_server)
        finally:
            if spy is not None:
                stop_py_spy(spy)
            reports = self.stop_workers(workers)
        if logged:
            # the workers' statements from the release to the last transition
            statements = self._logged_statements([name], w0, w1)[name]
            kinds = self._logged_kinds(name, w0, w1)
            statements_method = "server log, release to done"
        else:
            # every worker statement is a transaction of its own (autocommit); the
            # benchmark's own (the release, its clock read, its progress polls, the final
            # count) are taken out; the workers' start-up and shut-down are in
            own = self.polls - polls0 + 3
            statements = self._quiet_xacts(name) - xacts0 - own
            statements_method = "pg_stat_database transactions, workers' whole lives"
            kinds = {}
        seconds = max(1e-6, t_end - t0_server)
        lat, basis = self.latencies(dsn, reports, {str(j): (t_release, t_sent) for j in job_ids})
        stats = _sum_stats(reports)
        result = {
            "mode": mode,
            "workers": count,
            "chains": rows,
            "transitions": transitions,
            "expected_transitions": expected,
            "completed": finished and transitions >= expected,
            "seconds": round(seconds, 3),
            "transitions_per_s": round(transitions / seconds, 1),
            "latency_ms": percentiles([seconds for _, seconds in lat]),
            "latency_ms_by_kind": by_kind(lat),
            "latency_basis": basis,
            "cpu_us_per_transition": self._cpu(cpu0, cpu1, transitions),
            "concurrency_per_worker": self.concurrency_for(count),
            "statements_per_transition": round(statements / max(1, transitions), 4),
            "statements": statements,
            "statements_method": statements_method,
            "statements_by_kind": kinds,
            "claims_lost": {
                "of_claimed": stats.get("claimed", 0),
                "by_key_not_got": stats.get("races_lost", 0),
                "pct": round(100 * stats.get("races_lost", 0) / max(1, stats.get("claimed", 0)), 3),
                "empty_claim_statements": stats.get("claims_empty"),
                "keys_left_to_peers": stats.get("left_to_peers"),
            },
            "worker_stats": stats,
            "loadavg_1min_after": round(os.getloadavg()[0], 2),
        }
        log(
            f"burst {mode} x{count}: {transitions} transitions in {seconds:.2f}s = "
            f"{result['transitions_per_s']}/s, cpu {result['cpu_us_per_transition']}, "
            f"statements/transition {result['statements_per_transition']}, "
            f"claims lost {result['claims_lost']}"
        )
        return result

    def _cpu(
        self, cpu0: tuple[float, float | None], cpu1: tuple[float, float | None], transitions: int
    ) -> dict[str, float | None]:
        if transitions <= 0:
            return {"worker": None, "server": None, "total": None}
        worker = (cpu1[0] - cpu0[0]) * 1e6 / transitions
        server = (
            (cpu1[1] - cpu0[1]) * 1e6 / transitions
            if cpu0[1] is not None and cpu1[1] is not None
            else None
        )
        return {
            "worker": round(worker, 1),
            "server": None if server is None else round(server, 1),
            "total": None if server is None else round(worker + server, 1),
        }

    def steady(self) -> dict[str, Any]:
        """Release one job (group_size rows) at a time, at ``steady_rate`` rows/s."""
        rate = self.args.steady_rate
        size = self.args.group_size
        rows = max(size, int(rate * self.args.steady_seconds) // size * size)
        dsn = self.new_database("steady")
        self.install(dsn, False)
        job_ids = self.add_rows(dsn, rows)
        workers = self.start_workers(dsn, 1, False, "steady")
        released: dict[str, tuple[float, float]] = {}
        try:
            time.sleep(0.3)
            with psycopg.connect(dsn, autocommit=True) as conn:
                cpu0 = self.cpu_snapshot(workers)
                interval = size / rate
                next_at = time.monotonic()
                for job in job_ids:
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    next_at += interval
                    sent = time.time()
                    conn.execute(
                        "UPDATE bench_variants SET status = 'done', updated_at = now()"
                        " WHERE job_id = %s AND current_step = 'img_gen'",
                        (job,),
                    )
                    released[str(job)] = (time.time(), sent)
                finished = self.wait_done(conn, self.finish_target(rows), self.args.burst_timeout)
                cpu1 = self.cpu_snapshot(workers)
                row = conn.execute(
                    "SELECT count(*) FROM pgstagechain.runs WHERE pipeline = 'bench'"
                    " AND state = 'succeeded'"
                ).fetchone()
                assert row is not None
                transitions = int(row[0])
        finally:
            reports = self.stop_workers(workers)
        lat, basis = self.latencies(dsn, reports, released)
        attribution = self.hop_attribution(dsn, reports, released)
        result = {
            "hop_attribution_ms": attribution,
            "rate_rows_per_s": rate,
            "rows": rows,
            "transitions": transitions,
            "expected_transitions": self.expected_transitions(rows),
            "completed": finished and transitions >= self.expected_transitions(rows),
            "latency_ms": percentiles([seconds for _, seconds in lat]),
            "latency_ms_by_kind": by_kind(lat),
            "latency_basis": basis,
            "cpu_us_per_transition": self._cpu(cpu0, cpu1, transitions),
        }
        log(f"steady: {result['latency_ms']}")
        for kind, figures in result["latency_ms_by_kind"].items():
            log(f"  {kind}: {figures}")
        for kind, figures in attribution.items():
            log(f"  {kind} attribution (median ms): {figures}")
        return result

    def idle(self) -> dict[str, Any]:
        """Statements per minute while nothing happens: a worker vs. a 1 s polling loop.

        With a server of our own, every statement of the two databases is logged
        (``log_statement = all`` for those databases only) and the log lines inside the
        window are counted. pg_stat_database transaction counts are reported as well;
        they also count autovacuum's transactions, so they read high.
        """
        worker_dsn = self.new_database("idle_worker")
        self.install(worker_dsn, False)
        self.add_rows(worker_dsn, self.args.group_size)
        poll_dsn = self.new_database("idle_poll")
        self.add_rows(poll_dsn, self.args.group_size)
        names = [conninfo_to_dict(dsn)["dbname"] for dsn in (worker_dsn, poll_dsn)]
        if self.server_log is not None:
            with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
                for name in names:
                    conn.execute(
                        sql.SQL("ALTER DATABASE {} SET log_statement = 'all'").format(
                            sql.Identifier(name)
                        )
                    )
        workers = self.start_workers(worker_dsn, 1, False, "idle", record=False)
        stop = threading.Event()

        def poll() -> None:
            with psycopg.connect(poll_dsn, autocommit=True) as conn:
                while not stop.is_set():
                    conn.execute(
                        "SELECT job_variants_id FROM bench_variants"
                        " WHERE current_step = 'img_gen' AND status = 'done' LIMIT 100"
                    ).fetchall()
                    stop.wait(1.0)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            # An idle backend flushes its counters within 10 s: let the start-up statements
            # be counted before the window opens.
            time.sleep(11.0)
            before = self._xacts(names)
            w0 = self._server_time()
            time.sleep(self.args.idle_seconds)
            w1 = self._server_time()
            after = self._xacts(names)
        finally:
            stop.set()
            poller.join(5)
            self.stop_workers(workers)
        window = self.args.idle_seconds
        xacts = {name: (after[name] - before[name]) * 60.0 / window for name in names}
        result: dict[str, Any] = {"window_s": window}
        if self.server_log is not None:
            counted = self._logged_statements(names, w0, w1)
            result["worker"] = round(counted[names[0]] * 60.0 / window, 1)
            result["polling_1s"] = round(counted[names[1]] * 60.0 / window, 1)
            result["method"] = "statements in the server log (log_statement=all per database)"
        else:
            result["worker"] = round(xacts[names[0]], 1)
            result["polling_1s"] = round(xacts[names[1]], 1)
            result["method"] = "pg_stat_database xact_commit + xact_rollback (includes autovacuum)"
        result["xact_based"] = {
            "worker": round(xacts[names[0]], 1),
            "polling_1s": round(xacts[names[1]], 1),
        }
        log(f"idle: {result}")
        return result

    def _server_time(self) -> str:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS')"
            ).fetchone()
        assert row is not None
        return str(row[0])

    def _logged_statements(self, names: list[str], w0: str, w1: str) -> dict[str, int]:
        counts = dict.fromkeys(names, 0)
        assert self.server_log is not None
        pattern = re.compile(
            r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) UTC#([^#]*)#LOG:  (statement|execute)"
        )
        with open(self.server_log, errors="replace") as lines:
            for line in lines:
                found = pattern.match(line)
                if found and found.group(2) in counts and w0 <= found.group(1) <= w1:
                    counts[found.group(2)] += 1
        return counts

    def _quiet_xacts(self, name: str, timeout: float = 30.0) -> int:
        """``xact_commit + xact_rollback`` of database ``name`` once no client is connected
        to it: a backend flushes its counters when it exits, so every statement is in."""
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            while True:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = %s AND backend_type = 'client backend'",
                    (name,),
                ).fetchone()
                if (row is not None and not row[0]) or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            row = conn.execute(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
                (name,),
            ).fetchone()
        return int(row[0]) if row else 0

    def _logged_kinds(self, name: str, w0: str, w1: str, top: int = 8) -> dict[str, int]:
        """The statements of database ``name`` logged between ``w0`` and ``w1``, counted by
        their first words (what each kind of statement is shows in them)."""
        assert self.server_log is not None
        pattern = re.compile(
            r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) UTC#([^#]*)#LOG:  "
            r"(?:statement|execute [^:]*): (.*)$"
        )
        counts: dict[str, int] = {}
        with open(self.server_log, errors="replace") as lines:
            for line in lines:
                found = pattern.match(line)
                if found and found.group(2) == name and w0 <= found.group(1) <= w1:
                    head = " ".join(found.group(3).split())[:60]
                    counts[head] = counts.get(head, 0) + 1
        return dict(sorted(counts.items(), key=lambda item: -item[1])[:top])

    def _xacts(self, names: list[str]) -> dict[str, int]:
        time.sleep(1.1)  # backends flush their counters at most once a second
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT datname, xact_commit + xact_rollback FROM pg_stat_database"
                " WHERE datname = ANY(%s)",
                (names,),
            ).fetchall()
        return {name: int(count) for name, count in rows}

    def backlog(self) -> dict[str, Any]:
        """Worker memory over a large backlog released at once (for a bounded time)."""
        rows = self.args.backlog
        dsn = self.new_database("backlog")
        self.install(dsn, False)
        self.add_rows(dsn, rows)
        workers = self.start_workers(dsn, 1, False, "backlog", record=False)
        pid = workers[0][0].pid
        samples: list[int] = []
        try:
            time.sleep(0.3)
            start_kb = proc_status_kb(pid, "VmRSS")
            with psycopg.connect(dsn, autocommit=True) as conn:
                t0 = time.monotonic()
                conn.execute(
                    "UPDATE bench_variants SET status = 'done', updated_at = now()"
                    " WHERE current_step = 'img_gen' AND status = 'running'"
                )
                release_s = time.monotonic() - t0
                deadline = time.monotonic() + self.args.backlog_seconds
                while time.monotonic() < deadline:
                    kb = proc_status_kb(pid, "VmRSS")
                    if kb:
                        samples.append(kb)
                    time.sleep(0.25)
                end_kb = proc_status_kb(pid, "VmRSS")
                peak_kb = proc_status_kb(pid, "VmHWM")
                row = conn.execute(
                    "SELECT count(*) FROM pgstagechain.runs WHERE pipeline = 'bench'"
                    " AND state = 'succeeded'"
                ).fetchone()
                assert row is not None
                processed = int(row[0])
        finally:
            self.stop_workers(workers)
        result = {
            "rows": rows,
            "release_s": round(release_s, 2),
            "seconds": self.args.backlog_seconds,
            "transitions_done": processed,
            "start": _mb(start_kb),
            "end": _mb(end_kb),
            "peak": _mb(peak_kb),
            "max_sampled": _mb(max(samples) if samples else None),
            # flat means: after the first second (the in-flight runs' working set) it stops
            "by_second": [_mb(kb) for kb in samples[::4]],
        }
        log(f"backlog: {result}")
        return result

    def commit_tps(self) -> dict[str, Any]:
        """Single-row UPDATE commits per second at 1, 4, 16 clients (pgbench when available)."""
        dsn = self.new_database("commit")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE commit_bench (id int PRIMARY KEY, v bigint NOT NULL)")
            conn.execute("INSERT INTO commit_bench SELECT g, 0 FROM generate_series(1, 1000) g")
            conn.execute("VACUUM ANALYZE commit_bench")
        pgbench = self.bindir / "pgbench" if self.bindir else None
        if pgbench is None or not pgbench.exists():
            found = shutil.which("pgbench")
            pgbench = Path(found) if found else None
        result: dict[str, Any] = {}
        for clients in self.args.commit_clients:
            if pgbench is not None:
                tps = self._pgbench(pgbench, dsn, clients)
                tool = "pgbench"
            else:
                tps = self._threads_tps(dsn, clients)
                tool = "psycopg threads"
            result[str(clients)] = round(tps, 1)
            log(f"commit tps with {clients} client(s): {tps:.0f} ({tool})")
        result["tool"] = tool
        return result

    def floor(self, samples: int = 150, gap: float = 0.03) -> dict[str, Any]:
        """What a hand-over through a notification cannot beat on this machine, at light load:
        a bare NOTIFY from commit acknowledged to a listener's receipt, and the round trip
        of a one-row UPDATE committed without waiting for its flush (what a claim is), each
        after ``gap`` seconds of quiet, as in the steady phase."""
        dsn = self.new_database("floor")
        received: list[float] = []
        listening = threading.Event()

        def listen() -> None:
            with psycopg.connect(dsn, autocommit=True) as ears:
                ears.execute("LISTEN floor")
                listening.set()
                for _ in ears.notifies(timeout=gap * samples + 10, stop_after=samples):
                    received.append(time.time())

        thread = threading.Thread(target=listen, daemon=True)
        thread.start()
        listening.wait(10)
        sent: list[float] = []
        trips: list[float] = []
        with psycopg.connect(dsn, autocommit=True) as conn:
            for _ in range(samples):
                time.sleep(gap)
                conn.execute("SELECT pg_notify('floor', '')")
                sent.append(time.time())
            thread.join(gap * samples + 15)
            conn.execute("CREATE TABLE floor (id int PRIMARY KEY, v bigint NOT NULL)")
            conn.execute("INSERT INTO floor SELECT g, 0 FROM generate_series(1, 1000) g")
            conn.execute("SET synchronous_commit = off")
            for i in range(samples):
                time.sleep(gap)
                started = time.perf_counter()
                conn.execute("UPDATE floor SET v = v + 1 WHERE id = %s RETURNING v", (i + 1,))
                trips.append(time.perf_counter() - started)
        result = {
            "notify": percentiles([r - s for s, r in zip(sent, received, strict=False)]),
            "update_round_trip": percentiles(trips),
            "gap_s": gap,
        }
        log(f"floor at light load: {result}")
        return result

    def _pgbench(self, pgbench: Path, dsn: str, clients: int) -> float:
        script = self.tmp / "update.sql"
        script.write_text(
            "\\set id random(1, 1000)\nUPDATE commit_bench SET v = v + 1 WHERE id = :id;\n"
        )
        out = subprocess.run(
            [
                str(pgbench),
                "-n",
                "-f",
                str(script),
                "-c",
                str(clients),
                "-j",
                str(min(clients, 4)),
                "-T",
                str(self.args.commit_seconds),
                dsn,
            ],
            capture_output=True,
            text=True,
            timeout=self.args.commit_seconds + 60,
        )
        found = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out.stdout)
        if out.returncode or not found:
            raise RuntimeError(f"pgbench failed: {out.stderr.strip() or out.stdout.strip()}")
        return float(found.group(1))

    def _threads_tps(self, dsn: str, clients: int) -> float:
        counts = [0] * clients
        stop = threading.Event()

        def client(index: int) -> None:
            with psycopg.connect(dsn, autocommit=True) as conn:
                n = 0
                while not stop.is_set():
                    conn.execute(
                        "UPDATE commit_bench SET v = v + 1 WHERE id = %s", (index * 37 % 1000 + 1,)
                    )
                    n += 1
                counts[index] = n

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        t0 = time.monotonic()
        for each in threads:
            each.start()
        time.sleep(self.args.commit_seconds)
        stop.set()
        for each in threads:
            each.join()
        return sum(counts) / (time.monotonic() - t0)


def handover_vs_floor(
    steady: dict[str, Any] | None, floor: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The steady phase's notification hand-overs (``release``, ``fan_in``) beside the floor
    measured in the same run (a bare NOTIFY plus a one-row UPDATE round trip), with their
    ratio to it, at p50 and p99."""
    if not steady or not floor:
        return None
    result: dict[str, Any] = {}
    for q in ("p50", "p99"):
        notify, trip = floor["notify"][q], floor["update_round_trip"][q]
        if notify is None or trip is None:
            return None
        result[f"floor_{q}"] = round(notify + trip, 3)
    for kind in ("release", "fan_in"):
        figures = steady["latency_ms_by_kind"].get(kind)
        if not figures or figures["p50"] is None:
            continue
        result[kind] = {q: figures[q] for q in ("p50", "p99")} | {
            f"ratio_{q}": round(figures[q] / result[f"floor_{q}"], 2) for q in ("p50", "p99")
        }
    return result


def _mb(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


def _sum_stats(reports: list[dict[str, Any]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for report in reports:
        for key, value in report["stats"].items():
            total[key] = total.get(key, 0) + int(value)
    return total


# -- profiling -------------------------------------------------------------------------------------


def start_py_spy(pid: int, directory: Path) -> subprocess.Popen[bytes] | None:
    exe = Path(sys.executable).parent / "py-spy"
    found = str(exe) if exe.exists() else shutil.which("py-spy")
    if not found:
        log("py-spy not found: no profile")
        return None
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            found,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            "--format",
            "raw",
            "--nonblocking",
            "--output",
            str(directory / "worker.collapsed.txt"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # let it attach
    return proc


def stop_py_spy(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


# -- main ------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", help="use this server instead of starting one (needs CREATEDB)")
    p.add_argument("--chains", type=int, default=10000, help="rows released in each burst")
    p.add_argument("--group-size", type=int, default=4, help="rows per group (job)")
    p.add_argument("--row-stages", type=int, default=8)
    p.add_argument("--group-stages", type=int, default=2)
    p.add_argument("--workers", type=_ints, default=[1, 2], help="worker processes, e.g. 1,2")
    p.add_argument(
        "--modes",
        default="noconn,conn",
        help="noconn: stages declared connection=False; conn: the default connection=True;"
        " write: connection=True, each handler writes a row on ctx.conn",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=400,
        help="per worker process; above two processes, shared so the total stays that of two",
    )
    p.add_argument(
        "--fixed-concurrency",
        action="store_true",
        help="give every worker process --concurrency, however many there are",
    )
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--burst-timeout", type=float, default=120.0)
    p.add_argument("--steady-rate", type=float, default=20.0, help="rows released per second")
    p.add_argument("--steady-seconds", type=float, default=6.0)
    p.add_argument("--idle-seconds", type=float, default=20.0)
    p.add_argument("--backlog", type=int, default=100_000, help="rows of the memory test")
    p.add_argument("--backlog-seconds", type=float, default=8.0)
    p.add_argument("--commit-clients", type=_ints, default=[1, 4, 16])
    p.add_argument("--commit-seconds", type=int, default=3)
    p.add_argument(
        "--profile", type=Path, help="py-spy the first one-worker burst of the first mode into DIR"
    )
    p.add_argument(
        "--floor-samples", type=int, default=150, help="notifications and round trips timed"
    )
    p.add_argument("--skip", default="", help="comma-separated: commit,floor,steady,idle,backlog")
    p.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a server setting for the cluster this command starts (repeatable)",
    )
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in args.modes:
        if mode not in MODES:
            p.error(f"unknown mode {mode!r}")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    return args


@contextlib.contextmanager
def server(args: argparse.Namespace) -> Iterator[tuple[str, Path | None, str | None]]:
    if args.dsn:
        bindir = None
        with contextlib.suppress(Exception):
            from pgstagechain.testing import find_bindir  # type: ignore[attr-defined]

            bindir = find_bindir()
        yield args.dsn, bindir, None
        return
    from pgstagechain.testing import TemporaryCluster

    settings = {
        "log_line_prefix": "%m#%d#",
        "log_timezone": "UTC",
        **dict(item.split("=", 1) for item in args.setting),
    }
    cluster = TemporaryCluster(settings=settings)
    log(f"starting PostgreSQL in {cluster.directory} (fsync on; settings {settings})")
    cluster.start()
    try:
        yield cluster.dsn(), cluster.bindir, str(cluster.directory)
    finally:
        cluster.remove()


def machine(admin_dsn: str) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT current_setting('server_version'), current_setting('fsync')"
        ).fetchone()
    assert row is not None
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "postgres": row[0],
        "fsync": row[1],
        "psycopg": psycopg.__version__,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    with server(args) as (admin_dsn, bindir, directory):
        bench = Bench(
            args, admin_dsn, bindir, Path(directory) / "server.log" if directory else None
        )
        if not bench.server_cpu.available:
            log("the server's processes are not visible in /proc: no server CPU figures")
        out: dict[str, Any] = {
            "machine": machine(admin_dsn),
            "config": {
                "chains": args.chains,
                "group_size": args.group_size,
                "row_stages": args.row_stages,
                "group_stages": args.group_stages,
                "transitions_per_burst": bench.expected_transitions(args.chains),
                "concurrency_per_worker": args.concurrency,
                "batch_size": args.batch_size,
                "workers": args.workers,
                "modes": args.modes,
                "server_settings": dict(item.split("=", 1) for item in args.setting),
            },
        }
        try:
            commit = bench.commit_tps() if "commit" not in args.skip else {}
            floor = bench.floor(args.floor_samples) if "floor" not in args.skip else None
            bursts = []
            for mode in args.modes:
                for count in args.workers:
                    profile = (
                        args.profile
                        if args.profile is not None and mode == args.modes[0] and count == 1
                        else None
                    )
                    bursts.append(bench.burst(mode, count, profile))
                    bench.drop_databases()
            # Idle traffic is counted, not timed: measure it alongside the other phases.
            idle_result: list[dict[str, Any]] = []
            idle_thread = threading.Thread(
                target=lambda: idle_result.append(bench.idle()), daemon=True
            )
            if "idle" not in args.skip:
                idle_thread.start()
            steady = bench.steady() if "steady" not in args.skip else None
            backlog = bench.backlog() if "backlog" not in args.skip else None
            if idle_thread.is_alive():
                idle_thread.join()
            idle = idle_result[0] if idle_result else None
        finally:
            bench.drop_databases()
            shutil.rmtree(bench.tmp, ignore_errors=True)

    tps = {
        m: {str(b["workers"]): b["transitions_per_s"] for b in bursts if b["mode"] == m}
        for m in args.modes
    }
    first = bursts[0] if bursts else None
    single = commit.get("1")
    out.update(
        {
            "transitions_per_s": tps,
            "latency_ms": {
                "burst": first["latency_ms"] if first else None,
                "steady": steady["latency_ms"] if steady else None,
                "basis": first["latency_basis"] if first else None,
            },
            "cpu_us_per_transition": {
                f"{b['mode']}_x{b['workers']}": b["cpu_us_per_transition"] for b in bursts
            },
            "scaling": {
                f"{b['mode']}_x{b['workers']}": {
                    "statements_per_transition": b["statements_per_transition"],
                    "server_cpu_us_per_transition": b["cpu_us_per_transition"]["server"],
                    "claims_lost_pct": b["claims_lost"]["pct"],
                }
                for b in bursts
            },
            "server_commit_tps": commit,
            "floor_ms": floor,
            "handover_vs_floor": handover_vs_floor(steady, floor),
            "ratio_to_commit_tps_1": (
                {m: {k: round(v / single, 3) for k, v in per.items()} for m, per in tps.items()}
                if single
                else None
            ),
            "idle_queries_per_min": idle,
            "worker_rss_mb": backlog,
            "steady": steady,
            "bursts": bursts,
            "wall_s": round(time.monotonic() - t_start, 1),
        }
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
