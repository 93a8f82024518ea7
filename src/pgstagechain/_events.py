"""Parsing notification payloads, defensively: anyone can NOTIFY on a channel."""

from __future__ import annotations

import json

import attrs

MAX_PAYLOAD = 8000
MAX_KEY = 1024


class MalformedNotification(ValueError):
    """A payload on the pipeline's channel that pgstagechain did not send."""


@attrs.frozen
class Event:
    """A row (``kind == "r"``) or group (``"g"``) reached ``(step, done)``, or a run of
    stage ``step`` was handed back and its retry is due (``"t"``)."""

    kind: str
    step: str
    key: str
    group: str | None


def parse_event(payload: str) -> Event:
    """Turn ``[kind, step, key, group]`` into an :class:`Event` or raise :class:`MalformedNotification`."""
    if len(payload) > MAX_PAYLOAD:
        raise MalformedNotification(f"payload of {len(payload)} characters is too long")
    try:
        value = json.loads(payload)
    except ValueError:
        raise MalformedNotification(f"payload is not JSON: {payload[:80]!r}") from None
    if not isinstance(value, list) or len(value) != 4:
        raise MalformedNotification(f"payload is not a 4-item array: {payload[:80]!r}")
    kind, step, key, group = value
    if kind not in ("r", "g", "t"):
        raise MalformedNotification(f"unknown kind {kind!r}")
    if not isinstance(step, str) or not step:
        raise MalformedNotification(f"step is not a name: {step!r}")
    if not isinstance(key, str) or not key or len(key) > MAX_KEY:
        raise MalformedNotification(f"key is not a short string: {str(key)[:80]!r}")
    if group is not None and (not isinstance(group, str) or len(group) > MAX_KEY):
        raise MalformedNotification(f"group is not a short string: {str(group)[:80]!r}")
    return Event(kind, step, key, group)
