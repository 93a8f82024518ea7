"""Re-runs and backfills: ``pgstagechain rerun``, public as :func:`pgstagechain.admin.rerun`.

The rows (or groups, for a group stage) a selection names go back to (the step before the
stage, done), so the stage and every stage after it run again; their earlier runs stay in
the ledger. The selection is built from keys, groups, a status and a time window, never
from SQL. It works one batch at a time, one transaction per batch, and never waits for a
worker: what a worker holds at that moment (a claim, a completion) is tried again in a
later pass, and reported as ``busy`` if it stays held.

A row that is in flight at the stage or after it has its live run cancelled the way
``cancel`` does (the claim's token makes the old completion be refused and rolled back) and
a pending retry dropped, unless ``in_flight="skip"``. A row that has not reached the stage
is left alone. When the stage's chain leads to a group stage, the groups of the rows that go
back are taken apart now (a group stage at work on the old members is cancelled), so that
nothing runs on the old members meanwhile, and the trigger forms each again, once, when its
last re-run member is back at the fan-in step.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import anyio
import psycopg
from psycopg import AsyncConnection, AsyncCursor
from psycopg.rows import dict_row

from ._catalog import inspect_table, statements_for
from ._install import require_installed
from ._pipeline import Pipeline
from ._repair import bad_key
from ._rerun_plan import (
    InFlight,
    RerunPlan,
    RerunReport,
    Tally,
    check_selection,
    group_status,
    plan_rerun,
)
from ._sql import Statements, pipeline_params, plain
from .errors import ConfigurationError

#: passes over rows a worker held, with a pause between them that doubles up to a second
PASSES = 12


def _unique(values: Iterable[Any]) -> list[str]:
    return list(dict.fromkeys(str(v) for v in values))


def _chunks(values: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(values), size):
        yield list(values[start : start + size])


async def rerun(
    conn: AsyncConnection[Any],
    pipeline: Pipeline,
    *,
    stage: str,
    keys: Sequence[str | int] | None = None,
    groups: Sequence[str | int] | None = None,
    status: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    all_rows: bool = False,
    in_flight: InFlight = "cancel",
    dry_run: bool = False,
    batch_size: int = 500,
) -> RerunReport:
    """Run ``stage`` and every stage after it again for the rows (groups) selected.

    The filters combine (all must hold): ``keys`` (row keys; group keys for a group stage),
    ``groups`` (values of the group column), ``status`` (where the row is now: running,
    done or failed, as the pipeline names them), ``since``/``until`` (a run of ``stage``
    started in that window). ``all_rows`` selects every row instead. ``in_flight``: what
    to do with a row at the stage or after it whose run is live or whose retry is pending:
    cancel that run and re-run it (default), or skip it. ``dry_run`` changes nothing and
    reports what would be done. Returns a :class:`RerunReport`.
    """
    plan = plan_rerun(pipeline, stage)
    key_list = None if keys is None else _unique(keys)
    group_list = None if groups is None else _unique(groups)
    check_selection(pipeline, key_list, group_list, status, since, until, all_rows, in_flight)
    if batch_size < 1:
        raise ConfigurationError("batch_size must be at least 1")
    await require_installed(conn, pipeline)
    q = await statements_for(conn, pipeline)
    level = "groups" if plan.stage.group else "rows"
    params = {
        **pipeline_params(pipeline),
        "stage": plan.stage.name,
        "after": plan.stage.after,
        "groups": group_list,
        # a group's status is spelled the library's way, whatever the rows' statuses are
        "status": group_status(pipeline, status) if plan.stage.group else status,
        "in_flight_status": "running" if plan.stage.group else pipeline.table.statuses.running,
        "since": since,
        "until": until,
        "reason": plan.reason,
        "limit": batch_size,
    }
    tally = Tally()

    async def one_batch(batch: list[str]) -> None:
        if not batch:
            return
        if dry_run:
            await _pass(conn, q, plan, params, batch, tally, in_flight, lock=False)
            return
        pending, pause = batch, 0.05
        for _ in range(PASSES):
            pending = await _pass(conn, q, plan, params, pending, tally, in_flight, lock=True)
            if not pending:
                return
            await anyio.sleep(pause)
            pause = min(pause * 2, 1.0)
        tally.skip("busy", pending)

    try:
        if key_list is not None:
            for chunk in _chunks(key_list, batch_size):
                found = await _select(conn, q, level, params, keys=chunk, after_key=None)
                missing = await conn.execute(
                    q.text(f"rerun_missing_{level}"), {**params, "keys": chunk}, prepare=False
                )
                tally.skip("not_found", (k for (k,) in await missing.fetchall()))
                tally.skip("filtered_out", (k for k, matched in found if not matched))
                await one_batch([k for k, matched in found if matched])
        else:
            after_key: str | None = None
            while True:
                found = await _select(conn, q, level, params, keys=None, after_key=after_key)
                if not found:
                    break
                after_key = found[-1][0]
                await one_batch([k for k, _ in found])
                if len(found) < batch_size:
                    break
    except psycopg.errors.DataError:
        raise await _bad_keys(conn, pipeline, key_list or []) from None
    return RerunReport(
        pipeline=pipeline.name,
        stage=plan.stage.name,
        after=plan.stage.after,
        group=plan.stage.group,
        dry_run=dry_run,
        keys=tuple(tally.keys),
        in_flight=tuple(tally.in_flight),
        runs_cancelled=tally.runs_cancelled,
        retries_dropped=tally.retries_dropped,
        skipped={reason: tuple(keys) for reason, keys in tally.skipped.items()},
        groups=tuple(sorted(tally.groups)),
        groups_stopped=tuple(sorted(tally.groups_stopped)),
    )


async def _bad_keys(
    conn: AsyncConnection[Any], pipeline: Pipeline, keys: list[str]
) -> ConfigurationError:
    """The error for keys the key column's type cannot hold, naming the first of them when
    the server can tell (``pg_input_is_valid``, PostgreSQL 16)."""
    info = await inspect_table(conn, pipeline)
    try:
        cur = await conn.execute(plain("rerun_invalid_key"), {"keys": keys, "type": info.key_type})
        found = await cur.fetchone()
    except psycopg.Error:
        found = None
    return await bad_key(conn, pipeline, found[0] if found else ", ".join(keys)[:200])


# Every statement here runs with prepare=False: their filters are "parameter IS NULL OR ...",
# which a custom plan folds away but a generic plan of a prepared statement cannot.


async def _select(
    conn: AsyncConnection[Any],
    q: Statements,
    level: str,
    params: dict[str, Any],
    *,
    keys: list[str] | None,
    after_key: str | None,
) -> list[tuple[str, bool]]:
    """One page of the selection: (key, passes the filters)."""
    cur = await conn.execute(
        q.text(f"rerun_select_{level}"),
        {
            **params,
            "keys": keys,
            "after_key": after_key,
            # named keys are a batch already: no LIMIT, which would make the planner walk
            # the key index in order rather than look each key up
            "limit": None if keys is not None else params["limit"],
        },
        prepare=False,
    )
    return [(k, bool(m)) for k, m in await cur.fetchall()]


async def _pass(
    conn: AsyncConnection[Any],
    q: Statements,
    plan: RerunPlan,
    params: dict[str, Any],
    keys: list[str],
    tally: Tally,
    in_flight: str,
    *,
    lock: bool,
) -> list[str]:
    """One transaction over a batch: re-run what can be (with ``lock`` false: count what
    would be, changing nothing); returns the keys a worker held, for another pass."""
    cur = conn.cursor(row_factory=dict_row)
    async with conn.transaction(force_rollback=not lock):
        rows = await _positions(cur, q, plan, params, keys, lock)
        tally.skip("not_found", (k for k in keys if k not in rows))
        chosen, busy = _choose(plan, rows, tally, params["in_flight_status"], in_flight, lock)

        # the groups of the chosen rows, when the stage's chain leads to a group stage
        def group_of(key: str) -> str | None:
            found = rows[key].get("group_key")
            return str(found) if plan.group_stages and found is not None else None

        members = {g for k in chosen if (g := group_of(k)) is not None}
        groups: dict[str, dict[str, Any]] = {}
        if members:
            await cur.execute(
                q.text("rerun_groups"),
                {**params, "groups": sorted(members), "lock": lock, "fan_in": True},
                prepare=False,
            )
            groups = {r["key"]: r for r in await cur.fetchall()}
            held = {g for g, r in groups.items() if lock and not r["locked"]}
            busy += [k for k in chosen if group_of(k) in held]
            chosen = [k for k in chosen if group_of(k) not in held]

        # the live runs and pending retries of the chosen rows, and of their formed groups
        apart = {g for g, r in groups.items() if r["formed"] and (r["locked"] or not lock)}
        row_runs = await _runs(cur, q, params, chosen, plan.reached, lock)
        group_runs = await _runs(cur, q, params, sorted(apart), plan.group_stages, lock)
        held_rows = {r["row_key"] for r in row_runs if lock and not r["locked"]}
        held_groups = {r["row_key"] for r in group_runs if lock and not r["locked"]}
        waits = {k for k in chosen if k in held_rows or group_of(k) in held_groups}
        busy += [k for k in chosen if k in waits]
        chosen = [k for k in chosen if k not in waits]
        kept_groups = {g for k in chosen if (g := group_of(k)) is not None}
        apart &= kept_groups
        stopped = {g for g in apart if not _at_rest(plan, groups[g])}
        kept = set(chosen)
        stopping = [r for r in row_runs if r["row_key"] in kept]
        stopping += [r for r in group_runs if r["row_key"] in apart]
        if lock:
            await _write(cur, q, plan, params, chosen, stopping, apart, tally)
        else:
            tally.runs_cancelled += sum(1 for r in stopping if r["live"])
            tally.retries_dropped += sum(1 for r in stopping if not r["live"])
    tally.keys += chosen
    tally.in_flight += [k for k in chosen if rows[k]["status"] == params["in_flight_status"]]
    tally.groups |= kept_groups
    tally.groups_stopped |= stopped
    return busy


async def _positions(
    cur: AsyncCursor[dict[str, Any]],
    q: Statements,
    plan: RerunPlan,
    params: dict[str, Any],
    keys: list[str],
    lock: bool,
) -> dict[str, dict[str, Any]]:
    """Where each row (formed group) of the batch is, by key, and whether it is held now."""
    if plan.stage.group:
        await cur.execute(
            q.text("rerun_groups"),
            {**params, "groups": keys, "lock": lock, "fan_in": False},
            prepare=False,
        )
        return {r["key"]: r for r in await cur.fetchall() if r["formed"]}
    await cur.execute(q.text("rerun_rows"), {**params, "keys": keys, "lock": lock}, prepare=False)
    return {r["key"]: r for r in await cur.fetchall()}


def _choose(
    plan: RerunPlan,
    rows: dict[str, dict[str, Any]],
    tally: Tally,
    running: str,
    in_flight: str,
    lock: bool,
) -> tuple[list[str], list[str]]:
    """The rows to re-run, and those a worker holds (for another pass); the others are
    counted as skipped."""
    chosen: list[str] = []
    busy: list[str] = []
    for key, row in rows.items():
        if lock and not row["locked"]:
            busy.append(key)
        elif row["step"] not in plan.reached:
            tally.skip("not_reached", [key])
        elif row["status"] == running and in_flight == "skip":
            tally.skip("in_flight", [key])
        else:
            chosen.append(key)
    return chosen, busy


async def _write(
    cur: AsyncCursor[dict[str, Any]],
    q: Statements,
    plan: RerunPlan,
    params: dict[str, Any],
    chosen: list[str],
    stopping: list[dict[str, Any]],
    apart: set[str],
    tally: Tally,
) -> None:
    """Cancel the runs, set aside the results of those that run again, move the rows
    (groups) back, take their groups apart: all held by this transaction, so none of it
    waits."""
    if stopping:
        await cur.execute(
            q.text("rerun_close_runs"),
            {**params, "ids": [r["id"] for r in stopping]},
            prepare=False,
        )
        closed = await cur.fetchone()
        assert closed is not None
        tally.runs_cancelled += closed["closed"]
        tally.retries_dropped += closed["dropped"]
        # the closed runs' slots of a max_running stage, freed and announced now
        await cur.execute(q.text("free_stale_slots"), params, prepare=False)
    for keys, stages in ((chosen, plan.reached), (sorted(apart), plan.group_stages)):
        if keys and stages:
            await cur.execute(
                q.text("rerun_supersede_results"),
                {**params, "keys": keys, "stages": list(stages)},
                prepare=False,
            )
    if chosen and plan.stage.group:
        await cur.execute(q.text("rerun_move_groups"), {**params, "groups": chosen}, prepare=False)
    elif chosen:
        await cur.execute(q.text("rerun_move_rows"), {**params, "keys": chosen}, prepare=False)
    if apart:
        await cur.execute(
            q.text("rerun_unform_groups"), {**params, "groups": sorted(apart)}, prepare=False
        )


async def _runs(
    cur: AsyncCursor[dict[str, Any]],
    q: Statements,
    params: dict[str, Any],
    keys: Sequence[str],
    stages: Sequence[str],
    lock: bool,
) -> list[dict[str, Any]]:
    """The live runs and pending retries of ``keys`` at ``stages``; with ``lock``, each
    says whether this transaction now holds it."""
    if not keys or not stages:
        return []
    await cur.execute(
        q.text("rerun_runs"),
        {**params, "keys": list(keys), "stages": list(stages), "lock": lock},
        prepare=False,
    )
    return await cur.fetchall()


def _at_rest(plan: RerunPlan, group: dict[str, Any]) -> bool:
    """A formed group that nothing runs on and nothing will start: failed, or done at the
    last group stage (taking it apart stops nothing)."""
    if group["status"] == "failed":
        return True
    return group["status"] == "done" and group["step"] in plan.last_group_stages
