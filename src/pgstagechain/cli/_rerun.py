"""``pgstagechain rerun``: run a stage and every stage after it again for selected rows,
through :func:`pgstagechain.admin.rerun`."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Sequence
from typing import Any

import anyio

from .. import Pipeline, admin
from .._connect import connect
from .._retention import parse_age
from ..errors import ConfigurationError
from ._common import EXIT_NOTHING_MATCHED, UsageError, dsn, load_pipeline, shown_keys


def when(text: str) -> dt.datetime:
    """``--since``/``--until``: an ISO 8601 time (local time unless it names a zone), or an
    age such as ``30m``, ``2h``, ``7d`` (that long ago)."""
    value = text.strip()
    try:
        found = dt.datetime.fromisoformat(value)
    except ValueError:
        try:
            return dt.datetime.now(dt.UTC) - parse_age(value)
        except ConfigurationError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is neither an ISO 8601 time nor an age like 30m, 2h, 7d"
            ) from None
    return found if found.tzinfo is not None else found.astimezone()


def _key_list(args: argparse.Namespace) -> list[str] | None:
    """``--keys K1,K2`` and ``--keys-file PATH`` (``-``: stdin): one key a line, or
    separated by commas or spaces."""
    if args.keys is None and args.keys_file is None:
        return None
    text = args.keys or ""
    if args.keys_file is not None:
        if args.keys_file == "-":
            text += "\n" + sys.stdin.read()
        else:
            try:
                with open(args.keys_file, encoding="utf-8") as source:
                    text += "\n" + source.read()
            except OSError as exc:
                raise UsageError(f"cannot read --keys-file {args.keys_file}: {exc}") from None
    keys = [k for k in text.replace(",", " ").split() if k]
    if not keys:
        raise UsageError("--keys / --keys-file name no key")
    return keys


def _counted(what: str, keys: Sequence[str]) -> str:
    return f"{len(keys)} {what}{'' if len(keys) == 1 else 's'}"


def rerun_summary(pipeline: Pipeline, report: admin.RerunReport) -> list[str]:
    """What a re-run did (or would do), a few lines for people."""
    level = "group" if report.group else "row"
    verb = "would re-run" if report.dry_run else "re-ran"
    lines = [
        f"{'dry run, nothing changed: ' if report.dry_run else ''}{verb} stage {report.stage} "
        f"and the stages after it for {_counted(level, report.keys)} of pipeline "
        f"{pipeline.name} (back to ({report.after}, done))"
        + (f": {shown_keys(list(report.keys))}" if report.keys else "")
    ]
    if report.in_flight:
        lines.append(
            f"  in flight, {'to be ' if report.dry_run else ''}cancelled first: "
            f"{_counted(level, report.in_flight)}: {shown_keys(list(report.in_flight))}"
        )
    if report.runs_cancelled or report.retries_dropped:
        lines.append(
            f"  runs {'to be ' if report.dry_run else ''}cancelled (rows and groups): "
            f"{report.runs_cancelled} running, {report.retries_dropped} pending "
            f"retr{'y' if report.retries_dropped == 1 else 'ies'}"
        )
    for reason, keys in report.skipped.items():
        lines.append(
            f"  skipped, {admin.SKIP_REASONS[reason]}: {len(keys)}: {shown_keys(list(keys))}"
        )
    if report.groups:
        lines.append(
            f"  groups: {len(report.groups)} {'to be ' if report.dry_run else ''}taken apart, "
            "each forms again once its re-run members are back"
            + (
                f"; {len(report.groups_stopped)} of them had a group stage at work or about "
                f"to start, {'to be ' if report.dry_run else ''}stopped: "
                f"{shown_keys(list(report.groups_stopped))}"
                if report.groups_stopped
                else ""
            )
        )
    return lines


def _rerun(args: argparse.Namespace) -> int:
    pipeline = load_pipeline(args.pipeline)
    keys = _key_list(args)

    async def run() -> admin.RerunReport:
        async with await connect(dsn(args), autocommit=True) as conn:
            return await admin.rerun(
                conn,
                pipeline,
                stage=args.stage,
                keys=keys,
                groups=args.group,
                status=args.status,
                since=args.since,
                until=args.until,
                all_rows=args.all,
                in_flight="skip" if args.skip_in_flight else "cancel",
                dry_run=args.dry_run,
                batch_size=args.batch_size,
            )

    report = anyio.run(run)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for line in rerun_summary(pipeline, report):
            print(line)
    if not report.keys:
        print(
            "error: nothing to re-run: the selection has no row at that stage or after it",
            file=sys.stderr,
        )
        return EXIT_NOTHING_MATCHED
    return 0


def register(sub: Any) -> None:
    """Add rerun to the command line."""
    p = sub.add_parser(
        "rerun",
        help="run a stage and every stage after it again for selected rows (a backfill)",
        description="Put the selected rows (groups, for a group stage) back to (the step "
        "before STAGE, done): STAGE and every stage after it run again; earlier runs stay in "
        "the history. The filters combine (all must hold).",
    )
    p.add_argument("pipeline", metavar="MODULE:PIPELINE")
    p.add_argument("--stage", required=True, help="the first stage to run again")
    p.add_argument("--keys", help="row keys (group keys for a group stage), comma separated")
    p.add_argument("--keys-file", metavar="PATH", help="more keys, one a line; - reads stdin")
    p.add_argument(
        "--group",
        action="append",
        help="rows of this group (repeat for more; a group stage: that group)",
    )
    p.add_argument("--status", help="rows whose status is this now (done, failed, running)")
    p.add_argument(
        "--since",
        type=when,
        help="rows whose run of STAGE started at or after TIME (ISO 8601, or an age: 2h, 7d)",
    )
    p.add_argument("--until", type=when, help="... and before TIME")
    p.add_argument("--all", action="store_true", help="every row that reached STAGE")
    p.add_argument(
        "--skip-in-flight",
        action="store_true",
        help="leave rows with a live run or a pending retry at STAGE or after it (default: cancel that run)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="count what would be done; change nothing"
    )
    p.add_argument("--batch-size", type=int, default=500, help="rows per transaction (default 500)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=_rerun)
