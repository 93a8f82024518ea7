"""``manage.py pgstagechain_migrate``: install the schema and the configured pipelines."""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

import anyio
from django.core.management.base import (  # type: ignore[import-untyped]
    BaseCommand,
    CommandError,
    CommandParser,
)

from ..... import ConfigurationError, GraphChangeError, migrate
from ....._install import migration_report
from ....._migration_plan import parse_maps
from ... import conf


class Command(BaseCommand):  # type: ignore[misc]
    help = "Install or upgrade the pgstagechain schema and the configured pipelines' triggers."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "pipelines", nargs="*", metavar="PIPELINE", help="pipeline names (default: all)"
        )
        parser.add_argument("--database", help="DATABASES alias (default: PGSTAGECHAIN_DATABASE)")
        parser.add_argument(
            "--backfill",
            action=argparse.BooleanOptionalAction,
            help="a stage added after the last one: run it on rows already finished there "
            "(--backfill) or only on rows that get there from now on (--no-backfill)",
        )
        parser.add_argument(
            "--plan",
            action="store_true",
            help="say what a changed stage graph does to rows in flight, and change nothing",
        )
        parser.add_argument(
            "--map",
            action="append",
            default=[],
            metavar="OLD=NEW",
            help="rows and groups at step OLD, which the new graph no longer has, go to step "
            "NEW (repeatable; one pipeline at a time)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        pipelines = conf.pipelines(options["pipelines"] or None)
        conninfo = conf.conninfo(options["database"])
        try:
            maps = parse_maps(options["map"])
            if options["plan"]:
                report = anyio.run(partial(migration_report, conninfo, *pipelines, maps=maps))
                self.stdout.write("\n".join(report))
                return
            install = partial(migrate, backfill=options["backfill"], maps=maps)
            applied = anyio.run(install, conninfo, *pipelines)
        except GraphChangeError as exc:  # the whole plan, then why it was refused
            raise CommandError("\n".join([*exc.plan.lines(), str(exc)])) from None
        except ConfigurationError as exc:  # rows in the way, a malformed --map, ...
            raise CommandError(str(exc)) from None
        if applied:
            self.stdout.write(f"schema: applied migration(s) {', '.join(map(str, applied))}")
        else:
            self.stdout.write("schema: up to date")
        for pipeline in pipelines:
            spec = pipeline.table
            self.stdout.write(
                f"pipeline {pipeline.name}: trigger installed on {spec.schema}.{spec.table}"
            )
