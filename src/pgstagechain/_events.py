"""Parsing notification payloads, defensively: anyone who may NOTIFY on a channel can
send anything, and nothing they send may stop a worker."""

from __future__ import annotations

import json

import attrs

from .errors import PgStageChainError

MAX_PAYLOAD = 8000
MAX_KEY = 1024
#: row done, group done, retry due now, slot freed, worker joined or left
KINDS = ("r", "g", "t", "s", "w")


class MalformedNotification(PgStageChainError, ValueError):
    """A payload on the pipeline's channel that pgstagechain did not send."""


@attrs.frozen
class Event:
    """A row (``kind == "r"``) or group (``"g"``) reached ``(step, done)``, a run of
    stage ``step`` was handed back and its retry is due (``"t"``), a run of stage
    ``step`` ended and freed a slot of its ``max_running`` (``"s"``, key ``"slot"``), or a
    worker whose listening backend is ``key`` ``"joined"`` or ``"left"`` (``"w"``, in ``step``).

    ``step``, ``key`` and ``group`` are text PostgreSQL accepts: valid UTF-8, no NUL.
    """

    kind: str
    step: str
    key: str
    group: str | None


def parse_event(payload: str) -> Event:
    """Turn ``[kind, step, key, group]`` into an :class:`Event`; raise
    :class:`MalformedNotification` (and nothing else) for any other payload."""
    if len(payload) > MAX_PAYLOAD:
        raise MalformedNotification(f"payload of {len(payload)} characters is too long")
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than Python's stack
        raise MalformedNotification(f"payload is not JSON: {payload[:80]!r}") from None
    if not isinstance(value, list) or len(value) != 4:
        raise MalformedNotification(f"payload is not a 4-item array: {payload[:80]!r}")
    kind, step, key, group = value
    if kind not in KINDS:
        raise MalformedNotification(f"unknown kind in {payload[:80]!r}")
    return Event(
        kind,
        _text(step, "step"),
        _text(key, "key"),
        None if group is None else _text(group, "group"),
    )


def _text(value: object, what: str) -> str:
    """``value`` if it is a short, non-empty string PostgreSQL can store as text."""
    if not isinstance(value, str):
        # the type only: the value may be nested too deep to print
        raise MalformedNotification(f"{what} is a {type(value).__name__}, not a string")
    if not value or len(value) > MAX_KEY:
        raise MalformedNotification(f"{what} of {len(value)} characters is empty or too long")
    if "\x00" in value:
        raise MalformedNotification(f"{what} contains a NUL character: {value[:80]!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, from a \ud800-style escape
        raise MalformedNotification(f"{what} is not valid Unicode: {value[:80]!r}") from None
    return value
