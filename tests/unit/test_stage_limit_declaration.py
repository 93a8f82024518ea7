"""Declaring cluster-wide stage limits: ``max_running``, ``max_per_second`` and ``burst``
on ``@stage``, ``Pipeline.stage`` and ``Stage`` subclasses, checked at declaration."""

from __future__ import annotations

import math
from typing import Any

import pytest

from pgstagechain import Pipeline, Stage, StageDeclarationError, stage
from pgstagechain._limits import StageLimit, declared_limits, differences


async def handler(ctx: Any) -> None:
    return None


def test_limits_on_a_decorated_function() -> None:
    made = stage(after="new", max_running=2, max_per_second=20, burst=5)(handler)
    assert (made.max_running, made.max_per_second, made.burst) == (2, 20, 5)
    assert made.rate_burst == 5.0
    assert made.limited


def test_no_limits_by_default() -> None:
    made = stage(after="new")(handler)
    assert made.max_running is None and made.max_per_second is None
    assert made.rate_burst is None
    assert not made.limited


def test_limits_as_class_attributes_and_overridden_by_arguments() -> None:
    class Gpu(Stage):
        after = "new"
        max_running = 3
        max_per_second = 0.5

        async def run(self, ctx: Any) -> None:
            return None

    assert (Gpu().max_running, Gpu().max_per_second) == (3, 0.5)
    assert Gpu(max_running=1).max_running == 1


@pytest.mark.parametrize(("rate", "burst"), [(20, 2.0), (5, 1.0), (0.1, 1.0), (1000, 100.0)])
def test_burst_defaults_to_a_tenth_of_a_second_and_at_least_one(rate: float, burst: float) -> None:
    assert stage(after="new", max_per_second=rate)(handler).rate_burst == burst


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", math.inf])
def test_max_running_must_be_a_positive_integer(bad: Any) -> None:
    with pytest.raises(StageDeclarationError, match="max_running must be a positive integer"):
        stage(after="new", max_running=bad)(handler)


@pytest.mark.parametrize("bad", [0, -0.5, math.nan, math.inf, True, "20"])
def test_max_per_second_must_be_a_positive_number(bad: Any) -> None:
    with pytest.raises(StageDeclarationError, match="max_per_second must be a positive number"):
        stage(after="new", max_per_second=bad)(handler)


def test_max_running_zero_on_a_class_is_refused_naming_the_stage() -> None:
    class Gpu(Stage):
        after = "new"
        max_running = 0

        async def run(self, ctx: Any) -> None:
            return None

    with pytest.raises(StageDeclarationError, match=r"gpu.*max_running"):
        Gpu()


@pytest.mark.parametrize("bad", [0.5, 0, -1, math.nan, "3"])
def test_burst_must_be_at_least_one(bad: Any) -> None:
    with pytest.raises(StageDeclarationError, match="burst must be a number of at least 1"):
        stage(after="new", max_per_second=10, burst=bad)(handler)


def test_burst_needs_a_rate() -> None:
    with pytest.raises(StageDeclarationError, match="burst applies only with max_per_second"):
        stage(after="new", burst=3)(handler)


def test_pipeline_stage_passes_limits_on() -> None:
    pipeline = Pipeline("p", table="t", start="new")
    pipeline.stage(after="new", max_running=4)(handler)
    pipeline.stage(after="handler", name="paid", max_per_second=2)(handler)
    pipeline.stage(after="paid", name="free")(handler)
    assert declared_limits(pipeline) == {
        "handler": StageLimit(4, None, None),
        "paid": StageLimit(None, 2, 1.0),
    }


def test_differences_name_both_values() -> None:
    declared = {"a": StageLimit(2), "b": StageLimit(None, 20, 2.0)}
    found = {"a": StageLimit(3), "b": StageLimit(None, 20, 2.0), "c": StageLimit(1)}
    assert differences(declared, found) == [
        "stage 'a': database has max_running=3, this worker's code declares max_running=2",
        "stage 'c': database has max_running=1, this worker's code declares no limit",
    ]
