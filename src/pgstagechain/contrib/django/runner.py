"""Running the configured pipelines' workers from Django code: the worker command, and
``run_until_idle`` for tests and scripts. Both leave no ORM connection open behind them."""

from __future__ import annotations

from typing import Any

from asgiref.sync import async_to_sync, sync_to_async
from django.core.management.base import CommandError  # type: ignore[import-untyped]
from django.db import connections  # type: ignore[import-untyped]

from ... import Worker, WorkerStats
from ...errors import NotInstalledError, PgStageChainError, found_in
from .conf import conninfo
from .conf import pipelines as configured_pipelines
from .conf import worker_options as configured_options

#: What to run in a Django project when the database side is missing or out of date.
MIGRATE_ADVICE = (
    "run `python manage.py migrate` (it installs pgstagechain's schema and the pipelines' "
    "triggers) or `python manage.py pgstagechain_migrate`"
)


async def close_orm_connections() -> None:
    """Close the Django connections that ``async def`` stages opened through the ORM.

    The async ORM runs its queries in asgiref's thread for thread-sensitive code; Django
    closes connections at the end of a request, but a worker has no requests: without
    this, that thread keeps its connection for ever (and ``manage.py test`` cannot drop
    the test database).
    """
    await sync_to_async(connections.close_all)()


def command_error(exc: BaseException) -> CommandError | None:
    """A clean :class:`CommandError` for a pgstagechain error, with Django's own advice."""
    found = _library_error(exc)
    if found is None:
        return None
    message = str(found)
    if isinstance(found, NotInstalledError):
        message = f"{message.split(': run ', 1)[0]}: {MIGRATE_ADVICE}"
    return CommandError(message)


def _library_error(exc: BaseException) -> PgStageChainError | None:
    found = found_in(exc, (PgStageChainError,))
    return found if isinstance(found, PgStageChainError) else None


def run_until_idle(
    names: list[str] | None = None, *, database: str | None = None, **worker_options: Any
) -> list[WorkerStats]:
    """Run a worker for each configured pipeline (or those ``names``) until nothing is
    left to do; return their stats. For tests and scripts.

    The event loop runs under asgiref's ``async_to_sync``, so the ORM calls of ``async
    def`` stages run in this thread, on the connection Django manages here (a test case
    closes it as usual).
    """
    chosen = configured_pipelines(names)
    dsn = conninfo(database)

    async def main() -> list[WorkerStats]:
        try:
            return [
                await Worker(
                    pipeline, dsn, **{**configured_options(), **worker_options}
                ).run_until_idle()
                for pipeline in chosen
            ]
        finally:
            await close_orm_connections()

    try:
        stats: list[WorkerStats] = async_to_sync(main)()
    except Exception as exc:
        error = command_error(exc)
        if error is None:
            raise
        raise error from None
    return stats
