"""What the framework integrations share: a pipeline's status, and running a stage by hand."""

from __future__ import annotations

import random
import re
import traceback
import uuid
from typing import Any

import anyio
import attrs
import psycopg
from psycopg import AsyncConnection, sql

from .._claim import claim, claimer_for, complete, fail, to_json
from .._connect import connect, conninfo_with_defaults
from .._context import StageContext
from .._pipeline import Pipeline
from ..errors import ConfigurationError, LeaseLostError, PermanentError

#: Finished runs are counted over this many seconds (live ones always).
STATUS_WINDOW = 3600.0

ROW_COUNTS = sql.SQL(
    "SELECT {step}, {status}, count(*) FROM {table} WHERE {step} = ANY(%(steps)s) GROUP BY 1, 2"
)
GROUP_COUNTS = """
SELECT step, status, count(*) FROM pgstagechain.groups
WHERE pipeline = %(pipeline)s AND step = ANY(%(steps)s) GROUP BY 1, 2
"""
RUN_COUNTS = """
SELECT stage, state, count(*), count(*) FILTER (WHERE retry_at IS NOT NULL)
FROM pgstagechain.runs
WHERE pipeline = %(pipeline)s
  AND (state = 'running' OR retry_at IS NOT NULL
       OR finished_at > clock_timestamp() - %(window)s * interval '1 second')
GROUP BY 1, 2
"""
RUN_STATES = ("running", "succeeded", "failed", "expired", "cancelled")


async def pipeline_status(
    conn: AsyncConnection[Any], pipeline: Pipeline, *, window: float = STATUS_WINDOW
) -> dict[str, Any]:
    """Per stage: rows (or groups) waiting for it, running, done and failed at it, read
    from the user's table and ``pgstagechain.groups``; and its runs of the last
    ``window`` seconds from ``pgstagechain.runs`` (``retry_pending``: failed attempts
    whose retry is scheduled). JSON-able.
    """
    spec = pipeline.table
    statuses = {
        spec.statuses.done: "done",
        spec.statuses.running: "running",
        spec.statuses.failed: "failed",
    }
    row_steps = [s.name for s in pipeline if not s.group] + list(pipeline.start_steps)
    row_steps += [s.after for s in pipeline if s.group and not pipeline.is_group_step(s.after)]
    group_steps = [s.name for s in pipeline if s.group]
    group_steps += [s.after for s in pipeline if s.group]
    rows: dict[tuple[str, str], int] = {}
    groups: dict[tuple[str, str], int] = {}
    cur = await conn.execute(
        ROW_COUNTS.format(
            step=sql.Identifier(spec.step_column),
            status=sql.Identifier(spec.status_column),
            table=sql.Identifier(spec.schema, spec.table),
        ),
        {"steps": sorted(set(row_steps))},
    )
    for step, status, count in await cur.fetchall():
        if status in statuses:
            rows[step, statuses[status]] = count
    cur = await conn.execute(
        GROUP_COUNTS, {"pipeline": pipeline.name, "steps": sorted(set(group_steps))}
    )
    for step, status, count in await cur.fetchall():
        groups[step, status] = count
    run_counts: dict[str, dict[str, int]] = {}
    cur = await conn.execute(RUN_COUNTS, {"pipeline": pipeline.name, "window": window})
    for stage, state, count, retrying in await cur.fetchall():
        entry = run_counts.setdefault(stage, dict.fromkeys((*RUN_STATES, "retry_pending"), 0))
        entry[state] += count
        entry["retry_pending"] += retrying

    stages = []
    for each in pipeline:
        here = groups if each.group else rows
        # A group stage's predecessor is either a group stage or the fan-in row step:
        # either way, the groups waiting for it sit at (after, done) in the groups table.
        before = groups if each.group else rows
        stages.append(
            {
                "name": each.name,
                "after": each.after,
                "level": "group" if each.group else "row",
                "waiting": before.get((each.after, "done"), 0),
                "running": here.get((each.name, "running"), 0),
                "done": here.get((each.name, "done"), 0),
                "failed": here.get((each.name, "failed"), 0),
                "runs": run_counts.get(each.name, dict.fromkeys((*RUN_STATES, "retry_pending"), 0)),
            }
        )
    return {
        "pipeline": pipeline.name,
        "table": f"{spec.schema}.{spec.table}",
        "window_seconds": window,
        "stages": stages,
    }


KEY_TYPE = """
SELECT t.typname, t.typcategory FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = to_regclass(format('%%I.%%I', %(schema)s::text, %(table)s::text))
  AND a.attname = %(column)s AND NOT a.attisdropped
"""
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
        KEY_TYPE, {"schema": spec.schema, "table": spec.table, "column": spec.key}
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
    running elsewhere, done, or not there yet. A failure follows the stage's retry policy.
    """
    if stage not in pipeline:
        raise ConfigurationError(f"pipeline {pipeline.name!r} has no stage {stage!r}")
    target = pipeline[stage]
    async with await connect(conninfo) as conn:
        claimed = await claim(conn, pipeline, stage, key, worker_id=worker_id)
        await conn.commit()  # publish the claim: the row is (stage, running) from now on
        if claimed is None:
            return ManualRun(outcome="not_claimed")
        claimer = await claimer_for(conn, pipeline)
        try:
            if target.is_async:
                ctx: StageContext[Any] = StageContext(
                    claim=claimed,
                    conn=conn if target.connection else None,
                    worker_id=worker_id,
                )
                with anyio.fail_after(target.timeout):
                    result = await target.run(ctx)
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
                        completed, _ = claimer.complete_many_sync(
                            sync_conn,
                            stage,
                            claimed.is_group,
                            [
                                (
                                    claimed.run_id,
                                    claimed.token,
                                    claimed.row_key,
                                    to_json(stage, value),
                                    False,
                                )
                            ],
                        )
                        if claimed.token not in completed:
                            raise LeaseLostError(claimed.run_id)
                        sync_conn.commit()
                        return value

                with anyio.fail_after(target.timeout):
                    result = await anyio.to_thread.run_sync(call)
        except Exception as exc:
            await conn.rollback()
            error = "".join(traceback.format_exception(exc))[-4000:]
            retry_in = None
            if not isinstance(exc, PermanentError) and claimed.attempt < target.retry.max_attempts:
                retry_in = target.retry.delay(claimed.attempt, random.random())
            await fail(conn, pipeline, claimed, error, retry_in=retry_in)
            await conn.commit()
            return ManualRun(
                outcome="retrying" if retry_in is not None else "failed",
                run_id=claimed.run_id,
                attempt=claimed.attempt,
                error=f"{type(exc).__name__}: {exc}",
            )
    return ManualRun(
        outcome="succeeded", run_id=claimed.run_id, attempt=claimed.attempt, result=result
    )
