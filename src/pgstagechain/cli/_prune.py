"""``pgstagechain prune``: delete finished runs past their window, through
:func:`pgstagechain.admin.prune`."""

from __future__ import annotations

import argparse
from typing import Any

import anyio

from .. import admin
from .._connect import connect
from .._retention import format_age, parse_age
from ._common import dsn, load_pipeline


def _prune(args: argparse.Namespace) -> int:
    older_than = parse_age(args.older_than, "--older-than") if args.older_than else None
    failed_older_than = (
        parse_age(args.failed_older_than, "--failed-older-than") if args.failed_older_than else None
    )
    pipeline = load_pipeline(args.pipeline)

    async def run() -> admin.PruneReport:
        async with await connect(dsn(args), autocommit=True) as conn:
            return await admin.prune(
                conn,
                pipeline,
                older_than=older_than,
                failed_older_than=failed_older_than,
                dry_run=args.dry_run,
            )

    found = anyio.run(run)
    states = ", ".join(f"{n} {state}" for state, n in found.by_state.items()) or "none"
    verb = "would delete" if found.dry_run else "deleted"
    print(
        f"{verb} {found.total} run(s) of pipeline {pipeline.name} ({states}); "
        f"older than {format_age(found.succeeded_older_than)} (succeeded), "
        f"{format_age(found.failed_older_than)} (others)"
    )
    return 0


def register(sub: Any) -> None:
    """Add prune to the command line."""
    p = sub.add_parser(
        "prune",
        help="delete finished runs past their window (what rows in flight read is kept)",
    )
    p.add_argument("pipeline", metavar="MODULE:PIPELINE")
    p.add_argument(
        "--older-than",
        metavar="AGE",
        help="delete runs that succeeded this long ago: 90s, 15m, 12h, 30d, 2w "
        "(default: the pipeline's Retention)",
    )
    p.add_argument(
        "--failed-older-than",
        metavar="AGE",
        help="the same for runs that did not succeed and runs of rows that failed for good "
        "(default: the pipeline's, or --older-than if that is longer)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="delete nothing; say how many runs would go"
    )
    p.set_defaults(run=_prune)
