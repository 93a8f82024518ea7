"""The ``pgstagechain`` command: install, run and repair pipelines from the shell.

A pipeline is named as ``module.path:attribute`` (the attribute is a
:class:`~pgstagechain.Pipeline` or a function returning one). The database comes from
``--dsn``, else the ``PGSTAGECHAIN_DSN`` environment variable, else libpq's defaults
(``PGHOST``, ``PGDATABASE``, ...).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from ._connect import connect, redact
from ._install import migrate, uninstall
from ._pipeline import Pipeline
from ._recovery import RecoveryScanner
from ._worker import Worker, describe
from .errors import PgStageChainError

logger = logging.getLogger("pgstagechain.cli")

COMMANDS: dict[str, Callable[[argparse.Namespace], Any]] = {}


def load_pipeline(spec: str) -> Pipeline:
    """Import ``module:attribute`` and return the pipeline it names."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise SystemExit(f"error: expected MODULE:PIPELINE, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"error: cannot import {module_name!r}: {exc}") from None
    try:
        found = getattr(module, attribute)
    except AttributeError:
        raise SystemExit(f"error: module {module_name!r} has no attribute {attribute!r}") from None
    if callable(found) and not isinstance(found, Pipeline):
        found = found()
    if not isinstance(found, Pipeline):
        raise SystemExit(f"error: {spec} is a {type(found).__name__}, not a pgstagechain Pipeline")
    return found


def _dsn(args: argparse.Namespace) -> str:
    return str(args.dsn if args.dsn is not None else os.environ.get("PGSTAGECHAIN_DSN", ""))


def command(
    name: str,
) -> Callable[[Callable[[argparse.Namespace], Any]], Callable[[argparse.Namespace], Any]]:
    def register(func: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], Any]:
        COMMANDS[name] = func
        return func

    return register


@command("migrate")
def _migrate(args: argparse.Namespace) -> int:
    pipelines = [load_pipeline(spec) for spec in args.pipelines]
    applied = anyio.run(migrate, _dsn(args), *pipelines)
    print(
        f"schema: {'applied migration(s) ' + ', '.join(map(str, applied)) if applied else 'up to date'}"
    )
    for pipeline in pipelines:
        print(
            f"pipeline {pipeline.name}: trigger installed on {pipeline.table.schema}.{pipeline.table.table}"
        )
    return 0


@command("uninstall")
def _uninstall(args: argparse.Namespace) -> int:
    pipeline = load_pipeline(args.pipeline)

    async def run() -> None:
        async with await connect(_dsn(args), autocommit=True) as conn:
            await uninstall(conn, pipeline, purge=args.purge)

    anyio.run(run)
    print(f"pipeline {pipeline.name}: uninstalled{' and its history purged' if args.purge else ''}")
    return 0


@command("recover")
def _recover(args: argparse.Namespace) -> int:
    scanner = RecoveryScanner(load_pipeline(args.pipeline), _dsn(args))
    report = anyio.run(lambda: scanner.scan(deep=args.deep))
    print(
        f"expired leases closed: {report.expired_leases}\n"
        f"rows re-announced: {report.renotified_rows}\n"
        f"groups re-announced: {report.renotified_groups}\n"
        f"groups formed (deep): {report.formed_groups}\n"
        f"next retry due: {report.next_retry_at or '-'}"
    )
    return 0


@command("worker")
def _worker(args: argparse.Namespace) -> int:
    pipeline = load_pipeline(args.pipeline)
    worker = Worker(
        pipeline,
        _dsn(args),
        stages=args.stages.split(",") if args.stages else None,
        concurrency=args.concurrency,
        lease=args.lease,
        scan_interval=args.scan_interval,
        shutdown_timeout=args.shutdown_timeout,
        listen=not args.poll,
        poll_interval=args.poll_interval,
        worker_id=args.worker_id,
    )
    logger.info("starting %s", describe(worker))

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_signals, worker, tg.cancel_scope)
            await worker.run()
            tg.cancel_scope.cancel()

    anyio.run(run)
    logger.info("worker %s stopped: %s", worker.worker_id, worker.stats)
    return 0


async def _signals(worker: Worker, scope: anyio.CancelScope) -> None:
    """SIGTERM or a first SIGINT drain gracefully; a second SIGINT stops at once."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
        stopping = False
        async for signum in received:
            if stopping and signum == signal.SIGINT:
                logger.warning("second interrupt: stopping now")
                scope.cancel()
                return
            stopping = True
            logger.info("%s: finishing in-flight runs, then stopping", signal.Signals(signum).name)
            worker.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgstagechain", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dsn", help="connection string (default: $PGSTAGECHAIN_DSN or libpq defaults)"
    )
    parser.add_argument(
        "--log-level", default="INFO", help="DEBUG, INFO, WARNING, ... (default INFO)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("migrate", help="install or upgrade the schema and the pipelines' triggers")
    p.add_argument("pipelines", nargs="*", metavar="MODULE:PIPELINE")

    p = sub.add_parser("uninstall", help="remove what migrate installed for a pipeline")
    p.add_argument("pipeline", metavar="MODULE:PIPELINE")
    p.add_argument("--purge", action="store_true", help="also delete its run history")

    p = sub.add_parser("recover", help="re-drive stuck rows and close expired leases, once")
    p.add_argument("pipeline", metavar="MODULE:PIPELINE")
    p.add_argument("--deep", action="store_true", help="also form groups missed while uninstalled")

    p = sub.add_parser("worker", help="run a worker until SIGTERM / Ctrl-C")
    p.add_argument("pipeline", metavar="MODULE:PIPELINE")
    p.add_argument("--stages", help="comma-separated stages to serve (default: all)")
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--lease", type=float, default=30.0, help="seconds (default 30)")
    p.add_argument("--scan-interval", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds (default 30)")
    p.add_argument("--poll", action="store_true", help="poll-only mode (behind pgbouncer)")
    p.add_argument("--poll-interval", type=float, default=1.0)
    p.add_argument("--worker-id")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(COMMANDS[args.command](args) or 0)
    except PgStageChainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc} (database {redact(_dsn(args))})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
