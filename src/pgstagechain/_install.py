"""Installing a pipeline: the trigger on the user's table and the indexes its scans need.

Everything install creates is recorded in ``pgstagechain.pipelines.created`` so that
:func:`uninstall` removes exactly that and nothing of the user's.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any, LiteralString

from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row

from ._catalog import statements_for
from ._connect import connect
from ._graph_change import Graph, diff_lines, policy_of
from ._limits import LIMITS_VERSION, write_limits
from ._migration_plan import GraphPlan, apply_plan, read_plan
from ._migrations import LATEST, applied_version, migrate_schema, require_schema
from ._pipeline import Pipeline
from ._sql import Statements, object_names, owned_names, pipeline_params, plain
from ._stage import FanIn
from .errors import ConfigurationError, ExistingRowsError, GraphChangeError, NotInstalledError

logger = logging.getLogger("pgstagechain.install")


def fingerprint(pipeline: Pipeline) -> dict[str, Any]:
    """What the database side depends on; a worker refuses to start when it differs."""
    spec = pipeline.table
    config: dict[str, Any] = {
        "table": [spec.schema, spec.table],
        "key": spec.key,
        "step": spec.step_column,
        "status": spec.status_column,
        "group": spec.group_column,
        "done": spec.statuses.done,
        "start": list(pipeline.start_steps),
        "stages": sorted([s.name, s.after, s.group] for s in pipeline),
    }
    # fan-in declarations change the trigger; recorded only when set, so that the digest of a
    # pipeline that declares none stays what it was
    policies = {s.name: s.fan_in.value for s in pipeline if s.fan_in is not FanIn.ALL_DONE}
    if policies:
        config["fan_in"] = policies
    if spec.group_size_column:
        config["group_size"] = spec.group_size_column
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    # recorded for `migrate --plan` to compare, outside the digest: workers apply their own
    # code's policies, so a change of policy needs no migrate
    return {**config, "digest": digest, "policies": policy_of(pipeline)}


def trigger_function_sql(statements: Statements, pipeline: Pipeline) -> LiteralString:
    """The pipeline's trigger function: it announces rows landing on done and, when a group
    stage follows, forms the group once its last member arrives."""
    return statements.text(
        "trigger_function_fan_in" if pipeline.fan_in_steps() else "trigger_function"
    )


def newly_followed(old: dict[str, Any], pipeline: Pipeline) -> list[str]:
    """Steps that were the last of the installed graph and now have a stage after them: a
    new one, or one moved there (rows that finished there would run it again)."""
    old_stages = {name for name, _after, _group in old.get("stages", [])}
    followed = {after for _name, after, _group in old.get("stages", [])}
    return [
        step
        for step in sorted((old_stages | set(old.get("start", []))) - followed)
        if pipeline.next_stage(step) is not None
    ]


def skip_target(pipeline: Pipeline, step: str) -> str:
    """Where rows at ``(step, done)`` go to pass the new stages after it without running
    them: the last new stage of the same level in the chain that starts there."""
    level = pipeline.is_group_step(step)
    found = step
    while (following := pipeline.next_stage(found)) is not None and following.group == level:
        found = following.name
    return found


async def _finished_at(
    conn: AsyncConnection[Any], q: Statements, pipeline: Pipeline, steps: list[str]
) -> dict[str, int]:
    """How many rows (or groups) sit at ``(step, done)`` for each of ``steps``."""
    waiting: dict[str, int] = {}
    for step in steps:
        name = "count_done_groups" if pipeline.is_group_step(step) else "count_done_rows"
        cur = await conn.execute(q.text(name), {**pipeline_params(pipeline), "step": step})
        row = await cur.fetchone()
        if row and row[0]:
            waiting[step] = int(row[0])
    return waiting


async def _skip_new_stages(
    conn: AsyncConnection[Any], q: Statements, pipeline: Pipeline, waiting: dict[str, int]
) -> None:
    """Move what finished at each step past the new stages after it, without running them
    (the old trigger is still in place, and does not announce the new steps)."""
    for step in waiting:
        target = skip_target(pipeline, step)
        name = "skip_groups" if pipeline.is_group_step(step) else "skip_rows"
        await conn.execute(
            q.text(name), {**pipeline_params(pipeline), "step": step, "target": target}
        )
        logger.warning(
            "pipeline %s: %d row(s) finished at %r before its new stages existed were moved "
            "to (%s, %s) without running them",
            pipeline.name,
            waiting[step],
            step,
            target,
            pipeline.table.statuses.done,
        )


async def install(
    conn: AsyncConnection[Any],
    pipeline: Pipeline,
    *,
    backfill: bool | None = None,
    maps: Mapping[str, str] | None = None,
) -> None:
    """Create or update the pipeline's trigger and indexes; safe to run again and again.

    When a stage now follows a step that was the installed graph's last, the rows that
    already finished there would all run it: ``backfill`` says whether they should
    (True) or should be moved past it without running it (False); left at None, such
    rows make it raise :class:`~pgstagechain.errors.ExistingRowsError` before any change.

    When the stage graph changed, rows and groups at steps the new graph no longer has
    must be mapped to one it has (``maps``: old step to new step), and no live run may be
    left at a stage whose place changed; otherwise it raises
    :class:`~pgstagechain.errors.GraphChangeError` before any change. The plan is logged
    before it is carried out, in the transaction that installs the new trigger.
    """
    pipeline.validate()
    await require_schema(conn)
    q = await statements_for(conn, pipeline)
    spec = pipeline.table
    names = object_names(pipeline)
    created: dict[str, str] = {"function": names["function"], "trigger": names["trigger"]}
    how = q.with_names(concurrently=sql.SQL("CONCURRENTLY" if conn.autocommit else ""))

    wanted: list[tuple[str, str, str | None]] = [
        ("state_index", spec.step_column, spec.status_column)
    ]
    if spec.group_column:
        wanted.append(("group_index", spec.group_column, None))
    for label, first, second in wanted:
        cur = await conn.execute(
            plain("leading_index"),
            {"schema": spec.schema, "table": spec.table, "first": first, "second": second},
        )
        if await cur.fetchone() is None or await _exists(conn, spec.schema, names[label]):
            await conn.execute(how.text(f"create_{label}"))
            created[label] = names[label]

    async with conn.transaction():
        await conn.execute(plain("install_lock"), {"lock": f"pgstagechain.install.{pipeline.name}"})
        cur = await conn.execute(plain("installed_config"), pipeline_params(pipeline))
        installed = await cur.fetchone()
        change = await read_plan(conn, q, pipeline, installed[0] if installed else None, maps or {})
        if change.refusals():
            raise GraphChangeError(change)
        if change.changed:
            logger.warning("%s", "\n".join(change.lines()))
        if installed is not None:
            steps = newly_followed(installed[0], pipeline)
            waiting = await _finished_at(conn, q, pipeline, steps)
            if waiting and backfill is None:
                raise ExistingRowsError(pipeline.name, waiting)
            if backfill is False:
                await _skip_new_stages(conn, q, pipeline, waiting)
            for step, count in waiting.items() if backfill else ():
                logger.warning(
                    "pipeline %s: %d row(s) finished at %r will run the new stages after it",
                    pipeline.name,
                    count,
                    step,
                )
        await write_limits(conn, pipeline)
        await conn.execute(trigger_function_sql(q, pipeline))
        await conn.execute(q.text("drop_trigger"))
        await conn.execute(q.text("create_trigger"))
        await apply_plan(conn, q, pipeline, change)
        await conn.execute(
            plain("record_install"),
            {
                "pipeline": pipeline.name,
                "schema": spec.schema,
                "table": spec.table,
                "config": json.dumps(fingerprint(pipeline)),
                "created": json.dumps(created),
            },
        )


async def _exists(conn: AsyncConnection[Any], schema: str, name: str) -> bool:
    cur = await conn.execute(plain("relation_exists"), {"schema": schema, "name": name})
    row = await cur.fetchone()
    return bool(row and row[0])


async def installed_config(conn: AsyncConnection[Any], pipeline: Pipeline) -> dict[str, Any] | None:
    """What the last ``migrate`` recorded for the pipeline (None: not installed)."""
    cur = await conn.execute(plain("installed_config"), pipeline_params(pipeline))
    row = await cur.fetchone()
    return dict(row[0]) if row else None


async def require_installed(conn: AsyncConnection[Any], pipeline: Pipeline) -> None:
    """Raise :class:`NotInstalledError` unless the database matches this pipeline's graph."""
    await require_schema(conn)
    cur = await conn.cursor(row_factory=dict_row).execute(
        plain("installed_config"), pipeline_params(pipeline)
    )
    row = await cur.fetchone()
    if row is None:
        raise NotInstalledError(
            f"pipeline {pipeline.name!r} is not installed: run `pgstagechain migrate APP:PIPELINE`"
        )
    if row["config"].get("digest") != fingerprint(pipeline)["digest"]:
        installed, mine = Graph.installed(row["config"]), Graph.of(pipeline)
        if installed != mine:
            raise NotInstalledError(
                f"pipeline {pipeline.name!r} changed since it was installed: its stage graph "
                f"differs ({'; '.join(diff_lines(installed, mine))}): run `pgstagechain "
                "migrate APP:PIPELINE --plan` to see what that does to the rows in flight, "
                "then `migrate`"
            )
        raise NotInstalledError(
            f"pipeline {pipeline.name!r} changed since it was installed (stages, table, "
            "columns or fan-in): run `pgstagechain migrate APP:PIPELINE` to update the trigger"
        )


async def uninstall(conn: AsyncConnection[Any], pipeline: Pipeline, *, purge: bool = False) -> None:
    """Remove what :func:`install` created; with ``purge`` also the pipeline's run history."""
    async with conn.transaction():
        cur = await conn.execute(plain("installed_objects"), pipeline_params(pipeline))
        row = await cur.fetchone()
        if row is None:
            return
        # exactly what install recorded, by the names it recorded
        q = Statements(
            {
                "table": sql.Identifier(pipeline.table.schema, pipeline.table.table),
                **owned_names(pipeline.table.schema, row[0]),
            }
        )
        for role in ("trigger", "function", "state_index", "group_index"):
            if role in row[0]:
                await conn.execute(q.text(f"drop_{role}"))
        await conn.execute(plain("forget_install"), pipeline_params(pipeline))
        if await applied_version(conn) >= LIMITS_VERSION:
            await conn.execute(plain("forget_limits"), pipeline_params(pipeline))
        if purge:
            await conn.execute(plain("purge_runs"), pipeline_params(pipeline))
            await conn.execute(plain("purge_groups"), pipeline_params(pipeline))


def _one_pipeline_for(maps: Mapping[str, str] | None, pipelines: tuple[Pipeline, ...]) -> None:
    if maps and len(pipelines) != 1:
        raise ConfigurationError(
            f"maps name steps of one pipeline: migrate one pipeline at a time with them "
            f"(got {len(pipelines)})"
        )


async def migrate(
    target: str | AsyncConnection[Any],
    *pipelines: Pipeline,
    backfill: bool | None = None,
    maps: Mapping[str, str] | None = None,
) -> list[int]:
    """Bring the library schema up to date and install (or update) each pipeline.

    ``target`` is a connection string or an open connection. Returns the schema
    versions that were applied (empty when already current). ``backfill``: see
    :func:`install` (what a stage added after the last one does to rows already there);
    ``maps``: see :func:`install` (where rows at steps a changed graph no longer has go;
    one pipeline at a time). :func:`plan_migration` says what it would do first.
    """
    _one_pipeline_for(maps, pipelines)
    if isinstance(target, AsyncConnection):
        applied = await migrate_schema(target)
        for pipeline in pipelines:
            await install(target, pipeline, backfill=backfill, maps=maps)
        return applied
    async with await connect(target, autocommit=True) as conn:
        return await migrate(conn, *pipelines, backfill=backfill, maps=maps)


async def plan_migration(
    target: str | AsyncConnection[Any],
    *pipelines: Pipeline,
    maps: Mapping[str, str] | None = None,
) -> list[GraphPlan]:
    """What :func:`migrate` would do to each pipeline's rows in flight, changing nothing:
    the graph diff, the rows and groups at each step it touches and their fate, what would
    make it refuse (``plan.refusals()``). ``plan.lines()`` says it in words."""
    _one_pipeline_for(maps, pipelines)
    if not isinstance(target, AsyncConnection):
        async with await connect(target, autocommit=True) as conn:
            return await plan_migration(conn, *pipelines, maps=maps)
    plans = []
    installed_schema = await applied_version(target) > 0
    for pipeline in pipelines:
        pipeline.validate()
        async with target.transaction(force_rollback=True):
            config = await installed_config(target, pipeline) if installed_schema else None
            q = await statements_for(target, pipeline)
            plans.append(await read_plan(target, q, pipeline, config, maps or {}))
    return plans


async def migration_report(
    target: str | AsyncConnection[Any],
    *pipelines: Pipeline,
    maps: Mapping[str, str] | None = None,
) -> list[str]:
    """What :func:`migrate` would do, in words (``migrate --plan``): the schema migrations
    it would apply, then each pipeline's plan."""
    if not isinstance(target, AsyncConnection):
        async with await connect(target, autocommit=True) as conn:
            return await migration_report(conn, *pipelines, maps=maps)
    version = await applied_version(target)
    plans = await plan_migration(target, *pipelines, maps=maps)
    missing = ", ".join(map(str, range(version + 1, LATEST + 1)))
    lines = [f"schema: would apply migration(s) {missing}" if missing else "schema: up to date"]
    for found in plans:
        lines += found.lines()
    return lines
