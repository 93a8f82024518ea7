"""``manage.py pgstagechain_migrate``: install the schema and the configured pipelines."""

from __future__ import annotations

from typing import Any

import anyio
from django.core.management.base import BaseCommand, CommandParser  # type: ignore[import-untyped]

from ....._install import migrate
from ... import conf


class Command(BaseCommand):  # type: ignore[misc]
    help = "Install or upgrade the pgstagechain schema and the configured pipelines' triggers."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "pipelines", nargs="*", metavar="PIPELINE", help="pipeline names (default: all)"
        )
        parser.add_argument("--database", help="DATABASES alias (default: PGSTAGECHAIN_DATABASE)")

    def handle(self, *args: Any, **options: Any) -> None:
        pipelines = conf.pipelines(options["pipelines"] or None)
        applied = anyio.run(migrate, conf.conninfo(options["database"]), *pipelines)
        if applied:
            self.stdout.write(f"schema: applied migration(s) {', '.join(map(str, applied))}")
        else:
            self.stdout.write("schema: up to date")
        for pipeline in pipelines:
            spec = pipeline.table
            self.stdout.write(
                f"pipeline {pipeline.name}: trigger installed on {spec.schema}.{spec.table}"
            )
