"""A retention setting and an age on the command line: bad values get errors that name them."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from pgstagechain import ConfigurationError, Pipeline, Retention
from pgstagechain._retention import format_age, parse_age

DAY = dt.timedelta(days=1)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("15m", 900),
        ("12h", 43200),
        ("30d", 30 * 86400),
        ("2w", 14 * 86400),
        ("1.5h", 5400),
        (" 7d ", 7 * 86400),
    ],
)
def test_ages(text: str, seconds: float) -> None:
    assert parse_age(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "30", "d", "3x", "-5d", "5 days", "1e3s", "30d; DROP"])
def test_unreadable_ages(text: str) -> None:
    with pytest.raises(ConfigurationError, match=r"cannot read --older-than .*like 90s"):
        parse_age(text, "--older-than")


@pytest.mark.parametrize("text", ["90s", "15m", "12h", "30d", "2w", "1.5s", "25h"])
def test_ages_read_back(text: str) -> None:
    assert parse_age(format_age(parse_age(text))) == parse_age(text)


def test_zero_age() -> None:
    with pytest.raises(ConfigurationError, match="more than zero"):
        parse_age("0d")


def test_retention_defaults_keep_failed_runs_as_long() -> None:
    kept = Retention(finished=30 * DAY)
    assert kept.failed_window == 30 * DAY
    assert Retention(finished=30 * DAY, failed=90 * DAY).failed_window == 90 * DAY


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"finished": -DAY}, r"Retention\(finished=...\) must be more than zero"),
        ({"finished": dt.timedelta(0)}, r"Retention\(finished=...\) must be more than zero"),
        ({"finished": 30}, r"Retention\(finished=...\) must be a datetime.timedelta, got 30"),
        ({"finished": "30d"}, r"must be a datetime.timedelta, got '30d'"),
        ({"finished": DAY, "failed": -DAY}, r"Retention\(failed=...\) must be more than zero"),
        ({"finished": 30 * DAY, "failed": DAY}, "shorter than finished"),
        ({"finished": DAY, "every": dt.timedelta(0)}, r"Retention\(every=...\)"),
        ({"finished": DAY, "batch": 0}, r"Retention\(batch=...\) must be a whole number"),
        ({"finished": DAY, "batch": 10**9}, r"Retention\(batch=...\)"),
        ({"finished": DAY, "batch": True}, r"Retention\(batch=...\)"),
    ],
)
def test_bad_retention(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Retention(**options)


def test_a_pipeline_takes_only_a_retention() -> None:
    assert Pipeline("p", table="t", start="s").retention is None
    kept = Retention(finished=DAY)
    assert Pipeline("p", table="t", start="s", retention=kept).retention is kept
    with pytest.raises(ConfigurationError, match=r"retention=\.\.\.\) must be a pgstagechain"):
        Pipeline("p", table="t", start="s", retention="30d")  # type: ignore[arg-type]
