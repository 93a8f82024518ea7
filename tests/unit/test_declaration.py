"""Misconfiguration fails at declaration time with a typed error that names the culprit."""

from __future__ import annotations

from typing import Any

import pytest

from pgstagechain import (
    ConfigurationError,
    Pipeline,
    Retry,
    Stage,
    StageDeclarationError,
    stage,
)


def make(**options: Any) -> Pipeline:
    return Pipeline("ads", table="jobs_variants", key="job_variants_id", start="img_gen", **options)


def noop(ctx: Any) -> None:
    return None


def test_unknown_predecessor_is_named() -> None:
    pipeline = make()
    pipeline.stage(after="img_gen", name="detect")(noop)
    pipeline.stage(after="plannr", name="overlay")(noop)
    with pytest.raises(StageDeclarationError, match=r"'overlay'.*unknown step 'plannr'") as info:
        pipeline.validate()
    assert info.value.stage == "overlay"


def test_two_stages_after_one_step() -> None:
    pipeline = make()
    pipeline.stage(after="img_gen", name="a")(noop)
    with pytest.raises(StageDeclarationError, match=r"'b'.*already followed by stage 'a'"):
        pipeline.stage(after="img_gen", name="b")(noop)


def test_cycle_is_reported_with_its_path() -> None:
    pipeline = make()
    pipeline.stage(after="img_gen", name="a")(noop)
    pipeline.stage(after="c", name="b")(noop)
    pipeline.stage(after="b", name="c")(noop)
    with pytest.raises(StageDeclarationError, match=r"cycle: .*b -> c|cycle: .*c -> b"):
        pipeline.validate()


@pytest.mark.parametrize("bad", ["two words", "1st", "drop;table", "x" * 64])
def test_non_identifier_stage_names(bad: str) -> None:
    with pytest.raises(StageDeclarationError, match="name must match"):
        stage(after="img_gen", name=bad)(noop)


@pytest.mark.parametrize("bad", ["Ads", "ads-pipeline", "a" * 41, ""])
def test_non_identifier_pipeline_names(bad: str) -> None:
    with pytest.raises(ConfigurationError, match="pipeline name"):
        Pipeline(bad, table="t", start="s")


def test_bad_table_names_and_duplicate_extras() -> None:
    with pytest.raises(ConfigurationError, match="table must be"):
        Pipeline("ads", table="", start="s")
    with pytest.raises(ConfigurationError, match="at most 63 bytes"):
        Pipeline("ads", table="t", key="k" * 64, start="s")
    with pytest.raises(ConfigurationError, match="listed twice"):
        Pipeline("ads", table="t", start="s", extra_columns=["a", "a"])


def test_group_stage_needs_group_column() -> None:
    pipeline = make()
    with pytest.raises(StageDeclarationError, match="group_column"):
        pipeline.stage(after="img_gen", name="copy", group=True)(noop)


def test_row_stage_cannot_follow_group_stage() -> None:
    pipeline = make(group_column="job_id")
    pipeline.stage(after="img_gen", name="copy", group=True)(noop)
    pipeline.stage(after="copy", name="per_variant")(noop)
    with pytest.raises(StageDeclarationError, match="fan-out"):
        pipeline.validate()


def test_stage_cannot_take_a_start_steps_name() -> None:
    with pytest.raises(StageDeclarationError, match="start step"):
        make().stage(after="other", name="img_gen")(noop)


def test_subclass_must_override_run() -> None:
    class Empty(Stage):
        after = "img_gen"

    with pytest.raises(StageDeclarationError, match="override run"):
        Empty()


def test_subclass_defaults_and_overrides() -> None:
    class OverlayText(Stage):
        after = "planner"
        retry = Retry(max_attempts=3)

        async def run(self, ctx: Any) -> dict[str, str]:
            return {"overlay_id": "x"}

    made = OverlayText()
    assert made.name == "overlay_text"
    assert made.is_async and made.retry.max_attempts == 3
    renamed = OverlayText(name="overlay", timeout=5)
    assert renamed.name == "overlay" and renamed.timeout == 5


def test_decorated_function_stays_callable_and_sync_is_detected() -> None:
    @stage(after="img_gen")
    def detect(ctx: Any) -> int:
        return 42

    assert detect(None) == 42
    assert detect.name == "detect" and not detect.is_async
    assert detect.__name__ == "detect"


def test_invalid_limits() -> None:
    with pytest.raises(StageDeclarationError, match="timeout must be positive"):
        stage(after="img_gen", timeout=0)(noop)
    with pytest.raises(StageDeclarationError, match="concurrency must be at least 1"):
        stage(after="img_gen", concurrency=0)(noop)
    with pytest.raises(ValueError):
        Retry(max_attempts=0)


def test_retry_delay_grows_and_is_capped() -> None:
    retry = Retry(max_attempts=10, base_delay=1.0, max_delay=8.0)
    assert retry.delay(1, 0.999) < retry.delay(3, 0.0) + 2.0
    assert retry.delay(10, 0.999) <= 8.0
    assert retry.delay(3, 0.0) == pytest.approx(2.0)


def test_worker_rejects_unknown_served_stage() -> None:
    from pgstagechain import Worker

    pipeline = make()
    pipeline.stage(after="img_gen", name="a")(noop)
    with pytest.raises(ConfigurationError, match="unknown stage 'b'"):
        Worker(pipeline, "", stages=["b"])
