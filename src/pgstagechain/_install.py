"""Installing a pipeline: the trigger on the user's table and the indexes its scans need.

Everything install creates is recorded in ``pgstagechain.pipelines.created`` so that
:func:`uninstall` removes exactly that and nothing of the user's.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row

from ._catalog import inspect_table
from ._connect import connect
from ._migrations import migrate_schema, require_schema
from ._pipeline import Pipeline
from .errors import ExistingRowsError, NotInstalledError

logger = logging.getLogger("pgstagechain.install")

TRIGGER_FUNCTION = """
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $pgstagechain$
BEGIN
    -- Only a real change to (step, status) that lands on done wakes anybody: claims
    -- (status running) and no-op updates send nothing.
    IF NEW.{status} = {done} AND (TG_OP = 'INSERT'
            OR OLD.{step} IS DISTINCT FROM NEW.{step}
            OR OLD.{status} IS DISTINCT FROM NEW.{status}) THEN
        IF NEW.{step} = ANY({row_steps}) THEN
            PERFORM pg_notify({channel}, json_build_array(
                'r', NEW.{step}, NEW.{key}::text, {new_group})::text);
        END IF;
        {fan_in}
    END IF;
    RETURN NULL;
END
$pgstagechain$
"""

# Fan-in: when a member reaches a step followed by a group stage, take the group's lock
# and look at every member with a fresh snapshot; the last one in creates the group's
# row (at most once: primary key), whose own trigger wakes the group stage.
FAN_IN = """
        IF NEW.{step} = ANY({fan_in_steps}) AND NEW.{group} IS NOT NULL THEN
            PERFORM pg_advisory_xact_lock(hashtextextended({pipeline} || ':' || NEW.{group}::text, 0));
            IF NOT EXISTS (
                SELECT 1 FROM {table} m
                WHERE m.{group} = NEW.{group}
                  AND (m.{step} IS DISTINCT FROM NEW.{step} OR m.{status} IS DISTINCT FROM {done})
            ) THEN
                INSERT INTO pgstagechain.groups (pipeline, group_key, step, status)
                VALUES ({pipeline}, NEW.{group}::text, NEW.{step}, 'done')
                ON CONFLICT DO NOTHING;
            END IF;
        END IF;
"""

LEADING_INDEX = """
SELECT 1 FROM pg_index i
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
LEFT JOIN pg_attribute b ON b.attrelid = i.indrelid AND b.attnum = i.indkey[1]
WHERE i.indrelid = to_regclass(format('%%I.%%I', %(schema)s::text, %(table)s::text))
  AND i.indpred IS NULL AND a.attname = %(first)s
  AND (%(second)s::text IS NULL OR b.attname = %(second)s)
LIMIT 1
"""


def _text_array(values: tuple[str, ...] | list[str]) -> sql.Composable:
    return sql.SQL("ARRAY[{}]::text[]").format(sql.SQL(", ").join(map(sql.Literal, values)))


def fingerprint(pipeline: Pipeline) -> dict[str, Any]:
    """What the database side depends on; a worker refuses to start when it differs."""
    spec = pipeline.table
    config = {
        "table": [spec.schema, spec.table],
        "key": spec.key,
        "step": spec.step_column,
        "status": spec.status_column,
        "group": spec.group_column,
        "done": spec.statuses.done,
        "start": list(pipeline.start_steps),
        "stages": sorted([s.name, s.after, s.group] for s in pipeline),
    }
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    return {**config, "digest": digest}


def object_names(pipeline: Pipeline) -> dict[str, str]:
    return {
        "function": f"notify_{pipeline.name}",
        "trigger": f"pgstagechain_{pipeline.name}",
        "state_index": f"pgstagechain_{pipeline.name}_state",
        "group_index": f"pgstagechain_{pipeline.name}_group",
    }


def trigger_function_sql(pipeline: Pipeline) -> sql.Composed:
    spec = pipeline.table
    names = object_names(pipeline)
    row_steps = [s.after for s in pipeline if not s.group and not pipeline.is_group_step(s.after)]
    fmt: dict[str, sql.Composable] = {
        "function": sql.Identifier("pgstagechain", names["function"]),
        "table": sql.Identifier(spec.schema, spec.table),
        "key": sql.Identifier(spec.key),
        "step": sql.Identifier(spec.step_column),
        "status": sql.Identifier(spec.status_column),
        "done": sql.Literal(spec.statuses.done),
        "channel": sql.Literal(pipeline.channel),
        "pipeline": sql.Literal(pipeline.name),
        "row_steps": _text_array(row_steps),
        "fan_in_steps": _text_array(list(pipeline.fan_in_steps())),
        "new_group": (
            sql.SQL("NEW.{}::text").format(sql.Identifier(spec.group_column))
            if spec.group_column
            else sql.SQL("NULL::text")
        ),
    }
    fan_in: sql.Composable = sql.SQL("")
    if pipeline.fan_in_steps():
        assert spec.group_column is not None
        fan_in = sql.SQL(FAN_IN).format(group=sql.Identifier(spec.group_column), **fmt)
    return sql.SQL(TRIGGER_FUNCTION).format(fan_in=fan_in, **fmt)


def newly_followed(old: dict[str, Any], pipeline: Pipeline) -> list[str]:
    """Steps that were the last of the installed graph and now have a stage after them."""
    old_stages = {name for name, _after, _group in old.get("stages", [])}
    followed = {after for _name, after, _group in old.get("stages", [])}
    found = []
    for step in sorted((old_stages | set(old.get("start", []))) - followed):
        following = pipeline.next_stage(step)
        if following is not None and following.name not in old_stages:
            found.append(step)
    return found


def skip_target(pipeline: Pipeline, step: str) -> str:
    """Where rows at ``(step, done)`` go to pass the new stages after it without running
    them: the last new stage of the same level in the chain that starts there."""
    level = pipeline.is_group_step(step)
    found = step
    while (following := pipeline.next_stage(found)) is not None and following.group == level:
        found = following.name
    return found


async def _finished_at(
    conn: AsyncConnection[Any], pipeline: Pipeline, steps: list[str]
) -> dict[str, int]:
    """How many rows (or groups) sit at ``(step, done)`` for each of ``steps``."""
    spec = pipeline.table
    waiting: dict[str, int] = {}
    for step in steps:
        if pipeline.is_group_step(step):
            cur = await conn.execute(
                "SELECT count(*) FROM pgstagechain.groups"
                " WHERE pipeline = %s AND step = %s AND status = 'done'",
                (pipeline.name, step),
            )
        else:
            cur = await conn.execute(
                sql.SQL("SELECT count(*) FROM {} WHERE {} = %s AND {} = %s").format(
                    sql.Identifier(spec.schema, spec.table),
                    sql.Identifier(spec.step_column),
                    sql.Identifier(spec.status_column),
                ),
                (step, spec.statuses.done),
            )
        row = await cur.fetchone()
        if row and row[0]:
            waiting[step] = int(row[0])
    return waiting


async def _skip_new_stages(
    conn: AsyncConnection[Any], pipeline: Pipeline, waiting: dict[str, int]
) -> None:
    """Move what finished at each step past the new stages after it, without running them
    (the old trigger is still in place, and does not announce the new steps)."""
    spec = pipeline.table
    for step in waiting:
        target = skip_target(pipeline, step)
        if pipeline.is_group_step(step):
            await conn.execute(
                "UPDATE pgstagechain.groups SET step = %s"
                " WHERE pipeline = %s AND step = %s AND status = 'done'",
                (target, pipeline.name, step),
            )
        else:
            await conn.execute(
                sql.SQL("UPDATE {} SET {} = %s WHERE {} = %s AND {} = %s").format(
                    sql.Identifier(spec.schema, spec.table),
                    sql.Identifier(spec.step_column),
                    sql.Identifier(spec.step_column),
                    sql.Identifier(spec.status_column),
                ),
                (target, step, spec.statuses.done),
            )
        logger.warning(
            "pipeline %s: %d row(s) finished at %r before its new stages existed were moved "
            "to (%s, %s) without running them",
            pipeline.name,
            waiting[step],
            step,
            target,
            spec.statuses.done,
        )


async def install(
    conn: AsyncConnection[Any], pipeline: Pipeline, *, backfill: bool | None = None
) -> None:
    """Create or update the pipeline's trigger and indexes; safe to run again and again.

    When a stage now follows a step that was the installed graph's last, the rows that
    already finished there would all run it: ``backfill`` says whether they should
    (True) or should be moved past it without running it (False); left at None, such
    rows make it raise :class:`~pgstagechain.errors.ExistingRowsError` before any change.
    """
    pipeline.validate()
    await require_schema(conn)
    await inspect_table(conn, pipeline)
    spec = pipeline.table
    names = object_names(pipeline)
    table = sql.Identifier(spec.schema, spec.table)
    created: dict[str, str] = {"function": names["function"], "trigger": names["trigger"]}

    wanted: list[tuple[str, str, str | None]] = [
        ("state_index", spec.step_column, spec.status_column)
    ]
    if spec.group_column:
        wanted.append(("group_index", spec.group_column, None))
    for label, first, second in wanted:
        cur = await conn.execute(
            LEADING_INDEX,
            {"schema": spec.schema, "table": spec.table, "first": first, "second": second},
        )
        if await cur.fetchone() is None or await _is_ours(conn, spec.schema, names[label]):
            columns = [c for c in (first, second) if c]
            build = sql.SQL("CREATE INDEX {how} IF NOT EXISTS {name} ON {table} ({cols})").format(
                how=sql.SQL("CONCURRENTLY" if conn.autocommit else ""),
                name=sql.Identifier(names[label]),
                table=table,
                cols=sql.SQL(", ").join(map(sql.Identifier, columns)),
            )
            await conn.execute(build)
            created[label] = names[label]

    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"pgstagechain.install.{pipeline.name}",)
        )
        cur = await conn.execute(
            "SELECT config FROM pgstagechain.pipelines WHERE name = %s", (pipeline.name,)
        )
        installed = await cur.fetchone()
        if installed is not None:
            waiting = await _finished_at(conn, pipeline, newly_followed(installed[0], pipeline))
            if waiting and backfill is None:
                raise ExistingRowsError(pipeline.name, waiting)
            if backfill is False:
                await _skip_new_stages(conn, pipeline, waiting)
            for step, count in waiting.items() if backfill else ():
                logger.warning(
                    "pipeline %s: %d row(s) finished at %r will run the new stages after it",
                    pipeline.name,
                    count,
                    step,
                )
        await conn.execute(trigger_function_sql(pipeline))
        await conn.execute(
            sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                sql.Identifier(names["trigger"]), table
            )
        )
        await conn.execute(
            sql.SQL(
                # WHEN is checked without calling the function: the many updates that
                # claim a row (status running) cost no trigger call at all.
                "CREATE TRIGGER {trigger} AFTER INSERT OR UPDATE OF {step}, {status} ON {table} "
                "FOR EACH ROW WHEN (NEW.{status} = {done}) EXECUTE FUNCTION {function}()"
            ).format(
                trigger=sql.Identifier(names["trigger"]),
                step=sql.Identifier(spec.step_column),
                status=sql.Identifier(spec.status_column),
                done=sql.Literal(spec.statuses.done),
                table=table,
                function=sql.Identifier("pgstagechain", names["function"]),
            )
        )
        await conn.execute(
            """
            INSERT INTO pgstagechain.pipelines (name, table_schema, table_name, config, created)
            VALUES (%(name)s, %(schema)s, %(table)s, %(config)s, %(created)s)
            ON CONFLICT (name) DO UPDATE SET table_schema = EXCLUDED.table_schema,
                table_name = EXCLUDED.table_name, config = EXCLUDED.config,
                created = EXCLUDED.created, installed_at = now()
            """,
            {
                "name": pipeline.name,
                "schema": spec.schema,
                "table": spec.table,
                "config": json.dumps(fingerprint(pipeline)),
                "created": json.dumps(created),
            },
        )


async def _is_ours(conn: AsyncConnection[Any], schema: str, index: str) -> bool:
    cur = await conn.execute(
        "SELECT to_regclass(format('%%I.%%I', %s::text, %s::text)) IS NOT NULL", (schema, index)
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def require_installed(conn: AsyncConnection[Any], pipeline: Pipeline) -> None:
    """Raise :class:`NotInstalledError` unless the database matches this pipeline's graph."""
    await require_schema(conn)
    cur = await conn.cursor(row_factory=dict_row).execute(
        "SELECT config FROM pgstagechain.pipelines WHERE name = %s", (pipeline.name,)
    )
    row = await cur.fetchone()
    if row is None:
        raise NotInstalledError(
            f"pipeline {pipeline.name!r} is not installed: run `pgstagechain migrate APP:PIPELINE`"
        )
    if row["config"].get("digest") != fingerprint(pipeline)["digest"]:
        raise NotInstalledError(
            f"pipeline {pipeline.name!r} changed since it was installed (stages, table or "
            "columns): run `pgstagechain migrate APP:PIPELINE` to update the trigger"
        )


async def uninstall(conn: AsyncConnection[Any], pipeline: Pipeline, *, purge: bool = False) -> None:
    """Remove what :func:`install` created; with ``purge`` also the pipeline's run history."""
    spec = pipeline.table
    table = sql.Identifier(spec.schema, spec.table)
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT created FROM pgstagechain.pipelines WHERE name = %s", (pipeline.name,)
        )
        row = await cur.fetchone()
        if row is None:
            return
        created: dict[str, str] = row[0]
        if "trigger" in created:
            await conn.execute(
                sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                    sql.Identifier(created["trigger"]), table
                )
            )
        if "function" in created:
            await conn.execute(
                sql.SQL("DROP FUNCTION IF EXISTS {}()").format(
                    sql.Identifier("pgstagechain", created["function"])
                )
            )
        for label in ("state_index", "group_index"):
            if label in created:
                await conn.execute(
                    sql.SQL("DROP INDEX IF EXISTS {}").format(
                        sql.Identifier(spec.schema, created[label])
                    )
                )
        await conn.execute("DELETE FROM pgstagechain.pipelines WHERE name = %s", (pipeline.name,))
        if purge:
            await conn.execute(
                "DELETE FROM pgstagechain.runs WHERE pipeline = %s", (pipeline.name,)
            )
            await conn.execute(
                "DELETE FROM pgstagechain.groups WHERE pipeline = %s", (pipeline.name,)
            )


async def migrate(
    target: str | AsyncConnection[Any], *pipelines: Pipeline, backfill: bool | None = None
) -> list[int]:
    """Bring the library schema up to date and install (or update) each pipeline.

    ``target`` is a connection string or an open connection. Returns the schema
    versions that were applied (empty when already current). ``backfill``: see
    :func:`install` (what a stage added after the last one does to rows already there).
    """
    if isinstance(target, AsyncConnection):
        applied = await migrate_schema(target)
        for pipeline in pipelines:
            await install(target, pipeline, backfill=backfill)
        return applied
    async with await connect(target, autocommit=True) as conn:
        return await migrate(conn, *pipelines, backfill=backfill)
