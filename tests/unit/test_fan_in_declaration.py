"""Fan-in declarations: where they are allowed, and what they change in the fingerprint."""

from __future__ import annotations

from typing import Any

import pytest

from pgstagechain import ConfigurationError, FanIn, Pipeline, Stage, StageDeclarationError
from pgstagechain._install import fingerprint
from pgstagechain._sql import configured_names
from tests.apps import fan_in_app
from tests.apps.seed import seed_pipeline


def noop(ctx: Any) -> None:
    return None


def grouped(**options: Any) -> Pipeline:
    return Pipeline("ads", table="t", key="id", group_column="job_id", start="img_gen", **options)


def test_the_default_is_to_wait_for_every_member() -> None:
    pipeline = seed_pipeline(noop)
    assert {s.fan_in for s in pipeline} == {FanIn.ALL_DONE}


def test_a_policy_on_a_row_stage_is_refused() -> None:
    with pytest.raises(StageDeclarationError, match=r"'detect'.*group stages only"):
        grouped().stage(after="img_gen", name="detect", fan_in=FanIn.SETTLED)(noop)


def test_a_policy_that_is_not_a_fan_in_is_named() -> None:
    with pytest.raises(StageDeclarationError, match=r"fan_in must be a FanIn.*'settled'"):
        grouped().stage(after="img_gen", name="job", group=True, fan_in="settled")(noop)  # type: ignore[arg-type]


def test_a_policy_belongs_on_the_first_group_stage() -> None:
    pipeline = grouped()
    pipeline.stage(after="img_gen", name="job", group=True)(noop)
    pipeline.stage(after="job", name="post", group=True, fan_in=FanIn.FAIL_FAST)(noop)
    with pytest.raises(StageDeclarationError, match=r"'post'.*first group stage.*'job'"):
        pipeline.validate()


def test_a_stage_class_declares_its_policy_as_an_attribute() -> None:
    class Job(Stage):
        after = "img_gen"
        group = True
        fan_in = FanIn.SETTLED

        def run(self, ctx: Any) -> None:
            return None

    assert Job().fan_in is FanIn.SETTLED


def test_a_group_size_needs_a_group_column() -> None:
    with pytest.raises(ConfigurationError, match="group_size_column needs group_column"):
        Pipeline("ads", table="t", start="img_gen", group_size_column="n")
    assert "n" in grouped(group_size_column="n").table.columns


def test_every_row_step_of_a_chain_belongs_to_its_group_stage() -> None:
    owners = {step: s.name for step, s in fan_in_app.settled.fan_in_of().items()}
    assert owners == dict.fromkeys(["img_gen", "vlm_analyze", "ocr_eval"], "ad_copy_gen_kor")


def test_a_policy_or_a_group_size_changes_the_fingerprint_and_nothing_else_does() -> None:
    digests = {
        name: fingerprint(getattr(fan_in_app, name))["digest"]
        for name in ("all_done", "settled", "fail_fast", "sized", "sized_settled")
    }
    assert len(set(digests.values())) == len(digests)
    # a pipeline that declares none keeps the fingerprint it had before policies existed
    assert set(fingerprint(fan_in_app.all_done)) == {
        "table",
        "key",
        "step",
        "status",
        "group",
        "done",
        "start",
        "stages",
        "digest",
        "policies",  # recorded beside the graph, outside the digest
    }
    assert fingerprint(fan_in_app.settled)["fan_in"] == {"ad_copy_gen_kor": "settled"}
    assert fingerprint(fan_in_app.sized)["group_size"] == "variant_count"


def test_failures_wake_the_trigger_only_under_a_policy_that_acts_on_them() -> None:
    def wake(pipeline: Pipeline) -> str:
        return configured_names(pipeline)["wake_statuses"].as_string(None)

    assert wake(fan_in_app.all_done) == "ARRAY['done']::text[]"
    assert wake(fan_in_app.settled) == "ARRAY['done', 'failed']::text[]"
