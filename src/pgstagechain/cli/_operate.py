"""Commands that look at and repair a pipeline: status, inspect, retry, cancel, all
through :mod:`pgstagechain.admin`."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import sys
from collections.abc import Sequence
from typing import Any

import anyio
import attrs
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .. import PgStageChainError, Pipeline, admin
from .._connect import connect
from ._common import EXIT_NOTHING_MATCHED, UsageError, dsn, load_pipeline, shown_keys


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


def _window(seconds: float) -> str:
    """A status window as a column heading: 1h, 15m, 90s."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def status_table(pipeline: Pipeline, found: admin.PipelineStatus, *, bars: bool = False) -> Table:
    """The ``status`` table; with ``bars`` a progress column (done out of all seen)."""
    table = Table(title=f"pipeline {pipeline.name} on {found.table}")
    table.add_column("stage")
    table.add_column("level")
    for name in ("waiting", "running", "done", "failed"):
        table.add_column(name, justify="right")
    table.add_column("oldest waiting", justify="right")
    window = _window(found.window_seconds)
    for name in ("p50", "p95", "runs"):
        table.add_column(f"{name} ({window})", justify="right")
    limited = any(each.limits is not None for each in found.stages)
    if limited:
        table.add_column("limits")
    if bars:
        table.add_column("progress", width=24)
    for each in found.stages:
        running = str(each.running)
        if each.retrying:
            running += f" ({each.retrying} retrying)"
        age = each.oldest_waiting
        waiting = str(each.waiting) + (f" ({each.stalled} stalled)" if each.stalled else "")
        done = str(each.done) + (f" ({each.partial} partial)" if each.partial else "")
        cells: list[Any] = [
            each.stage,
            "group" if each.group else "row",
            Text(waiting, style="bold red" if each.stalled else ""),
            running,
            done,
            Text(str(each.failed), style="bold red" if each.failed else ""),
            _seconds(None if age is None else age.total_seconds()),
            _seconds(each.runs.p50_seconds),
            _seconds(each.runs.p95_seconds),
            str(each.runs.total),
        ]
        if limited:
            cells.append(each.limits.describe() if each.limits is not None else "")
        if bars:
            cells.append(ProgressBar(total=max(each.total, 1), completed=each.done, width=24))
        table.add_row(*cells)
    return table


def issues_table(issues: Sequence[admin.GroupIssue]) -> Table:
    """Groups held up, or formed without some members, by members that failed for good."""
    table = Table(title="groups with members failed for good")
    for name in ("group", "stage", "fan-in", "state"):
        table.add_column(name)
    table.add_column("reason", overflow="fold")
    for each in issues:
        style = {"stalled": "bold red", "failed": "red", "partial": "yellow"}.get(each.state, "")
        table.add_row(
            each.group_key, each.stage, each.fan_in, Text(each.state, style=style), each.reason
        )
    return table


def _status(args: argparse.Namespace) -> int:
    pipeline = load_pipeline(args.pipeline)
    console = _console()

    async def once() -> admin.PipelineStatus:
        async with await connect(dsn(args), autocommit=True) as conn:
            return await admin.status(conn, pipeline)

    async def once_with_issues() -> tuple[admin.PipelineStatus, list[admin.GroupIssue]]:
        async with await connect(dsn(args), autocommit=True) as conn:
            found = await admin.status(conn, pipeline)
            held = [s for s in found.stages if s.stalled or s.partial]
            return found, (await admin.group_issues(conn, pipeline))[:20] if held else []

    async def watch() -> None:
        async with await connect(dsn(args), autocommit=True) as conn:
            if console.is_terminal:
                with Live(console=console, auto_refresh=False) as live:
                    while True:
                        found = await admin.status(conn, pipeline)
                        stamp = Text(f"{dt.datetime.now():%H:%M:%S}  Ctrl-C to stop", style="dim")
                        live.update(
                            Group(status_table(pipeline, found, bars=True), stamp), refresh=True
                        )
                        await anyio.sleep(args.interval)
            while True:  # not a terminal: one table per interval, for logs
                found = await admin.status(conn, pipeline)
                console.print(f"{dt.datetime.now():%Y-%m-%d %H:%M:%S}")
                console.print(status_table(pipeline, found, bars=True))
                console.file.flush()
                await anyio.sleep(args.interval)

    if args.watch:
        with contextlib.suppress(KeyboardInterrupt):
            anyio.run(watch)
        return 0
    found, issues = anyio.run(once_with_issues)
    if args.json:
        print(json.dumps(found.to_json(), indent=2))
    else:
        console.print(status_table(pipeline, found))
        if issues:
            console.print(issues_table(issues))
    return 0


def _short(text: str | None, limit: int = 80) -> str:
    if not text:
        return ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else ""
    return last if len(last) <= limit else last[: limit - 1] + "…"


def runs_table(title: str, runs: Sequence[admin.RunRecord]) -> Table:
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
            if run.superseded_at is not None:
                detail += " (superseded by a re-run)"
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


def _inspect(args: argparse.Namespace) -> int:
    pipeline = load_pipeline(args.pipeline)

    async def fetch() -> admin.History:
        async with await connect(dsn(args), autocommit=True) as conn:
            return await admin.history(conn, pipeline, args.key, group=args.group)

    found = anyio.run(fetch)
    if args.json:
        iso = lambda _i, _a, v: v.isoformat() if isinstance(v, dt.datetime) else v  # noqa: E731
        print(json.dumps(attrs.asdict(found, value_serializer=iso), indent=2, default=str))
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
    if found.issue is not None:
        console.print(
            f"group {found.issue.group_key} is {found.issue.state}: {found.issue.reason}",
            highlight=False,
            markup=False,
        )
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
        found = await admin.history(conn, pipeline, key, group=args.group is not None)
    except PgStageChainError as exc:
        return str(exc)
    if found.step is None:
        return f"{_target(args)} has no position (its group has not formed)"
    return f"{_target(args)} is at ({found.step}, {found.status}), not {wanted}"


def _retry(args: argparse.Namespace) -> int:
    if args.stage is not None and not args.all_failed:
        raise UsageError("--stage needs --all-failed (retry every failed row of that stage)")
    pipeline = load_pipeline(args.pipeline)

    async def run() -> tuple[list[str], str]:
        async with await connect(dsn(args), autocommit=True) as conn:
            keys = await admin.retry(
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
    print(f"retrying {len(keys)} {level} of pipeline {pipeline.name}: {shown_keys(keys)}")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    pipeline = load_pipeline(args.pipeline)

    async def run() -> tuple[admin.CancelReport, str]:
        async with await connect(dsn(args), autocommit=True) as conn:
            report = await admin.cancel(
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
        f"cancelled {len(report.keys)} of pipeline {pipeline.name}: {shown_keys(list(report.keys))} "
        f"({report.runs_closed} running run(s) closed, {report.retries_dropped} pending "
        f"retr{'y' if report.retries_dropped == 1 else 'ies'} dropped)"
    )
    return 0


def register(sub: Any) -> None:
    """Add status, inspect, retry and cancel to the command line."""
    p = sub.add_parser("status", help="per-stage counts, oldest waiting age, recent durations")
    p.add_argument("pipeline", metavar="MODULE:PIPELINE")
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_status)

    p = sub.add_parser("inspect", help="a row's (or group's) position and full run history")
    p.add_argument("pipeline", metavar="MODULE:PIPELINE")
    p.add_argument("key", metavar="KEY")
    p.add_argument("--group", action="store_true", help="KEY is a group key")
    p.add_argument("--brief", action="store_true", help="omit full error tracebacks")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(run=_inspect)

    p = sub.add_parser("retry", help="run the stage a failed row (or group) stopped at again")
    p.add_argument("pipeline", metavar="MODULE:PIPELINE")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--key", help="one row")
    which.add_argument("--group", help="one group")
    which.add_argument("--stage", help="every failed row (or group) of a stage, with --all-failed")
    p.add_argument("--all-failed", action="store_true")
    p.set_defaults(run=_retry)

    p = sub.add_parser("cancel", help="stop rows in progress: fail them, drop pending retries")
    p.add_argument("pipeline", metavar="MODULE:PIPELINE")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--key", help="one row")
    which.add_argument("--group", help="one group")
    which.add_argument("--stage", help="every row (or group) in progress at a stage")
    p.set_defaults(run=_cancel)
