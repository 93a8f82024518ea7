"""Which listening workers serve which stage, so that each announced key is claimed at once
by one worker only: the one it hashes to (rendezvous hashing over the live workers).

A worker joins on its listening connection by taking one shared advisory lock per stage
it serves (the pipeline's number, the stage's number). The server releases them when that
connection ends, however it ends, so ``pg_locks`` lists exactly the live workers, each by
the process id of its listening backend. A worker reads that list with every probe, and
at once when another worker says it joined or left (a ``w`` notification).

A key whose owner is another worker is left to it. Nothing is stranded when the view is
stale: a worker that left says so (the others then scan for ready rows at once), and one
that died is gone from ``pg_locks`` at the next probe, which also finds and re-drives
whatever it was left.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

#: the two kinds of ``w`` notification, in the event's ``step`` field
JOINED, LEFT = "joined", "left"

_MASK64 = (1 << 64) - 1
#: keys are hashed into this many buckets, and the buckets shared out between the members
BUCKETS = 4096


def lock_number(text: str) -> int:
    """A stable, non-negative 31-bit number for ``text`` (one half of an advisory lock key)."""
    return zlib.crc32(f"pgstagechain:{text}".encode()) & 0x7FFFFFFF


def _seed(member: int) -> int:
    """A member's 64-bit seed (splitmix64 of its number), computed once per view."""
    z = (member * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def payload(kind: str, member: int) -> str:
    """The ``w`` notification a worker sends when it joined or left."""
    return json.dumps(["w", kind, str(member), None])


class Membership:
    """This worker's view of the live workers of each stage it serves."""

    def __init__(self, pipeline: str, served: Iterable[str]) -> None:
        self.pipeline_number = lock_number(pipeline)
        self.stage_numbers = {stage: lock_number(f"{pipeline}:{stage}") for stage in served}
        self._stage_of = {number: stage for stage, number in self.stage_numbers.items()}
        #: the backend pid of this worker's listening connection, once it joined
        self.me: int | None = None
        #: per stage, the live members (listening backend pids), this worker included
        self.members: dict[str, tuple[int, ...]] = {}
        #: per stage shared with others: for each bucket, is it ours? (see :meth:`mine`)
        self._ours: dict[str, bytes] = {}

    def join_params(self, channel: str) -> dict[str, Any]:
        return {
            "pipeline_number": self.pipeline_number,
            "stage_numbers": sorted(self.stage_numbers.values()),
            "channel": channel,
        }

    def joined(self, me: int | None) -> None:
        """Our listening connection (backend ``me``) holds its locks now (None: it could
        not take them, and this worker claims every key)."""
        self.me = me
        self._set({})

    def update(self, found: Mapping[str, Iterable[int]] | None) -> None:
        """Take what ``pg_locks`` lists: stage number (as text) → member pids."""
        members: dict[str, tuple[int, ...]] = {}
        for number, pids in (found or {}).items():
            stage = self._stage_of.get(int(number))
            if stage is not None:
                members[stage] = tuple(sorted(set(pids)))
        self._set(members)

    def drop(self, member: int) -> None:
        """A worker said it left: stop leaving keys to it (never to ourselves)."""
        if member == self.me:
            return
        self._set(
            {
                stage: tuple(pid for pid in pids if pid != member)
                for stage, pids in self.members.items()
            }
        )

    def _set(self, members: dict[str, tuple[int, ...]]) -> None:
        if members == self.members and (self._ours or not members):
            return
        self.members = members
        tables: dict[tuple[int, ...], bytes] = {}  # stages often have the same members
        self._ours = {}
        for stage, pids in members.items():
            if self.me in pids and len(pids) > 1:
                if pids not in tables:
                    tables[pids] = _owned_buckets(pids, self.me)
                self._ours[stage] = tables[pids]

    def shared(self, stage: str) -> bool:
        """Does another live worker serve ``stage`` (as far as we know)?"""
        return stage in self._ours

    def mine(self, stage: str, key: str) -> bool:
        """Should this worker claim ``key`` of ``stage`` at once? Yes unless a live member
        other than us owns its bucket (and always while we know of no other member).

        This runs for every notification a worker hears, so the buckets are shared out
        once per change of members (:func:`_owned_buckets`), and here only looked up."""
        ours = self._ours.get(stage)
        if ours is None:
            return True
        return bool(ours[zlib.crc32(key.encode("utf-8", "surrogatepass")) % BUCKETS])


def _owned_buckets(members: tuple[int, ...], me: int | None) -> bytes:
    """For each bucket, 1 if ``me`` owns it: the member with the highest score for it
    (rendezvous hashing), so that a member leaving moves only its own buckets."""
    seeds = [(member, _seed(member)) for member in members]
    owned = bytearray(BUCKETS)
    for bucket in range(BUCKETS):
        mixed = _seed(bucket + 1)
        best, owner = -1, None
        for member, seed in seeds:
            score = ((mixed ^ seed) * 0xD6E8FEB86659FD93) & _MASK64
            if score > best:
                best, owner = score, member
        owned[bucket] = owner == me
    return bytes(owned)
