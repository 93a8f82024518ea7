"""The lease keeper: renews the leases of every live run of a worker in one statement, and
cancels the handler of a run that turns out to be no longer ours."""

from __future__ import annotations

import logging

import anyio

from ._claim import Claimer
from ._links import DB_ERRORS, Link
from ._runs import LiveRuns, WorkerStats

logger = logging.getLogger("pgstagechain.worker")

#: renewals per lease: a lease survives two missed heartbeats
RENEWALS_PER_LEASE = 3


class LeaseKeeper:
    def __init__(
        self, claimer: Claimer, link: Link, runs: LiveRuns, stats: WorkerStats, *, lease: float
    ) -> None:
        self.claimer = claimer
        self.link = link
        self.runs = runs
        self.stats = stats
        self.lease = lease

    async def run(self) -> None:
        """Renew every ``lease / RENEWALS_PER_LEASE`` seconds until cancelled."""
        while True:
            await anyio.sleep(self.lease / RENEWALS_PER_LEASE)
            await self.renew()

    async def renew(self) -> None:
        held = self.runs.held()
        if not held:
            return
        try:
            conn = await self.link.get()
            cur = await conn.execute(
                self.claimer.text("renew_leases"),
                {
                    "run_ids": [c.run_id for c in held],
                    "tokens": [c.token for c in held],
                    "lease": self.lease,
                },
            )
            kept = {token for (token,) in await cur.fetchall()}
            self.link.ok()
        except DB_ERRORS as exc:
            self.stats.db_errors += 1
            await self.link.broke(exc)
            return
        for claim in held:
            # a run that ended or is being completed meanwhile is not lost
            if claim.token not in kept and self.runs.cancel_lost(claim):
                logger.warning("run %s lost its lease; cancelling its handler", claim.run_id)
