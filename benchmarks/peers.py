"""The same chain on pgstagechain, pgqueuer and procrastinate, on one server, interleaved.

    pip install -e '.[peers]'
    python benchmarks/peers.py [--dsn DSN] [--chains 2000] [--stages 10] [--rounds 3]

A chain is ``--stages`` linear stages of no-op handlers. ``--chains`` chains are released
at once (one statement) and the time until the last job completed gives transitions
(jobs completed) per second, with the CPU of the worker process and of the server per
transition; then ``--light-chains`` chains released one at a time at ``--light-rate``
chains a second give the hand-over latency at light load. Each system runs in a database
of its own on the same server, one worker process each, in rounds: pgstagechain
(``connection=False``), pgstagechain (default ``connection=True``), pgqueuer,
procrastinate, and again. Progress goes to stderr; stdout gets one JSON line with every
figure, the medians of the rounds and the versions. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks import run  # noqa: E402

EXTRA_MISSING = (
    "benchmarks/peers.py needs the optional 'peers' extra (pgqueuer, procrastinate, asyncpg):"
    " pip install -e '.[peers]'"
)
SYSTEMS = ("pgstagechain_noconn", "pgstagechain_conn", "pgqueuer", "procrastinate")


def load_peers() -> dict[str, ModuleType]:
    """The peers' adapters; exits with one line naming the extra when it is not installed."""
    try:
        from benchmarks.peer_chains import pgqueuer_chain, procrastinate_chain
    except ImportError:
        raise SystemExit(EXTRA_MISSING) from None
    return {"pgqueuer": pgqueuer_chain, "procrastinate": procrastinate_chain}


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in ("pgstagechain", "pgqueuer", "procrastinate", "asyncpg", "psycopg", "uvloop"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 3) if known else None


class Peers:
    def __init__(self, args: argparse.Namespace, admin_dsn: str) -> None:
        self.args = args
        self.peers = load_peers()
        # pgstagechain's side is run.py's own burst and steady phases, on the linear shape,
        # one chain per "job" so that the steady phase releases one chain at a time.
        self.bench = run.Bench(
            run.parse_args(
                [
                    "--chains",
                    str(args.chains),
                    "--group-size",
                    "1",
                    "--row-stages",
                    str(args.stages),
                    "--group-stages",
                    "0",
                    "--concurrency",
                    str(args.concurrency),
                    "--batch-size",
                    str(args.batch_size),
                    "--steady-rate",
                    str(args.light_rate),
                    "--steady-seconds",
                    str(args.light_chains / args.light_rate),
                    "--burst-timeout",
                    str(args.timeout),
                ]
            ),
            admin_dsn,
            None,
        )

    # -- pgstagechain -----------------------------------------------------------------------------

    def ours(self, mode: str, light: bool) -> dict[str, Any]:
        burst = self.bench.burst(mode, 1)
        result = {
            "transitions": burst["transitions"],
            "completed": burst["completed"],
            "transitions_per_s": burst["transitions_per_s"],
            "cpu_us_per_transition": burst["cpu_us_per_transition"],
        }
        if light:
            steady = self.bench.steady()
            kinds = steady["latency_ms_by_kind"]
            result["light_latency_ms"] = {
                "release": kinds.get("release"),
                "hand_over": kinds.get("row_to_row"),
            }
        self.bench.drop_databases()
        return result

    # -- a peer ---------------------------------------------------------------------------------

    def start_worker(
        self, peer: ModuleType, dsn: str, tag: str
    ) -> tuple[subprocess.Popen[str], Path]:
        out = self.bench.tmp / f"{tag}.json"
        command = [
            sys.executable,
            str(Path(peer.__file__ or "")),
            "--dsn",
            dsn,
            "--stages",
            str(self.args.stages),
            "--concurrency",
            str(self.args.concurrency),
            "--batch-size",
            str(self.args.batch_size),
            "--pool-size",
            str(self.args.pool_size),
            "--out",
            str(out),
        ]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=HERE.parent)
        assert proc.stdout is not None
        if not proc.stdout.readline().startswith("READY"):
            self.bench.stop_workers([(proc, out)])
            raise RuntimeError(f"{peer.NAME} worker did not start (exit {proc.poll()})")
        return proc, out

    def wait_through(self, peer: ModuleType, conn: psycopg.Connection[Any]) -> bool:
        deadline = time.monotonic() + self.args.timeout
        while time.monotonic() < deadline:
            row = conn.execute(peer.PENDING_SQL).fetchone()
            if row is not None and not row[0]:
                return True
            time.sleep(0.05)
        return False

    def peer_burst(self, name: str) -> dict[str, Any]:
        peer = self.peers[name]
        dsn = self.bench.new_database(f"{name}_burst")
        asyncio.run(peer.install(dsn))
        worker = self.start_worker(peer, dsn, f"{name}-burst")
        expected = self.args.chains * self.args.stages
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                cpu0 = self.bench.cpu_snapshot([worker])
                asyncio.run(peer.release(dsn, [list(range(1, self.args.chains + 1))], 0.0))
                row = conn.execute(
                    "SELECT extract(epoch FROM clock_timestamp())::float8"
                ).fetchone()
                assert row is not None
                t0 = float(row[0])
                through = self.wait_through(peer, conn)
                cpu1 = self.bench.cpu_snapshot([worker])
                row = conn.execute(peer.FINISHED_SQL).fetchone()
                assert row is not None
                transitions, t_end = int(row[0]), float(row[1] or t0)
        finally:
            self.bench.stop_workers([worker])
        seconds = max(1e-6, t_end - t0)
        return {
            "transitions": transitions,
            "completed": through and transitions >= expected,
            "transitions_per_s": round(transitions / seconds, 1),
            "cpu_us_per_transition": self.bench._cpu(cpu0, cpu1, transitions),
        }

    def peer_light(self, name: str) -> dict[str, Any]:
        """One chain at a time: each hand-over timed from the acknowledgement of the enqueue
        that made the job (the release, or the previous stage's handler) to its start."""
        peer = self.peers[name]
        dsn = self.bench.new_database(f"{name}_light")
        asyncio.run(peer.install(dsn))
        worker = self.start_worker(peer, dsn, f"{name}-light")
        keys = list(range(1, self.args.light_chains + 1))
        reports: list[dict[str, Any]] = []
        try:
            acked = asyncio.run(
                peer.release(dsn, [[key] for key in keys], 1.0 / self.args.light_rate)
            )
            with psycopg.connect(dsn, autocommit=True) as conn:
                self.wait_through(peer, conn)
        finally:
            reports = self.bench.stop_workers([worker])
        released = dict(zip(keys, acked, strict=True))
        enqueued = {
            (stage, key): (sent, ack) for r in reports for stage, key, sent, ack in r["enqueued"]
        }
        found: list[tuple[str, float]] = []
        for report in reports:
            for stage, key, start in report["starts"]:
                if stage == 1:
                    found.append(("release", start - released[key]))
                elif (stage, key) in enqueued:
                    sent, ack = enqueued[(stage, key)]
                    # the job can start before its enqueuer sees the acknowledgement
                    found.append(("hand_over", start - (ack if ack <= start else sent)))
        kinds = run.by_kind(found)
        return {"release": kinds.get("release"), "hand_over": kinds.get("hand_over")}

    def peer(self, name: str, light: bool) -> dict[str, Any]:
        result = self.peer_burst(name)
        if light:
            result["light_latency_ms"] = self.peer_light(name)
        self.bench.drop_databases()
        return result

    def one(self, system: str, light: bool) -> dict[str, Any]:
        if system.startswith("pgstagechain_"):
            return self.ours(system.removeprefix("pgstagechain_"), light)
        return self.peer(system, light)


def summarise(rounds: list[dict[str, dict[str, Any]]], systems: list[str]) -> dict[str, Any]:
    """Medians over the rounds, per system."""
    out: dict[str, Any] = {}
    for system in systems:
        runs = [r[system] for r in rounds if system in r]
        figures: dict[str, Any] = {
            "transitions_per_s": median([x["transitions_per_s"] for x in runs]),
            "cpu_us_per_transition": {
                part: median([x["cpu_us_per_transition"][part] for x in runs])
                for part in ("worker", "server", "total")
            },
        }
        light = [x["light_latency_ms"] for x in runs if "light_latency_ms" in x]
        if light:
            figures["light_latency_ms"] = {
                kind: {
                    q: median([(x.get(kind) or {}).get(q) for x in light]) for q in ("p50", "p99")
                }
                for kind in ("release", "hand_over")
            }
        out[system] = figures
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--dsn", help="use this server instead of starting one (needs CREATEDB)")
    p.add_argument("--chains", type=int, default=2000, help="chains released at once")
    p.add_argument("--stages", type=int, default=10, help="linear stages per chain")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=400, help="jobs in flight per worker")
    p.add_argument("--batch-size", type=int, default=200, help="claims/completions per batch")
    p.add_argument("--pool-size", type=int, default=10, help="connections for handlers")
    p.add_argument("--light-chains", type=int, default=30, help="chains of the light-load phase")
    p.add_argument(
        "--light-rate",
        type=float,
        default=2.0,
        help="chains released per second (far below the slowest system's capacity)",
    )
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    p.add_argument("--timeout", type=float, default=600.0, help="per burst, seconds")
    p.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a server setting for the cluster this command starts (repeatable)",
    )
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for system in args.systems:
        if system not in SYSTEMS:
            p.error(f"unknown system {system!r} (known: {', '.join(SYSTEMS)})")
    if args.stages < 2:
        p.error("--stages must be at least 2 (a chain has hand-overs)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_peers()  # fail before starting a server when the extra is missing
    t_start = time.monotonic()
    rounds: list[dict[str, dict[str, Any]]] = []
    with run.server(args) as (admin_dsn, _bindir, _directory):
        peers = Peers(args, admin_dsn)
        if not peers.bench.server_cpu.available:
            run.log("the server's processes are not visible in /proc: no server CPU figures")
        machine = run.machine(admin_dsn)
        try:
            for index in range(args.rounds):
                results: dict[str, dict[str, Any]] = {}
                for system in args.systems:
                    run.log(f"round {index + 1}/{args.rounds}: {system}")
                    # the default mode's notification hand-over is the same path as noconn's
                    light = system != "pgstagechain_conn"
                    results[system] = peers.one(system, light)
                    run.log(f"  {system}: {results[system]}")
                rounds.append(results)
        finally:
            peers.bench.drop_databases()
            shutil.rmtree(peers.bench.tmp, ignore_errors=True)
    out = {
        "versions": versions(),
        "machine": machine,
        "config": {
            "chains": args.chains,
            "stages": args.stages,
            "transitions_per_burst": args.chains * args.stages,
            "rounds": args.rounds,
            "concurrency_per_worker": args.concurrency,
            "batch_size": args.batch_size,
            "pool_size": args.pool_size,
            "light_chains": args.light_chains,
            "light_rate_chains_per_s": args.light_rate,
            "worker_processes": 1,
            "systems": args.systems,
            "loadavg_1min_at_end": round(os.getloadavg()[0], 2),
        },
        "median": summarise(rounds, args.systems),
        "rounds": rounds,
        "wall_s": round(time.monotonic() - t_start, 1),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
