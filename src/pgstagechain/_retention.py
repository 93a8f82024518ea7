"""How long a pipeline keeps its finished runs: :class:`Retention`, and ages as the command
line writes them (``30d``). What is deleted, and what is always kept, is
:mod:`._prune`'s job; docs/operations.md ("Ledger retention") says it in prose."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import attrs

from .errors import ConfigurationError

#: how often a worker looks for runs past their window, unless told otherwise
DEFAULT_EVERY = dt.timedelta(minutes=5)
#: runs read (and at most deleted) per statement: each batch is one short transaction
DEFAULT_BATCH = 1000

AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str, what: str = "age") -> dt.timedelta:
    """``90s``, ``15m``, ``12h``, ``30d`` or ``2w`` as a positive timedelta."""
    found = AGE.match(text) if isinstance(text, str) else None
    if found is None:
        raise ConfigurationError(
            f"cannot read {what} {text!r}: expected a positive number and a unit "
            "(s, m, h, d or w), like 90s, 15m, 12h, 30d or 2w"
        )
    age = dt.timedelta(seconds=float(found[1]) * UNITS[found[2]])
    if age <= dt.timedelta(0):
        raise ConfigurationError(f"{what} must be more than zero, got {text!r}")
    return age


def format_age(age: dt.timedelta) -> str:
    """An age as :func:`parse_age` reads it, in the largest unit that divides it: ``30d``."""
    seconds = age.total_seconds()
    for unit in ("w", "d", "h", "m"):
        if seconds >= UNITS[unit] and seconds % UNITS[unit] == 0:
            return f"{int(seconds // UNITS[unit])}{unit}"
    return f"{seconds:g}s"


def _window(what: str) -> Any:
    def check(_instance: Any, _attribute: Any, value: Any) -> None:
        if value is None and what == "failed":
            return
        if not isinstance(value, dt.timedelta):
            raise ConfigurationError(
                f"Retention({what}=...) must be a datetime.timedelta, got {value!r}"
            )
        if value <= dt.timedelta(0):
            raise ConfigurationError(f"Retention({what}=...) must be more than zero, got {value}")

    return check


@attrs.frozen(kw_only=True)
class Retention:
    """Delete a pipeline's finished runs once they are older than a window.

    ``finished``: how long runs that succeeded are kept after they finished. ``failed``:
    how long runs that did not succeed (failed, expired, cancelled), and every run of a
    row or group that failed for good, are kept (default: as long as ``finished``; never
    shorter). Runs that a row or group still in flight may read, the run that says why a
    row failed, live runs and runs with a retry pending are kept whatever their age.

    Workers apply it every ``every``, one worker at a time per pipeline, in batches of
    ``batch`` runs, each its own short transaction.

    >>> Retention(finished=dt.timedelta(days=30), failed=dt.timedelta(days=90))  # doctest: +SKIP
    """

    finished: dt.timedelta = attrs.field(validator=_window("finished"))
    failed: dt.timedelta | None = attrs.field(default=None, validator=_window("failed"))
    every: dt.timedelta = attrs.field(default=DEFAULT_EVERY, validator=_window("every"))
    batch: int = attrs.field(default=DEFAULT_BATCH)

    @batch.validator
    def _check_batch(self, _attribute: Any, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100_000:
            raise ConfigurationError(
                f"Retention(batch=...) must be a whole number from 1 to 100000, got {value!r}"
            )

    def __attrs_post_init__(self) -> None:
        if self.failed is not None and self.failed < self.finished:
            raise ConfigurationError(
                f"Retention(failed={self.failed}) is shorter than finished={self.finished}: "
                "runs that did not succeed are kept at least as long as the others"
            )

    @property
    def failed_window(self) -> dt.timedelta:
        """How long runs that did not succeed are kept."""
        return self.failed if self.failed is not None else self.finished


def check_retention(value: object) -> Retention | None:
    """``value`` if it is a :class:`Retention` or None, else a clear error."""
    if value is not None and not isinstance(value, Retention):
        raise ConfigurationError(
            "Pipeline(retention=...) must be a pgstagechain.Retention or None, "
            f"like Retention(finished=timedelta(days=30)); got {value!r}"
        )
    return value
