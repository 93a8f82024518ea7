"""The dispatcher decides what to claim when: it turns hints into batched claims within
the free slots, each stage in turn, and hands every claim to a task of its own."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import psycopg
from psycopg import AsyncConnection

from ._claim import Claimer, Held
from ._context import Claim
from ._hints import Hints, Pick
from ._links import DB_ERRORS, Link
from ._runs import LiveRuns, WorkerStats
from ._stage import Stage

#: what a key from a notification can cause when cast to the key column's type (a
#: domain's CHECK raises an integrity error)
BAD_KEY_ERRORS = (psycopg.DataError, psycopg.IntegrityError, UnicodeError)

#: Claims are planned once per connection, not at every execution. PostgreSQL keeps
#: choosing custom plans for them (a fresh plan each time, about a third of a light-load
#: claim's server time), while the generic plan of each is the one a custom plan would
#: pick anyway: lookups by key through the primary key, ready rows through the state index.
GENERIC_PLANS = "SET plan_cache_mode = force_generic_plan"


class Wake:
    """Something changed (a hint came, a slot freed, a retry fell due): look again."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, seconds: float | None) -> None:
        """Wait until woken or ``seconds`` passed (None: until woken), then re-arm."""
        if seconds is None:  # no cancel scope to enter and leave on the hand-over path
            await self._event.wait()
        else:
            with anyio.move_on_after(seconds):
                await self._event.wait()
        self._event = anyio.Event()


class Dispatcher:
    def __init__(
        self,
        *,
        claimer: Claimer,
        served: Sequence[Stage],
        hints: Hints,
        runs: LiveRuns,
        control: Link,
        stats: WorkerStats,
        worker_id: str,
        lease: float,
        batch_size: int,
        start: Callable[[Stage, Sequence[Claim]], None],
    ) -> None:
        self.claimer = claimer
        self.served = tuple(served)
        self.hints = hints
        self.runs = runs
        self.control = control
        self.stats = stats
        self.worker_id = worker_id
        self.lease = lease
        self.batch_size = batch_size
        self.start = start
        self._order = itertools.cycle(range(len(self.served)))
        self._planned: AsyncConnection[Any] | None = None

    async def dispatch_once(self, stopping: Callable[[], bool]) -> bool:
        """Claim what can be claimed now, each stage in turn; True if anything was tried."""
        tried = False
        self.hints.release_due()
        first = next(self._order)
        for offset in range(len(self.served)):
            if stopping():
                break
            stage = self.served[(first + offset) % len(self.served)]
            free = self.runs.free(stage.name)
            if free <= 0:
                continue
            limit = min(free, self.batch_size)
            pick = self.hints.pick(stage.name, limit)
            if pick is None:
                continue
            tried = True
            freed_before = self.hints.slots_freed[stage.name]
            try:
                claims, held, pick = await self._claim(stage, pick, limit)
                self.control.ok()
            except DB_ERRORS as exc:
                self.stats.db_errors += 1
                self.hints.needs_scan[stage.name] = True  # the hints are gone; a scan finds them
                await self.control.broke(exc)
                continue
            self.hints.claimed(stage.name, pick, limit, len(claims), held=held is not None)
            if held is not None:
                self.hints.hold(stage.name, pick.mode == "retry", held, freed_before)
            if claims:
                self.stats.claimed += len(claims)
                self.runs.add(stage.name, claims)
                self.start(stage, claims)
        return tried

    async def _connection(self) -> AsyncConnection[Any]:
        """The control connection, set to plan claims once (see :data:`GENERIC_PLANS`)."""
        conn = await self.control.get()
        if conn is not self._planned:
            await conn.execute(GENERIC_PLANS)
            self._planned = conn
        return conn

    async def _claim(
        self, stage: Stage, pick: Pick, limit: int
    ) -> tuple[list[Claim], Held | None, Pick]:
        conn = await self._connection()
        held: Held | None = None
        try:
            claims, held = await self.claimer.claim_within_limits(
                conn,
                stage.name,
                keys=pick.keys,
                limit=limit,
                worker_id=self.worker_id,
                lease=self.lease,
                retries=pick.mode == "retry",
            )
        except BAD_KEY_ERRORS:
            if pick.keys is None:
                raise
            # A hint whose key does not fit the key column (anyone can NOTIFY): try the
            # batch's keys one by one, dropping those.
            claims, valid = await self._claim_each(conn, stage.name, pick.keys)
            pick = Pick(pick.mode, valid)
        return claims, held, pick

    async def _claim_each(
        self, conn: AsyncConnection[Any], stage: str, keys: list[str]
    ) -> tuple[list[Claim], list[str]]:
        """Claim ``keys`` one at a time; return the claims and the keys that were valid."""
        claims: list[Claim] = []
        valid: list[str] = []
        for key in keys:
            try:
                claims += await self.claimer.claim(
                    conn, stage, keys=[key], worker_id=self.worker_id, lease=self.lease
                )
                valid.append(key)
            except BAD_KEY_ERRORS as exc:
                self.hints.ignored(
                    f"a notification for {stage} whose key {key[:80]!r} does not fit the key column",
                    exc,
                )
        return claims, valid
