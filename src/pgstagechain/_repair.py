"""Putting rows right by hand: ``retry`` and ``cancel``, public as :mod:`pgstagechain.admin`.

Both are single statements, so they race safely with running workers: a completion that
lands first wins (the row is no longer failed, or no longer running), and one that lands
after a cancel finds its run closed and is discarded.
"""

from __future__ import annotations

from typing import Any

import attrs
import psycopg
from psycopg import AsyncConnection

from ._catalog import inspect_table, statements_for
from ._install import require_installed
from ._pipeline import Pipeline
from ._sql import pipeline_params
from ._stage import Stage
from .errors import ConfigurationError

CANCEL_REASON = "cancelled by operator"


@attrs.frozen(kw_only=True)
class CancelReport:
    """What :func:`cancel` did."""

    keys: tuple[str, ...]
    runs_closed: int
    retries_dropped: int


async def bad_key(conn: AsyncConnection[Any], pipeline: Pipeline, key: str) -> ConfigurationError:
    """The error for a key the key column's type cannot hold."""
    info = await inspect_table(conn, pipeline)
    spec = pipeline.table
    return ConfigurationError(
        f"{key!r} is not a valid {info.key_type} for key column "
        f"{spec.schema}.{spec.table}.{spec.key}"
    )


def _selection(
    pipeline: Pipeline, key: str | None, group: str | None, stage: str | None
) -> tuple[bool, list[Stage]]:
    """Check that exactly one of key/group/stage is given; return (group level, stages)."""
    given = [n for n, v in (("key", key), ("group", group), ("stage", stage)) if v is not None]
    if len(given) != 1:
        raise ConfigurationError(
            f"name exactly one of key, group or stage (got {', '.join(given) or 'none'})"
        )
    if stage is not None:
        if stage not in pipeline:
            raise ConfigurationError(
                f"pipeline {pipeline.name!r} has no stage {stage!r} "
                f"(stages: {', '.join(s.name for s in pipeline)})"
            )
        target = pipeline[stage]
        return target.group, [target]
    if group is not None:
        if pipeline.table.group_column is None:
            raise ConfigurationError(f"pipeline {pipeline.name!r} has no group column")
        return True, [s for s in pipeline if s.group]
    return False, [s for s in pipeline if not s.group]


def _params(pipeline: Pipeline, stages: list[Stage], key: str | None) -> dict[str, Any]:
    return {**pipeline_params(pipeline), "stages": [s.name for s in stages], "key": key}


async def retry(
    conn: AsyncConnection[Any],
    pipeline: Pipeline,
    *,
    key: str | None = None,
    group: str | None = None,
    stage: str | None = None,
) -> list[str]:
    """Put failed rows (or groups) back so the stage they failed at runs again.

    Name one row ``key``, one ``group``, or a ``stage`` (every row or group failed
    there). Returns the keys moved back to (previous step, done); the trigger announces
    them and a worker claims them as a first attempt.
    """
    is_group, stages = _selection(pipeline, key, group, stage)
    await require_installed(conn, pipeline)
    q = await statements_for(conn, pipeline)
    params = _params(pipeline, stages, key if key is not None else group)
    params["afters"] = [s.after for s in stages]
    try:
        async with conn.transaction():
            cur = await conn.execute(q.text("retry_groups" if is_group else "retry_rows"), params)
            return [k for (k,) in await cur.fetchall()]
    except psycopg.errors.DataError:
        raise await bad_key(conn, pipeline, str(key)) from None


async def cancel(
    conn: AsyncConnection[Any],
    pipeline: Pipeline,
    *,
    key: str | None = None,
    group: str | None = None,
    stage: str | None = None,
) -> CancelReport:
    """Stop rows (or groups) in progress: fail them with reason ``cancelled by operator``.

    A running run is closed as ``cancelled`` (its worker's completion is then rejected
    and rolled back); a pending retry is dropped (``retry_at`` cleared, the failed run
    keeps its state). Name one row ``key``, one ``group``, or a ``stage``.
    """
    is_group, stages = _selection(pipeline, key, group, stage)
    await require_installed(conn, pipeline)
    q = await statements_for(conn, pipeline)
    params = _params(pipeline, stages, key if key is not None else group)
    params["reason"] = CANCEL_REASON
    try:
        async with conn.transaction():
            cur = await conn.execute(q.text("cancel_groups" if is_group else "cancel_rows"), params)
            found = await cur.fetchone()
            # the closed runs' slots of a max_running stage, freed and announced now
            await conn.execute(q.text("free_stale_slots"), params)
    except psycopg.errors.DataError:
        raise await bad_key(conn, pipeline, str(key)) from None
    assert found is not None
    keys, closed, dropped = found
    return CancelReport(keys=tuple(keys), runs_closed=closed, retries_dropped=dropped)
