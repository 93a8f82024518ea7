"""Deleting finished runs past their window: :func:`prune` (``pgstagechain prune``, public as
:func:`pgstagechain.admin.prune`) and :class:`RetentionKeeper`, the worker's periodic pass.

A pass walks the ledger from its oldest run by run id, a batch at a time (see
``sql/retention.sql`` for the rules), each batch one short statement of its own, and stops
at the first batch that reaches runs younger than the shorter window. One worker at a time
runs its pass (a session advisory lock per pipeline); a pass by hand takes no lock, and two
passes at once are safe: each skips the runs the other has locked.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
from collections import Counter
from collections.abc import Mapping
from typing import Any

import anyio
import attrs
from psycopg import AsyncConnection

from ._catalog import statements_for
from ._connect import connect
from ._install import require_installed
from ._links import DB_ERRORS
from ._pipeline import Pipeline
from ._retention import DEFAULT_BATCH, Retention
from ._sql import pipeline_params
from .errors import ConfigurationError

logger = logging.getLogger("pgstagechain.retention")

#: seconds a worker's pass waits between two batches, leaving the server to the workers
PAUSE = 0.02


@attrs.frozen(kw_only=True)
class PruneReport:
    """What one pass deleted (or, in a dry run, would delete), by the runs' state."""

    pipeline: str
    dry_run: bool
    #: runs deleted (would be deleted) by state: succeeded, failed, expired, cancelled
    by_state: Mapping[str, int]
    #: runs read, of every pipeline (the pass walks the ledger by run id)
    scanned: int
    batches: int
    #: the windows applied
    succeeded_older_than: dt.timedelta
    failed_older_than: dt.timedelta

    @property
    def total(self) -> int:
        return sum(self.by_state.values())


def windows(
    pipeline: Pipeline,
    older_than: dt.timedelta | None = None,
    failed_older_than: dt.timedelta | None = None,
) -> tuple[dt.timedelta, dt.timedelta]:
    """The (succeeded, failed) windows: as given, else the pipeline's :class:`Retention`.

    ``older_than`` alone keeps runs that did not succeed as long as the pipeline's
    retention says, when that is longer."""
    declared = pipeline.retention
    if older_than is None:
        if declared is None:
            raise ConfigurationError(
                f"pipeline {pipeline.name!r} declares no retention: say how old the runs "
                "to delete are (--older-than 30d, or older_than=timedelta(days=30))"
            )
        older_than = declared.finished
    for name, value in (("older_than", older_than), ("failed_older_than", failed_older_than)):
        if value is not None and (not isinstance(value, dt.timedelta) or value <= dt.timedelta(0)):
            raise ConfigurationError(f"{name} must be a positive timedelta, got {value!r}")
    if failed_older_than is None:
        failed_older_than = max(older_than, declared.failed_window if declared else older_than)
    if failed_older_than < older_than:
        raise ConfigurationError(
            f"failed_older_than ({failed_older_than}) is shorter than older_than "
            f"({older_than}): runs that did not succeed are kept at least as long"
        )
    return older_than, failed_older_than


def prune_params(pipeline: Pipeline) -> dict[str, Any]:
    """The steps the rules of ``sql/retention.sql`` name, from the pipeline's graph."""
    rows = [s for s in pipeline if not s.group]
    groups = [s for s in pipeline if s.group]
    row_steps = [*pipeline.start_steps, *(s.name for s in rows)]
    return {
        **pipeline_params(pipeline),
        "row_stages": [s.name for s in rows],
        "group_stages": [s.name for s in groups],
        # row steps with no next stage: a row done there is done with the pipeline
        "end_steps": [s for s in row_steps if pipeline.next_stage(s) is None],
        # row steps on a chain that leads to a group stage, and the steps the group
        # stages follow: such a row is settled only once its group is
        "member_steps": list(pipeline.fan_in_of()),
        "fan_in_steps": list(pipeline.fan_in_steps()),
        "end_group_steps": [s.name for s in groups if pipeline.next_stage(s.name) is None],
    }


async def prune(
    conn: AsyncConnection[Any],
    pipeline: Pipeline,
    *,
    older_than: dt.timedelta | None = None,
    failed_older_than: dt.timedelta | None = None,
    dry_run: bool = False,
    batch: int | None = None,
    pause: float = 0.0,
) -> PruneReport:
    """Delete the pipeline's finished runs past their window, in batches; return the counts.

    The windows are ``older_than`` (runs that succeeded) and ``failed_older_than`` (runs
    that did not, and runs of rows that failed for good), by default the pipeline's
    :class:`~pgstagechain.Retention`; runs that rows still in flight may read are kept
    whatever their age (docs/operations.md, "Ledger retention"). ``dry_run`` deletes
    nothing and counts what would go. ``conn`` must be in autocommit mode: every batch
    commits on its own.
    """
    if not conn.autocommit:
        raise ConfigurationError(
            "prune needs an autocommit connection: each batch is a transaction of its own"
        )
    succeeded, failed = windows(pipeline, older_than, failed_older_than)
    size = batch if batch is not None else _batch_of(pipeline.retention)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigurationError(f"batch must be a positive whole number, got {size!r}")
    await require_installed(conn, pipeline)
    q = await statements_for(conn, pipeline)
    statement = q.text("prune_runs_count" if dry_run else "prune_runs")
    params = {
        **prune_params(pipeline),
        "keep_succeeded": succeeded,
        "keep_failed": failed,
        "batch": size,
        "after": 0,
    }
    counts: Counter[str] = Counter()
    scanned = batches = 0
    while True:
        cur = await conn.execute(statement, params)
        found = await cur.fetchone()
        assert found is not None
        read, last_id, young, states = found
        batches += 1
        scanned += read
        counts.update({state: int(n) for state, n in states.items()})
        if read < size or young:
            break
        params["after"] = last_id
        if pause:
            await anyio.sleep(pause)
    report = PruneReport(
        pipeline=pipeline.name,
        dry_run=dry_run,
        by_state=dict(sorted(counts.items())),
        scanned=scanned,
        batches=batches,
        succeeded_older_than=succeeded,
        failed_older_than=failed,
    )
    if report.total and not dry_run:
        logger.info(
            "pruned %d run(s) of %s (%s)",
            report.total,
            pipeline.name,
            ", ".join(f"{n} {s}" for s, n in report.by_state.items()),
        )
    return report


def _batch_of(retention: Retention | None) -> int:
    return retention.batch if retention is not None else DEFAULT_BATCH


async def prune_alone(
    conn: AsyncConnection[Any], pipeline: Pipeline, **options: Any
) -> PruneReport | None:
    """:func:`prune`, unless another pass of this pipeline is under way (then None)."""
    params = {"pipeline": pipeline.name}
    q = await statements_for(conn, pipeline)
    locked = await (await conn.execute(q.text("prune_lock"), params)).fetchone()
    if not (locked and locked[0]):
        return None
    try:
        return await prune(conn, pipeline, **options)
    finally:
        if not conn.closed and not conn.broken:
            await conn.execute(q.text("prune_unlock"), params)


class RetentionKeeper:
    """A worker's retention: a pass every ``Retention.every`` (the first after a random
    part of it, so that workers started together do not all try at once), on a
    connection of its own, skipped when another worker's pass is under way."""

    def __init__(self, pipeline: Pipeline, conninfo: str) -> None:
        if pipeline.retention is None:
            raise ConfigurationError(f"pipeline {pipeline.name!r} declares no retention")
        self.pipeline = pipeline
        self.conninfo = conninfo
        self.retention = pipeline.retention
        self.passes = 0

    async def run(self) -> None:
        every = self.retention.every.total_seconds()
        await anyio.sleep(every * random.random())
        while True:
            try:
                await self.once()
            except DB_ERRORS as exc:  # the database is away: the next turn tries again
                logger.warning("retention pass of %s failed: %s", self.pipeline.name, exc)
            except Exception:  # never the end of the worker, whose runs come first
                logger.exception("retention pass of %s failed", self.pipeline.name)
            await anyio.sleep(every)

    async def once(self) -> PruneReport | None:
        """One pass, unless another is under way."""
        async with await connect(
            self.conninfo, autocommit=True, application_name="pgstagechain-retention"
        ) as conn:
            found = await prune_alone(conn, self.pipeline, pause=PAUSE)
        self.passes += 1
        return found
