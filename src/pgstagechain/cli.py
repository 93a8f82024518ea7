"""The ``pgstagechain`` command: install, run and repair pipelines from the shell.

A pipeline is named as ``module.path:attribute`` (the attribute is a
:class:`~pgstagechain.Pipeline` or a function returning one). The database comes from
``--dsn``, else the ``PGSTAGECHAIN_DSN`` environment variable, else libpq's defaults
(``PGHOST``, ``PGDATABASE``, ...).

Exit status (see :data:`EXIT_OK` and the others): 0 done; 1 a ``retry`` or ``cancel``
named a row or group that was not in a state to act on; 2 a usage, configuration or
database error, printed as one line on stderr; 70 an unexpected failure, with its
traceback; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import anyio
import attrs
import psycopg
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from . import _admin
from ._connect import connect, redact
from ._gc import tune_gc
from ._install import migrate, uninstall
from ._logging import JsonFormatter
from ._pipeline import Pipeline
from ._recovery import RecoveryScanner
from ._worker import Worker, describe
from .errors import ConfigurationError, PgStageChainError

logger = logging.getLogger("pgstagechain.cli")

#: Everything asked for was done.
EXIT_OK = 0
#: ``retry`` or ``cancel`` named a row or group that was not failed / in progress.
EXIT_NOTHING_MATCHED = 1
#: Bad usage, a pipeline that cannot be loaded, a configuration or database error.
EXIT_ERROR = 2
#: An unexpected exception (a bug, or one raised while importing the pipeline's module),
#: printed with its traceback: kept apart from 1 so scripts never mistake it for "nothing matched".
EXIT_INTERNAL = 70
#: Stopped by Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130

DESCRIPTION = "Install, run and repair pgstagechain pipelines from the shell."
EPILOG = """\
MODULE:PIPELINE names a Pipeline like uvicorn names an app: myapp.pipelines:feedly
imports myapp.pipelines (the current directory is on the path) and takes its
attribute feedly, a Pipeline or a function returning one.

The database is --dsn, else $PGSTAGECHAIN_DSN, else libpq's defaults (PGHOST,
PGDATABASE, PGUSER, ~/.pgpass, ...).

exit status:
  0    done
  1    retry or cancel named a row or group that was not failed / in progress
  2    usage, configuration or database error (one line on stderr)
  70   unexpected failure, printed with its traceback
  130  interrupted
"""

COMMANDS: dict[str, Callable[[argparse.Namespace], Any]] = {}


class UsageError(ConfigurationError):
    """The command line names something that cannot be used (exit status 2)."""


def load_pipeline(spec: str) -> Pipeline:
    """Import ``module:attribute`` and return the pipeline it names.

    Raises :class:`UsageError` (a :class:`~pgstagechain.errors.ConfigurationError`) when
    the name is malformed, the module cannot be imported or the attribute is not a pipeline.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"expected MODULE:PIPELINE (like myapp.pipelines:pipeline), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from None
    try:
        found = getattr(module, attribute)
    except AttributeError:
        raise UsageError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if callable(found) and not isinstance(found, Pipeline):
        found = found()
    if not isinstance(found, Pipeline):
        raise UsageError(f"{spec} is a {type(found).__name__}, not a pgstagechain Pipeline")
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
    applied = anyio.run(partial(migrate, backfill=args.backfill), _dsn(args), *pipelines)
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
        f"rows no run held, run again: {report.unheld_repaired}\n"
        f"rows re-announced: {report.renotified_rows}\n"
        f"groups re-announced: {report.renotified_groups}\n"
        f"groups formed (deep): {report.formed_groups}\n"
        f"next retry due: {report.next_retry_at or '-'}"
    )
    return 0


@command("worker")
def _worker(args: argparse.Namespace) -> int:
    pipeline = load_pipeline(args.pipeline)
    metrics = None
    if args.metrics_port is not None:
        from .metrics import Metrics

        metrics = Metrics(pipeline)
        server = metrics.serve(args.metrics_port, args.metrics_addr)
        logger.info(
            "serving Prometheus metrics on http://%s:%s/metrics",
            args.metrics_addr,
            getattr(server, "server_port", args.metrics_port),
        )
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
        observer=metrics,
    )
    logger.info("starting %s", describe(worker))
    tune_gc()

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_signals, worker, tg.cancel_scope)
            if metrics is not None:
                tg.start_soon(metrics.watch, worker, args.metrics_interval)
            await worker.run()
            tg.cancel_scope.cancel()

    anyio.run(run)
    logger.info("worker %s stopped: %s", worker.worker_id, worker.stats)
    return 0


# -- status, inspect, retry, cancel ------------------------------------------------------------


def _console() -> Console:
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))
    return console


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f}ms"
    if value < 60:
        return f"{value:.1f}s"
    if value < 3600:
        return f"{int(value // 60)}m{int(value % 60):02d}s"
    return f"{int(value // 3600)}h{int(value % 3600 // 60):02d}m"


def _age(value: dt.timedelta | None) -> str:
    return "-" if value is None else _seconds(value.total_seconds())


def status_table(
    pipeline: Pipeline, rows: Sequence[_admin.StageStatus], *, bars: bool = False
) -> Table:
    """The ``status`` table; with ``bars`` a progress column (done out of all seen)."""
    table = Table(
        title=f"pipeline {pipeline.name} on {pipeline.table.schema}.{pipeline.table.table}"
    )
    table.add_column("stage")
    table.add_column("level")
    for name in ("waiting", "running", "done", "failed"):
        table.add_column(name, justify="right")
    table.add_column("oldest waiting", justify="right")
    table.add_column("p50 (1h)", justify="right")
    table.add_column("p95 (1h)", justify="right")
    table.add_column("runs (1h)", justify="right")
    if bars:
        table.add_column("progress", width=24)
    for each in rows:
        running = str(each.running)
        if each.retrying:
            running += f" ({each.retrying} retrying)"
        cells: list[Any] = [
            each.stage,
            "group" if each.group else "row",
            str(each.waiting),
            running,
            str(each.done),
            Text(str(each.failed), style="bold red" if each.failed else ""),
            _age(each.oldest_waiting),
            _seconds(each.p50_seconds),
            _seconds(each.p95_seconds),
            str(each.runs_last_hour),
        ]
        if bars:
            cells.append(ProgressBar(total=max(each.total, 1), completed=each.done, width=24))
        table.add_row(*cells)
    return table


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value


def _to_json(obj: Any) -> Any:
    return attrs.asdict(obj, value_serializer=lambda _i, _a, v: _jsonable(v))


@command("status")
def _status(args: argparse.Namespace) -> int:
    pipeline = load_pipeline(args.pipeline)
    console = _console()

    async def once() -> list[_admin.StageStatus]:
        async with await connect(_dsn(args), autocommit=True) as conn:
            return await _admin.status(conn, pipeline)

    async def watch() -> None:
        async with await connect(_dsn(args), autocommit=True) as conn:
            if console.is_terminal:
                with Live(console=console, auto_refresh=False) as live:
                    while True:
                        found = await _admin.status(conn, pipeline)
                        stamp = Text(f"{dt.datetime.now():%H:%M:%S}  Ctrl-C to stop", style="dim")
                        live.update(
                            Group(status_table(pipeline, found, bars=True), stamp), refresh=True
                        )
                        await anyio.sleep(args.interval)
            while True:  # not a terminal: one table per interval, for logs
                found = await _admin.status(conn, pipeline)
                console.print(f"{dt.datetime.now():%Y-%m-%d %H:%M:%S}")
                console.print(status_table(pipeline, found, bars=True))
                console.file.flush()
                await anyio.sleep(args.interval)

    if args.watch:
        with contextlib.suppress(KeyboardInterrupt):
            anyio.run(watch)
        return 0
    found = anyio.run(once)
    if args.json:
        print(json.dumps([_to_json(s) | {"total": s.total} for s in found], indent=2))
    else:
        console.print(status_table(pipeline, found))
    return 0


def _short(text: str | None, limit: int = 80) -> str:
    if not text:
        return ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else ""
    return last if len(last) <= limit else last[: limit - 1] + "…"


def runs_table(title: str, runs: Sequence[_admin.RunRecord]) -> Table:
    table = Table(title=title)
    for name in ("run", "stage", "attempt", "state", "worker", "started", "took"):
        table.add_column(name, justify="right" if name in ("run", "attempt", "took") else "left")
    table.add_column("retry at")
    table.add_column("error / result", overflow="fold")
    for run in runs:
        detail = _short(run.error) if run.error else ""
        if run.result is not None:
            shown = json.dumps(run.result)
            detail = (detail + "  " if detail else "") + (
                shown if len(shown) <= 80 else shown[:79] + "…"
            )
        style = {"failed": "red", "expired": "yellow", "cancelled": "magenta"}.get(run.state, "")
        table.add_row(
            str(run.id),
            run.stage,
            str(run.attempt),
            Text(run.state, style=style),
            run.worker_id,
            f"{run.started_at.astimezone():%Y-%m-%d %H:%M:%S}",
            _seconds(run.seconds),
            f"{run.retry_at.astimezone():%H:%M:%S}" if run.retry_at else "",
            detail,
        )
    return table


@command("inspect")
def _inspect(args: argparse.Namespace) -> int:
    pipeline = load_pipeline(args.pipeline)

    async def fetch() -> _admin.History:
        async with await connect(_dsn(args), autocommit=True) as conn:
            return await _admin.history(conn, pipeline, args.key, group=args.group)

    found = anyio.run(fetch)
    if args.json:
        print(json.dumps(_to_json(found), indent=2, default=str))
        return 0
    console = _console()
    what = "group" if found.group else "row"
    where = f"({found.step}, {found.status})" if found.step is not None else "(no position)"
    console.print(f"{what} {found.key} of pipeline {pipeline.name}: {where}", highlight=False)
    if not found.group and found.group_key is not None:
        group_where = (
            f"({found.group_step}, {found.group_status})"
            if found.group_step is not None
            else "not formed yet"
        )
        console.print(f"group {found.group_key}: {group_where}", highlight=False)
    console.print(runs_table(f"runs of {what} {found.key}", found.runs))
    if found.group_runs:
        console.print(runs_table(f"runs of group {found.group_key}", found.group_runs))
    if not args.brief:
        for run in (*found.runs, *found.group_runs):
            if run.error and "\n" in run.error.strip():
                console.rule(f"run {run.id}: {run.stage}, attempt {run.attempt}, {run.state}")
                console.print(run.error.rstrip(), highlight=False, markup=False)
    return 0


def _target(args: argparse.Namespace) -> str:
    if args.key is not None:
        return f"row {args.key}"
    if args.group is not None:
        return f"group {args.group}"
    return f"stage {args.stage}"


async def _why_not(args: argparse.Namespace, pipeline: Pipeline, conn: Any, wanted: str) -> str:
    """Explain why a named row or group was left alone."""
    key = args.key if args.key is not None else args.group
    try:
        found = await _admin.history(conn, pipeline, key, group=args.group is not None)
    except PgStageChainError as exc:
        return str(exc)
    if found.step is None:
        return f"{_target(args)} has no position (its group has not formed)"
    return f"{_target(args)} is at ({found.step}, {found.status}), not {wanted}"


def _keys(keys: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


@command("retry")
def _retry(args: argparse.Namespace) -> int:
    if args.stage is not None and not args.all_failed:
        raise UsageError("--stage needs --all-failed (retry every failed row of that stage)")
    pipeline = load_pipeline(args.pipeline)

    async def run() -> tuple[list[str], str]:
        async with await connect(_dsn(args), autocommit=True) as conn:
            keys = await _admin.retry(
                conn, pipeline, key=args.key, group=args.group, stage=args.stage
            )
            why = "" if keys or args.stage else await _why_not(args, pipeline, conn, "failed")
            return keys, why

    keys, why = anyio.run(run)
    if why:
        print(f"error: nothing to retry: {why}", file=sys.stderr)
        return EXIT_NOTHING_MATCHED
    level = (
        "group(s)"
        if args.group is not None or (args.stage is not None and pipeline[args.stage].group)
        else "row(s)"
    )
    if not keys:
        print(f"no failed {level} at {_target(args)}")
        return 0
    print(f"retrying {len(keys)} {level} of pipeline {pipeline.name}: {_keys(keys)}")
    return 0


@command("cancel")
def _cancel(args: argparse.Namespace) -> int:
    pipeline = load_pipeline(args.pipeline)

    async def run() -> tuple[_admin.CancelReport, str]:
        async with await connect(_dsn(args), autocommit=True) as conn:
            report = await _admin.cancel(
                conn, pipeline, key=args.key, group=args.group, stage=args.stage
            )
            why = (
                ""
                if report.keys or args.stage
                else await _why_not(args, pipeline, conn, "in progress")
            )
            return report, why

    report, why = anyio.run(run)
    if why:
        print(f"error: nothing to cancel: {why}", file=sys.stderr)
        return EXIT_NOTHING_MATCHED
    if not report.keys:
        print(f"nothing in progress at {_target(args)}")
        return 0
    print(
        f"cancelled {len(report.keys)} of pipeline {pipeline.name}: {_keys(list(report.keys))} "
        f"({report.runs_closed} running run(s) closed, {report.retries_dropped} pending "
        f"retr{'y' if report.retries_dropped == 1 else 'ies'} dropped)"
    )
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
    parser = argparse.ArgumentParser(
        prog="pgstagechain",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dsn", help="connection string (default: $PGSTAGECHAIN_DSN or libpq defaults)"
    )
    parser.add_argument(
        "--log-level", default="INFO", help="DEBUG, INFO, WARNING, ... (default INFO)"
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="json: one JSON object a line, with the run's pipeline, stage, key and attempt",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("migrate", help="install or upgrade the schema and the pipelines' triggers")
    p.add_argument("pipelines", nargs="*", metavar="MODULE:PIPELINE")
    p.add_argument(
        "--backfill",
        action=argparse.BooleanOptionalAction,
        help="a stage added after the last one: run it on rows already finished there "
        "(--backfill) or only on rows that get there from now on (--no-backfill)",
    )

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
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on this port (needs pgstagechain[metrics])",
    )
    p.add_argument("--metrics-addr", default="0.0.0.0", help="address for --metrics-port")
    p.add_argument(
        "--metrics-interval", type=float, default=5.0, help="seconds between samples (default 5)"
    )

    p = sub.add_parser("status", help="per-stage counts, oldest waiting age, recent durations")
    p.add_argument("pipeline", metavar="MODULE:PIPELINE")
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("inspect", help="a row's (or group's) position and full run history")
    p.add_argument("pipeline", metavar="MODULE:PIPELINE")
    p.add_argument("key", metavar="KEY")
    p.add_argument("--group", action="store_true", help="KEY is a group key")
    p.add_argument("--brief", action="store_true", help="omit full error tracebacks")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")

    p = sub.add_parser("retry", help="run the stage a failed row (or group) stopped at again")
    p.add_argument("pipeline", metavar="MODULE:PIPELINE")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--key", help="one row")
    which.add_argument("--group", help="one group")
    which.add_argument("--stage", help="every failed row (or group) of a stage, with --all-failed")
    p.add_argument("--all-failed", action="store_true")

    p = sub.add_parser("cancel", help="stop rows in progress: fail them, drop pending retries")
    p.add_argument("pipeline", metavar="MODULE:PIPELINE")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--key", help="one row")
    which.add_argument("--group", help="one group")
    which.add_argument("--stage", help="every row (or group) in progress at a stage")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; errors become one line on stderr and the exit status above."""
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if args.log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    try:
        return int(COMMANDS[args.command](args) or EXIT_OK)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        cause = _known_error(exc)
        if cause is None:
            traceback.print_exc()
            return EXIT_INTERNAL
        message = _one_line(str(cause)) or type(cause).__name__
        if isinstance(cause, psycopg.Error):
            message += f" ({_where(args)})"
        print(f"error: {message}", file=sys.stderr)
        return EXIT_ERROR


def _one_line(text: str) -> str:
    """A multi-line message (libpq adds hints on lines of their own) as one line."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _where(args: argparse.Namespace) -> str:
    """Which database a connection error is about, never with its password."""
    dsn = _dsn(args)
    if dsn:
        return f"database {redact(dsn)}"
    chosen = [f"{k}={os.environ[k]}" for k in LIBPQ_ENV if os.environ.get(k)]
    return "no --dsn or PGSTAGECHAIN_DSN given; libpq defaults" + (
        f" with {' '.join(chosen)}" if chosen else ""
    )


#: The libpq environment variables worth naming in an error (never PGPASSWORD).
LIBPQ_ENV = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")


def _known_error(exc: BaseException) -> BaseException | None:
    """The library or database error behind ``exc``, looking inside task-group wrappers."""
    if isinstance(exc, (PgStageChainError, OSError, psycopg.Error)):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _known_error(inner)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    raise SystemExit(main())
