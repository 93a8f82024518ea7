"""What a worker knows of work waiting for it: keys announced by notifications, stages
the scan should look at, stages whose retries are due.

Everything here is a hint. A claim checks the row's state in the database, so a wrong,
late or forged hint costs at most a statement, and a lost one costs latency until the
next scan.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence

import attrs

from ._claim import Held
from ._events import Event, MalformedNotification, parse_event
from ._pipeline import PARTITIONS, Pipeline
from ._runs import WorkerStats

logger = logging.getLogger("pgstagechain.worker")

#: malformed hints logged at warning level before only every thousandth is
LOUD_MALFORMED = 10
#: more keys than one full claim announced for a stage within this many seconds is a burst
BURST_WINDOW = 0.01


@attrs.frozen
class Pick:
    """What to claim next for one stage: ``retry`` (due retries), ``ready`` (any ready rows,
    through the state index) or ``keys`` (these announced keys)."""

    mode: str
    keys: list[str] | None = None


class Hints:
    """Per served stage: announced keys (in order, without repeats), whether a scan is
    needed, and whether a retry is due."""

    def __init__(
        self,
        pipeline: Pipeline,
        served: Sequence[str],
        stats: WorkerStats,
        wake: Callable[[], None],
        *,
        max_pending: int,
        burst: Mapping[str, int] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.stats = stats
        self.max_pending = max_pending
        self.pending: dict[str, dict[str, None]] = {s: {} for s in served}
        self.needs_scan: dict[str, bool] = dict.fromkeys(served, True)
        self.retry_due: dict[str, bool] = dict.fromkeys(served, True)
        #: stages whose limits held back work, each with whether it was a retry's: claimed
        #: again when a slot is freed (``"s"`` event) or the next token is due
        self.held: dict[str, bool] = {}
        self.token_due: dict[str, float] = {}
        #: slot-freed events seen per stage, so a claim can tell one came while it ran
        self.slots_freed: dict[str, int] = dict.fromkeys(served, 0)
        #: per stage, the most one claim takes: more announced at once is a burst
        self.burst = {s: (burst or {}).get(s, max_pending) for s in served}
        #: keys announced for each stage in the current burst window, ours or not (estimated)
        self.heard: dict[str, float] = dict.fromkeys(served, 0.0)
        #: the share of the partitions this worker listens to (see _membership)
        self.hearing = 1.0
        self._window: dict[str, float] = dict.fromkeys(served, 0.0)
        self._wake = wake
        #: is this key of this stage (announced on this partition's channel, None: on the
        #: pipeline's) ours to claim at once? (see _membership); None: all are
        self.owns: Callable[[str, str, int | None], bool] | None = None
        self._partitions = {pipeline.partition_channel(p): p for p in range(PARTITIONS)}
        #: told of a ``w`` notification: a worker joined or left
        self.on_member: Callable[[Event], None] | None = None
        #: do other live workers serve this stage (and so take keys of their own)?
        self.shared: Callable[[str], bool] | None = None

    # -- what comes in ------------------------------------------------------------------

    def on_notify(self, channel: str, payload: str) -> None:
        """Take a notification; nothing it holds may raise out of here."""
        self.stats.notifications += 1
        try:
            self.take(parse_event(payload), self._partitions.get(channel))
        except Exception as exc:  # a notification is a hint: none may stop the worker
            self.ignored(f"a malformed notification on {channel}", exc)

    def take(self, event: Event, partition: int | None = None) -> None:
        """Take an event; ``partition`` is the one whose channel announced it (None: the
        pipeline's own channel)."""
        if event.kind == "s":  # a slot of a limited stage was freed
            if event.step in self.slots_freed:
                self.slots_freed[event.step] += 1
                if event.step in self.held and event.step not in self.token_due:
                    self._release(event.step)
            return
        if event.kind == "t":  # a run was handed back: its retry is due now
            if event.step in self.retry_due:
                self.retry_due[event.step] = True
                self._wake()
            return
        if event.kind == "w":
            if self.on_member is not None:
                self.on_member(event)
            return
        target = self.pipeline.next_stage(event.step)
        if target is None or target.name not in self.pending:
            return
        if target.group != (event.kind == "g"):
            return  # a row reaching a fan-in step: its group's own notification follows
        self._count(target.name)
        if self.owns is not None and not self.owns(target.name, event.key, partition):
            self.stats.left_to_peers += 1  # its owner claims it; a probe finds it otherwise
            return
        bucket = self.pending[target.name]
        if len(bucket) >= self.max_pending:
            self.needs_scan[target.name] = True  # too many hints: the scan finds the rest
        else:
            bucket[event.key] = None
        self._wake()

    def _count(self, stage: str) -> None:
        """Count a key announced for ``stage``, ours or not: in a burst (more than one full
        claim within :data:`BURST_WINDOW`), every worker that hears it claims ready rows in
        full batches, disjoint by SKIP LOCKED, until none are left. A worker hears only its
        partitions, so each key it hears stands for ``1 / hearing`` keys announced in all:
        the workers estimate the same total, and switch at about the same time."""
        now = time.monotonic()
        if now - self._window[stage] > BURST_WINDOW:
            self._window[stage] = now
            self.heard[stage] = 0
        self.heard[stage] += 1 / self.hearing
        if self.heard[stage] > self.burst[stage]:
            self.needs_scan[stage] = True

    def ignored(self, what: str, exc: Exception) -> None:
        """Count and log a hint that could not be used; a flood must not become a log
        flood: the first few, then every thousandth."""
        self.stats.malformed += 1
        count = self.stats.malformed
        logger.log(
            logging.WARNING if count <= LOUD_MALFORMED or count % 1000 == 0 else logging.DEBUG,
            "ignored %s (%d so far): %s",
            what,
            count,
            exc if isinstance(exc, MalformedNotification) else f"{type(exc).__name__}: {exc}",
        )

    def wake(self) -> None:
        """Have the dispatcher look again."""
        self._wake()

    def scan_all(self) -> None:
        """After a (re)LISTEN or a scan that found ready work: look at every stage."""
        for name in self.needs_scan:
            self.needs_scan[name] = True
        self._wake()

    def retries_due(self) -> None:
        """Retries may be due for any stage."""
        for name in self.retry_due:
            self.retry_due[name] = True
        self._wake()

    def due(self, stage: str) -> None:
        """A retry of ``stage`` is due now."""
        self.retry_due[stage] = True
        self._wake()

    def hold(self, stage: str, retry: bool, held: Held, freed_before: int) -> None:
        """The stage's limits held back work a claim could have taken: claim again when a
        slot is freed (unless one was while the claim ran) or when the next token is due."""
        self.held[stage] = self.held.get(stage, False) or retry
        if held.next_token_in:
            self.token_due[stage] = time.monotonic() + held.next_token_in
        elif self.slots_freed[stage] != freed_before:
            self._release(stage)

    def _release(self, stage: str) -> None:
        if self.held.pop(stage, False):
            self.retry_due[stage] = True
        self.token_due.pop(stage, None)
        self.pending[stage].clear()  # claiming ready rows finds them all
        self.needs_scan[stage] = True
        self._wake()

    def found_ready(self, stage: str) -> None:
        """A scan found rows ready for ``stage``: claim them, held back or not (a slot's
        announcement may have been lost)."""
        if stage in self.held:
            self._release(stage)
        self.needs_scan[stage] = True

    def release_due(self) -> float | None:
        """Release the stages whose next token is due; seconds until the next one is."""
        if not self.token_due:
            return None
        now = time.monotonic()
        for stage, due in list(self.token_due.items()):
            if due <= now:
                self._release(stage)
        return min(self.token_due.values(), default=now) - now if self.token_due else None

    # -- what goes out ------------------------------------------------------------------

    def pick(self, stage: str, limit: int) -> Pick | None:
        """What to claim for ``stage``, at most ``limit`` rows, if anything."""
        if stage in self.held:
            return None  # until a slot is freed or a token is due
        bucket = self.pending[stage]
        if self.retry_due[stage]:
            return Pick("retry")
        if len(bucket) > limit and (self.shared is None or not self.shared(stage)):
            # More hints than one batch: claim ready rows instead, so that workers that
            # heard the same notifications take disjoint rows (SKIP LOCKED) rather than
            # racing for the same keys. (Workers that know each other hold disjoint keys:
            # they claim their own by key, a batch at a time, unless a burst is on.)
            bucket.clear()
            self.needs_scan[stage] = True
            return Pick("ready")
        if self.needs_scan[stage]:
            # Ready rows first: they include the announced keys, and once a claim of them
            # comes back short every key heard so far was taken, here or elsewhere (by key,
            # those would be claims lost).
            bucket.clear()
            return Pick("ready")
        if bucket:
            keys = list(itertools.islice(bucket, limit))
            for key in keys:
                del bucket[key]
            return Pick("keys", keys)
        return None

    def claimed(self, stage: str, pick: Pick, limit: int, got: int, *, held: bool = False) -> None:
        """Note what a claim of ``pick`` got: fewer than asked means none are left (or,
        when ``held``, that the stage's limits held the rest back)."""
        if not got:
            self.stats.claims_empty += 1
        if pick.mode == "retry" and got < limit:
            self.retry_due[stage] = False
        elif pick.mode == "ready" and got < limit:
            self.needs_scan[stage] = False
        elif pick.mode == "keys" and not held:
            self.stats.races_lost += len(pick.keys or ()) - got

    def any(self) -> bool:
        """Is anything announced, due or to be scanned?"""
        return (
            any(self.pending.values())
            or any(self.needs_scan.values())
            or any(self.retry_due.values())
            or bool(self.held)
        )
