"""What the framework integrations share: a pipeline's status as JSON, and running a stage
by hand the way a worker would."""

from __future__ import annotations

import re
import uuid
from typing import Any

import anyio
import attrs
import psycopg
from psycopg import AsyncConnection

from .. import (
    ConfigurationError,
    Pipeline,
    StageContext,
    admin,
    claim,
    complete,
    complete_sync,
    fail,
)
from .._connect import connect, conninfo_with_defaults
from .._execute import call_handler, failure_of
from .._sql import plain
from ..admin import STATUS_WINDOW

__all__ = ["STATUS_WINDOW", "ManualRun", "key_type", "parse_key", "pipeline_status", "run_stage"]


async def pipeline_status(
    conn: AsyncConnection[Any], pipeline: Pipeline, *, window: float = STATUS_WINDOW
) -> dict[str, Any]:
    """:func:`pgstagechain.admin.status` as JSON-able data (the figures are defined there)."""
    return (await admin.status(conn, pipeline, window=window)).to_json()


INTEGER_RANGES = {"int2": 2**15, "int4": 2**31, "int8": 2**63}
INTEGER_TEXT = re.compile(r"-?[0-9]{1,20}")
NUMBER_TEXT = re.compile(r"-?[0-9]{1,100}(\.[0-9]{1,100})?")
MAX_KEY_LENGTH = 1000


async def key_type(conn: AsyncConnection[Any], pipeline: Pipeline, stage: str) -> tuple[str, str]:
    """The type name and category of the column ``stage`` is keyed by: the key column, or
    ``text`` for a group stage (group keys are stored as text)."""
    if pipeline[stage].group:
        return "text", "S"
    spec = pipeline.table
    cur = await conn.execute(
        plain("column_type"), {"schema": spec.schema, "table": spec.table, "column": spec.key}
    )
    found = await cur.fetchone()
    if found is None:
        raise ConfigurationError(f"{spec.schema}.{spec.table} has no column {spec.key!r}")
    return str(found[0]), str(found[1])


def parse_key(value: Any, type_name: str, category: str) -> Any:
    """``value`` as a key of type ``type_name``, or ValueError saying what is wrong with it.

    Checked here, before any statement, so a key that cannot be one (text for an integer
    key, a number out of range, a NUL character) is the caller's error, not the server's.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"the key must be a string or an integer, not {type(value).__name__}")
    if isinstance(value, str) and ("\x00" in value or len(value) > MAX_KEY_LENGTH):
        raise ValueError(
            f"a key must not contain NUL characters or exceed {MAX_KEY_LENGTH} characters"
        )
    if type_name in INTEGER_RANGES:
        text = str(value).strip()
        limit = INTEGER_RANGES[type_name]
        if not INTEGER_TEXT.fullmatch(text) or not -limit <= int(text) < limit:
            raise ValueError(f"the key must be an integer that fits {type_name}, got {value!r}")
        return int(text)
    if category == "N":
        if not NUMBER_TEXT.fullmatch(str(value).strip()):
            raise ValueError(f"the key must be a number ({type_name}), got {value!r}")
        return str(value).strip()
    if type_name == "uuid":
        try:
            return str(uuid.UUID(str(value)))
        except ValueError:
            raise ValueError(f"the key must be a UUID, got {value!r}") from None
    return str(value)


@attrs.frozen(kw_only=True)
class ManualRun:
    """What :func:`run_stage` did: ``outcome`` is succeeded, failed, retrying or not_claimed."""

    outcome: str
    run_id: int | None = None
    attempt: int | None = None
    result: Any = None
    error: str | None = None


async def run_stage(
    conninfo: str, pipeline: Pipeline, stage: str, key: Any, *, worker_id: str = "manual"
) -> ManualRun:
    """Claim ``key`` for ``stage`` with :func:`~pgstagechain.claim`, run the stage's
    handler here, and complete (or fail) it, the way a worker would.

    ``not_claimed`` means the row (group) was not at (previous step, done): already
    running elsewhere, done, or not there yet. A failure follows the stage's retry policy,
    the worker's own.
    """
    if stage not in pipeline:
        raise ConfigurationError(f"pipeline {pipeline.name!r} has no stage {stage!r}")
    target = pipeline[stage]
    async with await connect(conninfo) as conn:
        claimed = await claim(conn, pipeline, stage, key, worker_id=worker_id)
        await conn.commit()  # publish the claim: the row is (stage, running) from now on
        if claimed is None:
            return ManualRun(outcome="not_claimed")
        try:
            if target.is_async:
                handler_conn = conn if target.connection else None
                ctx: StageContext[Any] = StageContext(
                    claim=claimed, conn=handler_conn, worker_id=worker_id
                )
                result = await call_handler(target, ctx)
                await complete(conn, pipeline, claimed, result)
                await conn.commit()
            else:

                def call() -> Any:
                    with psycopg.connect(conninfo_with_defaults(conninfo)) as sync_conn:
                        ctx = StageContext(
                            claim=claimed,
                            conn=sync_conn if target.connection else None,
                            worker_id=worker_id,
                        )
                        value = target.run(ctx)
                        complete_sync(sync_conn, pipeline, claimed, value)
                        sync_conn.commit()
                        return value

                with anyio.fail_after(target.timeout):
                    result = await anyio.to_thread.run_sync(call)
        except Exception as exc:
            await conn.rollback()
            failure = failure_of(target, claimed, exc)
            await fail(conn, pipeline, claimed, failure.error, retry_in=failure.retry_in)
            await conn.commit()
            return ManualRun(
                outcome="retrying" if failure.retry_in is not None else "failed",
                run_id=claimed.run_id,
                attempt=claimed.attempt,
                error=f"{type(exc).__name__}: {exc}",
            )
    return ManualRun(
        outcome="succeeded", run_id=claimed.run_id, attempt=claimed.attempt, result=result
    )
