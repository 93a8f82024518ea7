"""What a worker holds: its counters, and its live runs with the slots they take.

Runs are known by their claim's token, not their id: ids can repeat after a server crash.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import anyio
import attrs

from ._context import Claim


@attrs.define
class WorkerStats:
    """Counters since the worker started; all monotonic."""

    notifications: int = 0
    malformed: int = 0
    claimed: int = 0
    races_lost: int = 0
    #: claim statements that got nothing at all (any kind: by key, ready rows, retries)
    claims_empty: int = 0
    #: announced keys left to the worker they hash to
    left_to_peers: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    timed_out: int = 0
    lease_lost: int = 0
    rescued: int = 0
    repaired: int = 0
    chained: int = 0
    scans: int = 0
    db_errors: int = 0


class LiveRuns:
    """The runs in flight on this worker, each with the cancel scope of the task that runs
    it, and the slots they take: ``total`` at once, and ``limits[stage]`` per stage.

    A row that goes straight on to its next stage here keeps its task (and its scope): the
    slot of the next stage is booked before the completion and passes along with the row.
    """

    def __init__(self, limits: Mapping[str, int], total: int, on_free: Callable[[], None]) -> None:
        self.limits = dict(limits)
        self.total = total
        self.in_flight = {stage: 0 for stage in limits}
        self.count = 0
        self.scopes: dict[int, tuple[Claim, anyio.CancelScope]] = {}
        #: runs whose completion is on its way (in a batch, or being committed by the
        #: handler's own transaction): not lost, whatever a lease renewal finds
        self.concluding: set[int] = set()
        self._on_free = on_free

    def free(self, stage: str) -> int:
        """Slots open for ``stage`` now."""
        return min(self.total - self.count, self.limits[stage] - self.in_flight[stage])

    def add(self, stage: str, claims: Sequence[Claim]) -> None:
        self.in_flight[stage] += len(claims)
        self.count += len(claims)
        for claim in claims:
            self.scopes[claim.token] = (claim, anyio.CancelScope())

    def scope(self, claim: Claim) -> anyio.CancelScope:
        return self.scopes[claim.token][1]

    def finish(self, stage: str, claim: Claim) -> None:
        """The task that ran ``claim`` (the last of its chain) has ended."""
        self.scopes.pop(claim.token, None)
        self.in_flight[stage] -= 1
        self.count -= 1
        self._on_free()

    def book(self, stage: str) -> bool:
        """Book a slot of ``stage`` for a row going straight on to it."""
        if stage not in self.in_flight or self.in_flight[stage] >= self.limits[stage]:
            return False
        self.in_flight[stage] += 1
        return True

    def unbook(self, stage: str) -> None:
        self.in_flight[stage] -= 1
        self._on_free()

    def pass_on(self, stage: str, done: Claim, following: Claim) -> None:
        """``done`` went straight on as ``following`` (whose stage's slot was booked)."""
        scope = self.scopes.pop(done.token)[1]
        self.scopes[following.token] = (following, scope)
        self.in_flight[stage] -= 1

    def held(self) -> list[Claim]:
        """The claims of every live run."""
        return [claim for claim, _ in self.scopes.values()]

    def is_live(self, claim: Claim) -> bool:
        return claim.token in self.scopes

    def cancel_lost(self, claim: Claim) -> bool:
        """Cancel the task of a run whose claim is no longer ours, unless the run ended or
        is concluding meanwhile; True if it was cancelled."""
        live = self.scopes.get(claim.token)
        if live is None or claim.token in self.concluding:
            return False
        live[1].cancel()
        return True

    def cancel_all(self) -> int:
        """Cancel every run but those concluding; return how many were cancelled."""
        cancelled = 0
        for token, (_, scope) in list(self.scopes.items()):
            if token not in self.concluding:
                scope.cancel()
                cancelled += 1
        return cancelled
