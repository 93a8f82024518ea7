"""Which listening workers serve which stage, so that each announced key is heard and
claimed at once by one worker only: the one that owns its partition.

Rows and groups are announced on one of :data:`PARTITIONS` channels by a hash of their key
(the trigger's ``hashtext(key) & 63``); the partitions are shared out between the live
workers of each stage by rendezvous hashing with bounded loads (each member takes at most
its share), and a worker listens only to the partitions it owns for some stage it serves.

A worker joins on its listening connection by taking one shared advisory lock per stage
it serves (the pipeline's number, the stage's number). The server releases them when that
connection ends, however it ends, so ``pg_locks`` lists exactly the live workers, each by
the process id of its listening backend. A worker reads that list with every probe, and
at once when another worker says it joined or left (a ``w`` notification).

Nothing is stranded when a view is stale: a worker that left says so (the others then
listen to its partitions and scan for ready rows), and one that died is gone from
``pg_locks`` at the next probe, which also finds and re-drives whatever it was left. A
worker that starts, or owns no partition (more workers than partitions), listens to all.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ._pipeline import PARTITIONS, Pipeline

#: the two kinds of ``w`` notification, in the event's ``step`` field
JOINED, LEFT = "joined", "left"

_MASK64 = (1 << 64) - 1


def lock_number(text: str) -> int:
    """A stable, non-negative 31-bit number for ``text`` (one half of an advisory lock key)."""
    return zlib.crc32(f"pgstagechain:{text}".encode()) & 0x7FFFFFFF


def _seed(member: int) -> int:
    """A member's 64-bit seed (splitmix64 of its number), computed once per view."""
    z = (member * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def listened_channels(pipeline: Pipeline, partitions: Iterable[int] | None) -> list[str]:
    """The pipeline's own channel, and those of ``partitions`` (None: of all of them)."""
    if partitions is None:
        return [pipeline.channel, *pipeline.partition_channels]
    return [pipeline.channel, *(pipeline.partition_channel(p) for p in sorted(partitions))]


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
        #: per stage shared with others: for each partition, is it ours? (see :meth:`mine`)
        self._ours: dict[str, bytes] = {}
        #: the partitions to listen to (None: all), told to ``on_partitions`` when they change
        self.partitions: frozenset[int] | None = None
        self.on_partitions: Callable[[frozenset[int] | None], None] | None = None

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
                    tables[pids] = _owned_partitions(pids, self.me)
                self._ours[stage] = tables[pids]
        self._listen_to(self._wanted())

    def _wanted(self) -> frozenset[int] | None:
        """The partitions this worker must hear: those it owns for some stage it serves;
        all of them while a served stage has no other member (or none is known yet)."""
        if any(stage not in self._ours for stage in self.stage_numbers):
            return None
        wanted = frozenset(
            p for table in self._ours.values() for p in range(PARTITIONS) if table[p]
        )
        return wanted or None  # more workers than partitions: hear them all, own none

    def _listen_to(self, partitions: frozenset[int] | None) -> None:
        if partitions != self.partitions:
            self.partitions = partitions
            if self.on_partitions is not None:
                self.on_partitions(partitions)

    def shared(self, stage: str) -> bool:
        """Does another live worker serve ``stage`` (as far as we know)?"""
        return stage in self._ours

    def mine(self, stage: str, key: str, partition: int | None = None) -> bool:
        """Should this worker claim ``key`` of ``stage`` at once? Yes unless a live member
        other than us owns its partition (and always while we know of no other member).

        ``partition`` is the one whose channel announced the key; for a key announced on
        the pipeline's own channel (re-sent, or by a trigger of an earlier version) every
        member computes the same stand-in from the key itself."""
        ours = self._ours.get(stage)
        if ours is None:
            return True
        if partition is None:
            partition = zlib.crc32(key.encode("utf-8", "surrogatepass")) % PARTITIONS
        return bool(ours[partition])


def _owned_partitions(members: tuple[int, ...], me: int | None) -> bytes:
    """For each partition, 1 if ``me`` owns it: rendezvous hashing with bounded loads. Each
    partition goes to the member with the highest score for it among those that still hold
    fewer than their share (the partitions divided as evenly as they go, the lowest members
    taking the remainder), so a member leaving moves its own partitions and few others."""
    seeds = [(member, _seed(member)) for member in members]
    base, extra = divmod(PARTITIONS, len(members))
    share = {member: base + (i < extra) for i, member in enumerate(sorted(members))}
    held = dict.fromkeys(members, 0)
    owned = bytearray(PARTITIONS)
    for partition in range(PARTITIONS):
        mixed = _seed(partition + 1)
        ranked = sorted(
            seeds,
            key=lambda entry: ((mixed ^ entry[1]) * 0xD6E8FEB86659FD93) & _MASK64,
            reverse=True,
        )
        owner = next(member for member, _ in ranked if held[member] < share[member])
        held[owner] += 1
        owned[partition] = owner == me
    return bytes(owned)
