"""Commands that install and run pipelines: migrate, uninstall, recover, worker."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from functools import partial
from typing import Any

import anyio
import anyio.abc

from .. import (
    ConfigurationError,
    GraphChangeError,
    RecoveryScanner,
    Worker,
    migrate,
    tune_gc,
    uninstall,
)
from .._connect import connect
from .._install import migration_report
from .._migration_plan import parse_maps
from ._common import UsageError, dsn, load_pipeline, worker_default

logger = logging.getLogger("pgstagechain.cli")


def _maps(given: list[str]) -> dict[str, str]:
    """``--map OLD=NEW`` options as a dict, each OLD once."""
    try:
        return parse_maps(given)
    except ConfigurationError as exc:
        raise UsageError(str(exc)) from None


def _migrate(args: argparse.Namespace) -> int:
    pipelines = [load_pipeline(spec) for spec in args.pipelines]
    maps = _maps(args.map)
    if args.plan:
        return _plan(args, pipelines, maps)
    try:  # a change of graph is logged (stderr) before it is made, in its transaction
        applied = anyio.run(
            partial(migrate, backfill=args.backfill, maps=maps), dsn(args), *pipelines
        )
    except GraphChangeError as exc:
        print("\n".join(exc.plan.lines()), file=sys.stderr)
        raise
    print(
        f"schema: {'applied migration(s) ' + ', '.join(map(str, applied)) if applied else 'up to date'}"
    )
    for pipeline in pipelines:
        print(
            f"pipeline {pipeline.name}: trigger installed on {pipeline.table.schema}.{pipeline.table.table}"
        )
    return 0


def _plan(args: argparse.Namespace, pipelines: list[Any], maps: dict[str, str]) -> int:
    """``migrate --plan``: what migrate would do, changing nothing."""
    print("\n".join(anyio.run(partial(migration_report, dsn(args), *pipelines, maps=maps))))
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    pipeline = load_pipeline(args.pipeline)

    async def run() -> None:
        async with await connect(dsn(args), autocommit=True) as conn:
            await uninstall(conn, pipeline, purge=args.purge)

    anyio.run(run)
    print(f"pipeline {pipeline.name}: uninstalled{' and its history purged' if args.purge else ''}")
    return 0


def _recover(args: argparse.Namespace) -> int:
    scanner = RecoveryScanner(load_pipeline(args.pipeline), dsn(args))
    report = anyio.run(lambda: scanner.scan(deep=args.deep))
    print(
        f"expired leases closed: {report.expired_leases}\n"
        f"rows no run held, run again: {report.unheld_repaired}\n"
        f"stage slots freed: {report.freed_slots}\n"
        f"rows re-announced: {report.renotified_rows}\n"
        f"groups re-announced: {report.renotified_groups}\n"
        f"groups formed (deep): {report.formed_groups}\n"
        f"next retry due: {report.next_retry_at or '-'}"
    )
    return 0


class _StoppedWhileStarting(Exception):
    """SIGTERM arrived before the worker listened for it: nothing is held yet."""


def _stop_while_starting(signum: int, frame: object) -> None:
    raise _StoppedWhileStarting


def _worker(args: argparse.Namespace) -> int:
    # Loading the app and connecting can take seconds; a process manager's SIGTERM in that
    # window is an ordinary stop, not a crash. The worker's own receiver replaces this.
    signal.signal(signal.SIGTERM, _stop_while_starting)
    try:
        return _run_worker(args)
    except _StoppedWhileStarting:
        logger.warning("SIGTERM: stopped before it started")
        return 0


def _run_worker(args: argparse.Namespace) -> int:
    pipeline = load_pipeline(args.pipeline)
    metrics = None
    if args.metrics_port is not None:
        from ..metrics import Metrics

        metrics = Metrics(pipeline)
        server = metrics.serve(args.metrics_port, args.metrics_addr)
        logger.info(
            "serving Prometheus metrics on http://%s:%s/metrics",
            args.metrics_addr,
            getattr(server, "server_port", args.metrics_port),
        )
    worker = Worker(
        pipeline,
        dsn(args),
        stages=args.stages.split(",") if args.stages else None,
        concurrency=args.concurrency,
        lease=args.lease,
        scan_interval=args.scan_interval,
        shutdown_timeout=args.shutdown_timeout,
        listen=not args.poll,
        poll_interval=args.poll_interval,
        worker_id=args.worker_id,
        observer=metrics,
    )
    logger.info("starting %s", worker.describe())
    tune_gc()

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(_signals, worker, tg.cancel_scope)
            if metrics is not None:
                tg.start_soon(metrics.watch, worker, args.metrics_interval)
            await worker.run()
            tg.cancel_scope.cancel()

    anyio.run(run)
    logger.info("worker %s stopped: %s", worker.worker_id, worker.stats)
    return 0


async def _signals(
    worker: Worker,
    scope: anyio.CancelScope,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """SIGTERM or a first SIGINT drain gracefully; a second SIGINT stops at once."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
        task_status.started()
        stopping = False
        async for signum in received:
            if stopping and signum == signal.SIGINT:
                logger.warning("second interrupt: stopping now")
                scope.cancel()
                return
            stopping = True
            logger.info("%s: finishing in-flight runs, then stopping", signal.Signals(signum).name)
            worker.stop()


def _seconds_option(p: argparse.ArgumentParser, flag: str, option: str) -> None:
    """``--flag SECONDS`` defaulting to the Worker's own ``option``."""
    default = worker_default(option)
    p.add_argument(flag, type=float, default=default, help=f"seconds (default {default:g})")


def register(sub: Any) -> None:
    """Add migrate, uninstall, recover and worker to the command line."""
    p = sub.add_parser("migrate", help="install or upgrade the schema and the pipelines' triggers")
    p.add_argument("pipelines", nargs="*", metavar="MODULE:PIPELINE")
    p.add_argument(
        "--backfill",
        action=argparse.BooleanOptionalAction,
        help="a stage added after the last one: run it on rows already finished there "
        "(--backfill) or only on rows that get there from now on (--no-backfill)",
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="say what a changed stage graph does to rows in flight, and change nothing",
    )
    p.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="rows and groups at step OLD, which the new graph no longer has, go to step NEW "
        "(repeatable; one pipeline at a time)",
    )
    p.set_defaults(run=_migrate)

    p = sub.add_parser("uninstall", help="remove what migrate installed for a pipeline")
    p.add_argument("pipeline", metavar="MODULE:PIPELINE")
    p.add_argument("--purge", action="store_true", help="also delete its run history")
    p.set_defaults(run=_uninstall)

    p = sub.add_parser("recover", help="re-drive stuck rows and close expired leases, once")
    p.add_argument("pipeline", metavar="MODULE:PIPELINE")
    p.add_argument("--deep", action="store_true", help="also form groups missed while uninstalled")
    p.set_defaults(run=_recover)

    p = sub.add_parser("worker", help="run a worker until SIGTERM / Ctrl-C")
    p.add_argument("pipeline", metavar="MODULE:PIPELINE")
    p.add_argument("--stages", help="comma-separated stages to serve (default: all)")
    concurrency = worker_default("concurrency")
    p.add_argument(
        "--concurrency", type=int, default=concurrency, help=f"runs at once (default {concurrency})"
    )
    _seconds_option(p, "--lease", "lease")
    _seconds_option(p, "--scan-interval", "scan_interval")
    _seconds_option(p, "--shutdown-timeout", "shutdown_timeout")
    p.add_argument("--poll", action="store_true", help="poll-only mode (behind pgbouncer)")
    _seconds_option(p, "--poll-interval", "poll_interval")
    p.add_argument("--worker-id")
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on this port (needs pgstagechain[metrics])",
    )
    p.add_argument("--metrics-addr", default="0.0.0.0", help="address for --metrics-port")
    p.add_argument(
        "--metrics-interval", type=float, default=5.0, help="seconds between samples (default 5)"
    )
    p.set_defaults(run=_worker)
