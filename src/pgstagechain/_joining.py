"""A worker's part in the membership (see _membership): it joins on its listening
connection, listens to the partitions it owns, hears the others join and leave, and says
so when it leaves."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
import psycopg

from ._events import Event
from ._hints import Hints
from ._links import DB_ERRORS, Link
from ._listener import Listener
from ._membership import JOINED, LEFT, Membership, listened_channels, payload
from ._pipeline import PARTITIONS, Pipeline
from ._sql import plain

logger = logging.getLogger("pgstagechain.worker")


class Joining:
    """Wires a worker's :class:`Membership` to its hints, listener and control link."""

    def __init__(self, pipeline: Pipeline, served: list[str], hints: Hints, control: Link) -> None:
        self.pipeline = pipeline
        self.membership = Membership(pipeline.name, served)
        self.hints = hints
        self.control = control
        #: reads the members again (the worker's scanner, once it runs)
        self.probe: Callable[[], None] | None = None
        self.listener: Listener | None = None
        self._listening: anyio.CancelScope | None = None
        self._unlistened: anyio.Event | None = None
        hints.owns = self.membership.mine
        hints.shared = self.membership.shared
        hints.on_member = self.on_member
        self.membership.on_partitions = self.hear

    async def listen(self, listener: Listener) -> None:
        """Run ``listener`` until :meth:`leave`."""
        self.listener = listener
        self._listening, self._unlistened = anyio.CancelScope(), anyio.Event()
        try:
            with self._listening:
                await listener.run()
        finally:
            self._unlistened.set()

    async def join(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """On the listening connection: take our membership locks and tell the others."""
        me = conn.info.backend_pid
        try:
            await conn.execute(
                plain("join_members"),
                {
                    **self.membership.join_params(self.pipeline.channel),
                    "payload": payload(JOINED, me),
                },
            )
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                raise  # the listener reconnects
            # Not a member (out of lock slots, say): this worker then hears and claims
            # every key, as workers did before they knew each other.
            logger.warning("could not join the other workers (%s); claiming every key", exc)
            self.membership.joined(None)
            return
        self.membership.joined(me)

    async def leave(self) -> None:
        """Stop listening (the server drops our locks with the connection), then tell the
        others, who take our partitions and scan for what was left to us. Best effort:
        their probes find it anyway."""
        if self._listening is None or self._unlistened is None:
            return
        me = self.membership.me
        self._listening.cancel()
        await self._unlistened.wait()
        if me is None:
            return
        try:
            conn = await self.control.get()
            await conn.execute(
                plain("left_members"),
                {"channel": self.pipeline.channel, "payload": payload(LEFT, me)},
            )
        except DB_ERRORS as exc:
            logger.info("could not tell the other workers that this one left (%s)", exc)

    def hear(self, partitions: frozenset[int] | None) -> None:
        """Listen to the partitions this worker owns now (None: all of them)."""
        self.hints.hearing = 1.0 if partitions is None else len(partitions) / PARTITIONS
        if self.listener is not None:
            self.listener.listen_to(listened_channels(self.pipeline, partitions))

    def on_member(self, event: Event) -> None:
        """Another worker joined (read the members again) or left (scan for its keys)."""
        if event.step == LEFT and event.key.isdigit():
            self.membership.drop(int(event.key))
            self.hints.scan_all()
        elif event.step == JOINED and self.probe is not None:
            self.probe()
