"""The Django app: installs pgstagechain after ``manage.py migrate`` has run."""

from __future__ import annotations

import sys
from typing import Any

import anyio
from django.apps import AppConfig  # type: ignore[import-untyped]
from django.db.models.signals import post_migrate  # type: ignore[import-untyped]

from ... import migrate
from . import conf


class PgStageChainConfig(AppConfig):  # type: ignore[misc]
    name = "pgstagechain.contrib.django"
    label = "pgstagechain"
    verbose_name = "pgstagechain"

    def ready(self) -> None:
        post_migrate.connect(install_after_migrate, sender=self)


def install_after_migrate(
    sender: AppConfig, *, using: str, verbosity: int = 1, stdout: Any = None, **_: Any
) -> None:
    """Bring the pgstagechain schema up to date and (re)install every configured pipeline.

    Runs after all apps' migrations, so the pipelines' tables exist; it is idempotent,
    so every ``migrate`` also updates triggers of pipelines whose stages changed.
    """
    if using != conf.database_alias() or not conf.migrate_on_migrate():
        return
    pipelines = conf.pipelines()
    applied = anyio.run(migrate, conf.conninfo(using), *pipelines)
    if verbosity >= 1 and (applied or pipelines):
        (stdout or sys.stdout).write(
            f"  pgstagechain: schema {'migrated to ' + str(max(applied)) if applied else 'up to date'}, "
            f"pipelines installed: {', '.join(p.name for p in pipelines) or 'none'}\n"
        )
