"""Recovery: finding what a lost notification, a dead worker or a crash left, and
re-driving it through the normal path (a notification, then a claim), so that a scan can
never cause a second run. Workers probe on an interval (:func:`probe`); the
:class:`RecoveryScanner` does the same without a worker, for ``pgstagechain recover``.

What it finds, each with an index-backed query:

* rows at ``(step, done)`` whose next stage was never claimed (a notification was lost,
  the listener was down, no worker was running): it sends their notification again;
* groups whose members all finished but whose group stage never started: likewise;
* runs whose lease expired (the worker crashed or froze): it closes them, scheduling a
  retry when attempts remain and failing the row otherwise;
* rows (or groups) at ``(stage, running)`` that no run holds at all (a claim lost in a
  server crash, a row set to running by hand): it records a run that says so, with a
  retry due now, so the stage runs again.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import attrs
from psycopg import AsyncConnection

from ._claim import Claimer, claimer_for
from ._connect import connect, conninfo_with_defaults
from ._graph_change import stale_stages
from ._hints import Hints
from ._install import fingerprint, installed_config, require_installed
from ._links import DB_ERRORS, Link
from ._membership import Membership
from ._pipeline import Pipeline
from ._runs import WorkerStats
from ._stage import Stage
from .errors import NotInstalledError

logger = logging.getLogger("pgstagechain.recovery")


@attrs.frozen(kw_only=True)
class RecoveryReport:
    """What one scan found and did."""

    expired_leases: int
    #: rows or groups at (stage, running) that no run held, sent through their stage again
    unheld_repaired: int = 0
    renotified_rows: int
    renotified_groups: int
    formed_groups: int
    next_retry_at: dt.datetime | None
    #: slots of a stage's ``max_running`` held by runs that ended without freeing them
    #: (cancelled by an operator, deleted), freed
    freed_slots: int = 0

    @property
    def total(self) -> int:
        return (
            self.expired_leases
            + self.unheld_repaired
            + self.freed_slots
            + self.renotified_rows
            + self.renotified_groups
            + self.formed_groups
        )


@attrs.frozen(kw_only=True)
class Probe:
    """What a worker's scan found: steps with ready rows (or groups) for the stages it
    serves, runs rescued from dead workers, rows no run held, and the next retry due."""

    ready_steps: tuple[str, ...]
    rescued: int
    repaired: int
    next_retry_at: dt.datetime | None
    #: the live workers of each stage, when asked for (see _membership)
    members: dict[str, list[int]] | None = None
    #: the installed graph's digest, and a digest of the stage limits in the database
    digest: str | None = None
    limits_stamp: str | None = None


async def probe(
    conn: AsyncConnection[Any],
    claimer: Claimer,
    served: Sequence[Stage],
    membership: Membership | None = None,
) -> Probe:
    """One index-backed look for work a notification did not announce; when something is
    stuck, repair it (the same repair as :meth:`RecoveryScanner.scan`). The same statement
    lists the live workers (with a ``membership``) and stamps of the installed graph and
    limits."""
    cur = await conn.execute(
        claimer.text("worker_probe"),
        claimer.params(
            row_steps=[s.after for s in served if not s.group],
            group_steps=[s.after for s in served if s.group],
            pipeline_number=None if membership is None else membership.pipeline_number,
        ),
    )
    found = await cur.fetchone()
    assert found is not None
    ready_rows, ready_groups, stuck, next_retry_at, members, digest, limits_stamp = found
    rescued = repaired = 0
    if stuck:
        closed = await claimer.expire(conn)
        repaired = sum(1 for *_, was_unheld in closed if was_unheld)
        rescued = len(closed) - repaired
        if rescued:
            logger.warning("rescued %d run(s) whose lease expired", rescued)
            next_retry_at = dt.datetime.now(dt.UTC)
        if repaired:
            logger.warning(
                "found %d row(s) at (stage, running) that no run held; running them again",
                repaired,
            )
    return Probe(
        ready_steps=(*(ready_rows or ()), *(ready_groups or ())),
        rescued=rescued,
        repaired=repaired,
        next_retry_at=next_retry_at,
        members=members if membership is not None else None,
        digest=digest,
        limits_stamp=limits_stamp,
    )


class WorkerScan:
    """A worker's recovery: a probe every ``interval`` seconds, and at once when asked
    (after every (re)LISTEN); what it finds becomes hints for the dispatcher."""

    def __init__(
        self,
        claimer: Claimer,
        control: Link,
        served: Sequence[Stage],
        hints: Hints,
        stats: WorkerStats,
        *,
        interval: float,
        retire: Callable[[NotInstalledError], None] = lambda error: None,
        membership: Membership | None = None,
    ) -> None:
        self.membership = membership
        self.claimer = claimer
        self.control = control
        self.served = tuple(served)
        self.hints = hints
        self.stats = stats
        self.interval = interval
        self._asked = anyio.Event()
        self._retire = retire
        self._digest = fingerprint(claimer.pipeline)["digest"]
        self._graph_seen: str | None = None
        self._limits_seen: str | None = None

    def now(self) -> None:
        """Scan at once (the listener just (re)connected: notifications may be lost)."""
        self._asked.set()

    async def run(self) -> None:
        while True:
            with anyio.move_on_after(self.interval):
                await self._asked.wait()
            self._asked = anyio.Event()
            try:
                await self.scan()
            except DB_ERRORS as exc:
                self.stats.db_errors += 1
                await self.control.broke(exc)

    async def scan(self) -> float | None:
        """Find work a notification did not announce; return seconds to the next retry."""
        self.stats.scans += 1
        conn = await self.control.get()
        found = await probe(conn, self.claimer, self.served, self.membership)
        # An idle worker's scan is one statement: the graph and the limits are read only
        # when their stamps in the probe changed.
        if found.digest not in (None, self._digest, self._graph_seen):
            await self._check_graph(conn)
        if found.limits_stamp != self._limits_seen:
            await self.claimer.refresh_limits(conn)
            self._limits_seen = found.limits_stamp
        await self.claimer.free_stale_slots(conn)
        if self.membership is not None:
            self.membership.update(found.members)
        self.stats.rescued += found.rescued
        self.stats.repaired += found.repaired
        pipeline = self.claimer.pipeline
        for step in found.ready_steps:
            target = pipeline.next_stage(step)
            if target is not None and target.name in self.hints.needs_scan:
                self.hints.found_ready(target.name)
        wait: float | None = None
        if found.next_retry_at is not None:
            wait = (found.next_retry_at - dt.datetime.now(dt.UTC)).total_seconds()
            if wait <= 0:
                self.hints.retries_due()
        self.hints.wake()
        return wait

    async def _check_graph(self, conn: AsyncConnection[Any]) -> None:
        """A ``migrate`` that changed the graph while this worker ran: when a stage it
        serves has another place now, claiming it by this worker's graph would go against
        the installed one, so the worker retires (drains and ends); otherwise it says so
        once and goes on."""
        config = await installed_config(conn, self.claimer.pipeline)
        digest = config.get("digest") if config else None
        if config is None or digest in (self._digest, self._graph_seen):
            return
        self._graph_seen = digest
        pipeline = self.claimer.pipeline
        stale = stale_stages(config, pipeline, [s.name for s in self.served])
        if stale:
            self._retire(
                NotInstalledError(
                    f"pipeline {pipeline.name!r} was migrated to another stage graph while "
                    f"this worker ran, and stage(s) {', '.join(stale)} it serves have another "
                    "place there: it stops claiming and ends; run workers with the new code"
                )
            )
        else:
            logger.warning(
                "pipeline %s was migrated since this worker started; the stages it serves "
                "(%s) keep their place in the installed graph, so it goes on",
                pipeline.name,
                ", ".join(s.name for s in self.served),
            )


class RecoveryScanner:
    """Scan a pipeline for stuck work and re-drive it; see the module docstring."""

    def __init__(self, pipeline: Pipeline, conninfo: str = "", *, limit: int = 10_000) -> None:
        pipeline.validate()
        self.pipeline = pipeline
        self.conninfo = conninfo_with_defaults(conninfo, "pgstagechain-recovery")
        self.limit = limit

    async def scan(
        self, conn: AsyncConnection[Any] | None = None, *, deep: bool = False
    ) -> RecoveryReport:
        """Run one scan. ``deep`` also looks for groups that formed while no trigger was
        installed, and for expired runs whose row was moved on by hand while they ran
        (full passes over the fan-in steps and the live runs, not index-bounded)."""
        if conn is None:
            async with await connect(self.conninfo, autocommit=True) as own:
                return await self.scan(own, deep=deep)
        await require_installed(conn, self.pipeline)
        claimer = await claimer_for(conn, self.pipeline)
        stages = list(self.pipeline)
        row_steps = [s.after for s in stages if not s.group]
        group_steps = [s.after for s in stages if s.group]
        async with conn.transaction():
            closed = await claimer.expire(conn, deep=deep)
        await claimer.refresh_limits(conn)
        freed = await claimer.free_stale_slots(conn)
        unheld = sum(1 for *_, was_unheld in closed if was_unheld)
        formed = 0
        if deep and self.pipeline.table.group_column is not None:
            cur = await conn.execute(
                claimer.text("form_groups"),
                claimer.params(fan_in_steps=list(self.pipeline.fan_in_steps())),
            )
            formed = len(await cur.fetchall())
        cur = await conn.execute(
            claimer.text("renotify_rows"), claimer.params(row_steps=row_steps, limit=self.limit)
        )
        rows = await cur.fetchone()
        cur = await conn.execute(
            claimer.text("renotify_groups"),
            claimer.params(group_steps=group_steps, limit=self.limit),
        )
        groups = await cur.fetchone()
        cur = await conn.execute(claimer.text("next_retry"), claimer.params())
        retry = await cur.fetchone()
        report = RecoveryReport(
            expired_leases=len(closed) - unheld,
            unheld_repaired=unheld,
            renotified_rows=int(rows[0]) if rows else 0,
            renotified_groups=int(groups[0]) if groups else 0,
            formed_groups=formed,
            next_retry_at=retry[0] if retry else None,
            freed_slots=freed,
        )
        if report.total:
            logger.info("recovery scan of %s: %s", self.pipeline.name, report)
        return report

    async def run(self, interval: float = 10.0) -> None:
        """Scan every ``interval`` seconds until cancelled (for a process with no worker)."""
        while True:
            try:
                await self.scan()
            except Exception:
                logger.exception("recovery scan of %s failed", self.pipeline.name)
            await anyio.sleep(interval)
