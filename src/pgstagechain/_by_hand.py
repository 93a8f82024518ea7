"""Claiming, completing and failing one row by hand (from an HTTP endpoint, a management
command, a test), with the guarantees the worker has: each is one atomic statement."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection, Connection

from ._claim import MANUAL_LEASE, cached_claimer, claimer_for, to_json
from ._context import Claim
from ._pipeline import Pipeline
from .errors import ConfigurationError, LeaseLostError


async def claim(
    conn: AsyncConnection[Any],
    pipeline: Pipeline,
    stage: str,
    key: Any,
    *,
    worker_id: str = "manual",
    lease: float = MANUAL_LEASE,
) -> Claim | None:
    """Claim ``key`` for ``stage`` if it is still at (previous step, done); else return None.

    One atomic statement: under any number of concurrent claimers exactly one gets the
    row, the others get None (never an exception, never a second run). For a group
    stage, ``key`` is the group key. Commit ``conn`` (or use autocommit) to publish it.
    """
    found = await (await claimer_for(conn, pipeline)).claim(
        conn, stage, keys=[str(key)], worker_id=worker_id, lease=lease
    )
    return found[0] if found else None


async def complete(
    conn: AsyncConnection[Any], pipeline: Pipeline, claimed: Claim, result: Any = None
) -> None:
    """Mark a claimed stage done (firing the next stage) in ``conn``'s current transaction.

    Raises :class:`~pgstagechain.LeaseLostError` when the claim was rescued meanwhile;
    roll back then, so nothing the caller wrote in this transaction survives.
    """
    await (await claimer_for(conn, pipeline)).complete(
        conn, claimed, to_json(claimed.stage, result)
    )


def complete_sync(
    conn: Connection[Any], pipeline: Pipeline, claimed: Claim, result: Any = None
) -> None:
    """:func:`complete` on a blocking connection: a plain function's handler completes its
    stage in the transaction it wrote in, so both commit or neither.

    ``claimed`` comes from :func:`claim` on the same pipeline (which reads the catalog this
    needs). Raises :class:`~pgstagechain.LeaseLostError` when the claim was rescued meanwhile.
    """
    claimer = cached_claimer(pipeline)
    if claimer is None:
        raise ConfigurationError(
            f"pipeline {pipeline.name!r}: claim the row with claim() before complete_sync()"
        )
    completed, _ = claimer.complete_many_sync(
        conn,
        claimed.stage,
        claimed.is_group,
        [(claimed.run_id, claimed.token, claimed.row_key, to_json(claimed.stage, result), False)],
    )
    if claimed.token not in completed:
        raise LeaseLostError(claimed.run_id)


async def fail(
    conn: AsyncConnection[Any],
    pipeline: Pipeline,
    claimed: Claim,
    error: str,
    *,
    retry_in: float | None = None,
) -> bool:
    """Record ``error`` for a claimed stage; the row fails unless ``retry_in`` schedules a retry."""
    return await (await claimer_for(conn, pipeline)).fail(conn, claimed, error, retry_in=retry_in)
