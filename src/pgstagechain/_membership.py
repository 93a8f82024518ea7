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


def lock_number(text: str) -> int:
    """A stable, non-negative 31-bit number for ``text`` (one half of an advisory lock key)."""
    return zlib.crc32(f"pgstagechain:{text}".encode()) & 0x7FFFFFFF


def _score(key_hash: int, member: int) -> int:
    """Rendezvous score of ``member`` for a key (splitmix64 of the two mixed)."""
    z = (key_hash ^ (member * 0x9E3779B97F4A7C15)) & _MASK64
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

    def join_params(self, channel: str) -> dict[str, Any]:
        return {
            "pipeline_number": self.pipeline_number,
            "stage_numbers": sorted(self.stage_numbers.values()),
            "channel": channel,
        }

    def joined(self, me: int) -> None:
        """Our listening connection (backend ``me``) holds its locks now."""
        self.me = me
        self.members = {}

    def update(self, found: Mapping[str, Iterable[int]] | None) -> None:
        """Take what ``pg_locks`` lists: stage number (as text) → member pids."""
        members: dict[str, tuple[int, ...]] = {}
        for number, pids in (found or {}).items():
            stage = self._stage_of.get(int(number))
            if stage is not None:
                members[stage] = tuple(sorted(set(pids)))
        self.members = members

    def drop(self, member: int) -> None:
        """A worker said it left: stop leaving keys to it (never to ourselves)."""
        if member == self.me:
            return
        self.members = {
            stage: tuple(pid for pid in pids if pid != member)
            for stage, pids in self.members.items()
        }

    def shared(self, stage: str) -> bool:
        """Does another live worker serve ``stage`` (as far as we know)?"""
        members = self.members.get(stage, ())
        return self.me in members and len(members) > 1

    def mine(self, stage: str, key: str) -> bool:
        """Should this worker claim ``key`` of ``stage`` at once? Yes unless a live member
        other than us is its owner (and always while we know of no other member)."""
        if not self.shared(stage):
            return True
        members = self.members[stage]
        key_hash = zlib.crc32(key.encode("utf-8", "surrogatepass"))
        return max(members, key=lambda member: _score(key_hash, member)) == self.me
