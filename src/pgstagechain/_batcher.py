"""Completions of runs that did not write on their connection, committed in batches.

Two completers, each on its own connection: while one batch's statement runs, the
handlers of the next batch finish here, so neither side waits on the other. A batch goes
out once a pass of the event loop added nothing to it (at light load, one pass: a few
microseconds), or when it is full.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anyio
import anyio.lowlevel

from ._claim import Claimer, Completion
from ._context import Claim
from ._links import DB_ERRORS, Link
from ._runs import LiveRuns, WorkerStats
from ._stage import Stage

logger = logging.getLogger("pgstagechain.worker")

#: completion statements in flight at once (one connection each)
COMPLETERS = 2
#: tries of one batch's statement before its runs are left to their leases
FLUSH_ATTEMPTS = 5


class _Batch:
    """Completions waiting for the next flush, by (stage, group stage, go on to the next)."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, bool, bool], list[Completion]] = {}
        self.size = 0
        self.done = anyio.Event()
        #: tokens of the runs completed, and the claims chained to them
        self.completed: set[int] = set()
        self.chained: dict[int, Claim] = {}


class CompletionBatcher:
    """Collects completions and commits each batch in one statement per stage."""

    def __init__(
        self,
        claimer: Claimer,
        links: Sequence[Link],
        runs: LiveRuns,
        stats: WorkerStats,
        *,
        worker_id: str,
        lease: float,
        batch_size: int,
    ) -> None:
        self.claimer = claimer
        self.links = list(links)
        self.runs = runs
        self.stats = stats
        self.worker_id = worker_id
        self.lease = lease
        self.batch_size = batch_size
        self._batch = _Batch()
        self._ready = anyio.Event()
        self._flushing = 0

    @property
    def busy(self) -> bool:
        """Completions wait in a batch or are being committed."""
        return bool(self._batch.items or self._flushing)

    async def complete(
        self, stage: Stage, claim: Claim, payload: str | None, *, chain: bool
    ) -> tuple[bool, Claim | None]:
        """Complete ``claim`` in the next batch; return whether it was still ours, and the
        claim of its next stage when it went straight on (``chain``)."""
        batch = self._batch
        batch.items.setdefault((stage.name, stage.group, chain), []).append(
            (claim.run_id, claim.token, claim.row_key, payload, chain)
        )
        batch.size += 1
        self._ready.set()
        self.runs.concluding.add(claim.token)
        try:
            await batch.done.wait()
        finally:
            self.runs.concluding.discard(claim.token)
        return claim.token in batch.completed, batch.chained.get(claim.token)

    async def run(self) -> None:
        """Run the completers until cancelled."""
        async with anyio.create_task_group() as tg:
            for link in self.links:
                tg.start_soon(self._completer, link)

    async def _completer(self, link: Link) -> None:
        while True:
            await self._ready.wait()
            if not self._batch.items:
                # another completer took the batch that woke this one
                self._ready = anyio.Event()
                continue
            seen = 0
            while seen != self._batch.size < self.batch_size:
                seen = self._batch.size
                await anyio.lowlevel.checkpoint()
            self._ready = anyio.Event()
            batch, self._batch = self._batch, _Batch()
            self._flushing += 1
            try:
                await self._flush(batch, link)
            finally:
                self._flushing -= 1
                batch.done.set()

    async def _flush(self, batch: _Batch, link: Link) -> None:
        for (stage, is_group, _), items in batch.items.items():
            for attempt in range(1, FLUSH_ATTEMPTS + 1):
                try:
                    conn = await link.get()
                    completed, chained = await self.claimer.complete_many(
                        conn, stage, is_group, items, worker_id=self.worker_id, lease=self.lease
                    )
                    batch.completed |= completed
                    batch.chained.update(chained)
                    link.ok()
                    break
                except DB_ERRORS as exc:
                    # Safe to repeat: a completion only applies to runs still running, and
                    # only to the very runs claimed (ids and tokens), even after a crash.
                    self.stats.db_errors += 1
                    if attempt == FLUSH_ATTEMPTS:
                        logger.error(
                            "gave up completing %d run(s) of %s: %s", len(items), stage, exc
                        )
                    await link.broke(exc)
