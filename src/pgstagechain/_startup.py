"""A worker's start: the stages it serves and its settings checked, then the database
side checked, waiting out a database that is restarting but not one that refuses."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import anyio
import psycopg

from ._claim import Claimer, claimer_for
from ._connect import access_problem, redact
from ._install import require_installed
from ._links import DB_ERRORS, Link
from ._pipeline import Pipeline
from ._runs import WorkerStats
from ._stage import Stage
from .errors import ConfigurationError, DatabaseAccessError, StartupTimeoutError


def served_stages(pipeline: Pipeline, names: Iterable[str] | None) -> tuple[Stage, ...]:
    """The stages a worker is asked to serve (default: all), checked."""
    chosen = list(names) if names is not None else [s.name for s in pipeline]
    for name in chosen:
        if name not in pipeline:
            raise ConfigurationError(
                f"worker asked to serve unknown stage {name!r} of pipeline {pipeline.name!r}"
            )
    if not chosen:
        raise ConfigurationError("a worker must serve at least one stage")
    return tuple(pipeline[n] for n in chosen)


def check_settings(
    concurrency: int,
    batch_size: int,
    lease: float,
    pool_size: int | None,
    startup_timeout: float | None,
) -> None:
    if concurrency < 1 or batch_size < 1 or lease <= 0:
        raise ConfigurationError("concurrency, batch_size and lease must be positive")
    if pool_size is not None and pool_size < 1:
        raise ConfigurationError(f"pool_size must be at least 1, got {pool_size}")
    if startup_timeout is not None and startup_timeout <= 0:
        raise ConfigurationError(f"startup_timeout must be positive, got {startup_timeout}")


async def start_up(
    control: Link,
    pipeline: Pipeline,
    *,
    wait: float | None,
    stopping: Callable[[], bool],
    stats: WorkerStats,
) -> Claimer:
    """Connect and check the database side, waiting for the database (it may be
    restarting) up to ``wait`` seconds; a refusal for good ends the wait at once, as a
    library error."""
    last = ""
    try:
        with anyio.move_on_after(wait):
            while True:
                try:
                    conn = await control.get()
                    await require_installed(conn, pipeline)
                    claimer = await claimer_for(conn, pipeline)
                    await claimer.refresh_limits(conn, write=True)
                    return claimer
                except DB_ERRORS as exc:
                    if stopping():
                        raise
                    stats.db_errors += 1
                    last = str(exc).strip() or type(exc).__name__
                    await control.broke(exc)  # raises if refused for good
    except psycopg.Error as exc:
        await control.close()
        problem = access_problem(exc)
        if problem is None:
            raise
        raise DatabaseAccessError(problem, redact(control.conninfo)) from None
    except BaseException:
        await control.close()
        raise
    await control.close()
    assert wait is not None
    raise StartupTimeoutError(wait, redact(control.conninfo), last)
