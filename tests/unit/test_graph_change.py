"""The diff of two stage graphs and the fate of the rows at each step it touches, as pure
functions: what `migrate --plan` says, with no database."""

from __future__ import annotations

from typing import Any

import pytest

from pgstagechain import ConfigurationError, Pipeline, Retry
from pgstagechain._graph_change import (
    GROUP,
    ROW,
    Graph,
    changed_stages,
    check_maps,
    diff_lines,
    fates,
    policy_lines,
    policy_of,
    positions_to_count,
    rerun_from,
    stale_stages,
)
from pgstagechain._install import fingerprint
from pgstagechain._migration_plan import plan


def pipeline(
    *chain: str, group: tuple[str, ...] = (), retry: dict[str, int] | None = None
) -> Pipeline:
    """A pipeline whose stages follow each other in ``chain`` from the start step ``new``;
    stages named in ``group`` are group stages."""
    made = Pipeline("p", table="t", start="new", group_column="job" if group else None)
    after = "new"
    for name in chain:
        attempts = Retry(max_attempts=(retry or {}).get(name, 1))
        made.stage(after=after, name=name, group=name in group, retry=attempts)(lambda ctx: None)
        after = name
    return made


def graph(*chain: str, group: tuple[str, ...] = ()) -> Graph:
    return Graph.of(pipeline(*chain, group=group))


def test_the_graph_is_read_back_from_what_install_records() -> None:
    made = pipeline("a", "b", "g", group=("g",))
    assert Graph.installed(fingerprint(made)) == Graph.of(made)
    # what the version before recorded: no policies, stages as lists
    earlier = {"start": ["new"], "stages": [["a", "new", False], ["b", "a", False]]}
    assert Graph.installed(earlier) == graph("a", "b")
    assert graph("a", "b", "g", group=("g",)).chains() == ["new → a → b → g [group]"]


def test_a_stage_added_in_the_middle() -> None:
    old, new = graph("a", "c"), graph("a", "b", "c")
    assert diff_lines(old, new) == ["added stage b (after a)", "moved stage c: after b (was a)"]
    # rows at (a, done) next run b; rows at a stage whose place changed are counted
    assert positions_to_count(old, new) == {ROW: ["a"], GROUP: []}
    assert changed_stages(old, new) == [(ROW, "a"), (ROW, "c")]
    said = fates(old, new, {(ROW, "a", "done"): 12, (ROW, "a", "running"): 3}, {})
    assert [f.line() for f in said] == [
        "12 rows at (a, done): will next run the new stage b (was c)",
        "3 rows at (a, running): when a finishes they run b (was c)",
    ]
    assert not any(f.stranded for f in said)


def test_a_removed_stage_strands_its_rows_unless_mapped() -> None:
    old, new = graph("a", "b", "c"), graph("a", "c")
    assert diff_lines(old, new) == [
        "removed stage b (was after a)",
        "moved stage c: after a (was b)",
    ]
    assert positions_to_count(old, new) == {ROW: ["a", "b"], GROUP: []}
    counts = {(ROW, "b", "done"): 4, (ROW, "b", "running"): 2, (ROW, "b", "failed"): 1}
    stranded = fates(old, new, counts, {})
    assert [f.stranded for f in stranded] == [True, True, True]
    assert "would be stranded: they wait for c" in stranded[0].line()
    assert "--map b=STEP" in stranded[0].line()
    mapped = fates(old, new, counts, {"b": "a"})
    assert [f.line() for f in mapped] == [
        "4 rows at (b, done): move to (a, done), then run c",
        "1 rows at (b, failed): move to (a, failed); a retry runs a",
        "2 rows at (b, running): their run or pending retry is cancelled (recorded in the "
        "ledger) and they move to (new, done), so a runs again",
    ]
    assert not any(f.stranded for f in mapped)


def test_rows_finished_at_a_removed_last_stage_are_left_alone() -> None:
    old, new = graph("a", "b"), graph("a")
    (finished,) = fates(old, new, {(ROW, "b", "done"): 7}, {})
    assert not finished.stranded and "finished" in finished.what
    # and the rows that waited for it are finished too
    (waited,) = fates(old, new, {(ROW, "a", "done"): 2}, {})
    assert waited.what == "nothing follows a any more (b did): they are finished"


def test_a_rename_is_a_map_to_the_new_name() -> None:
    old, new = graph("a", "b", "c"), graph("a", "b2", "c")
    assert check_maps(old, new, {"b": "b2"}) == {"b": "b2"}
    (running,) = fates(old, new, {(ROW, "b", "running"): 1}, {"b": "b2"})
    assert running.what.endswith("move to (a, done), so b2 runs again")
    assert rerun_from(new, "b2") == "a" and rerun_from(new, "new") == "new"


@pytest.mark.parametrize(
    ("maps", "problem"),
    [
        ({"zz": "a"}, "'zz' is not a step of the installed graph"),
        ({"a": "c"}, "'a' is still a step of the new graph"),
        ({"b": "nope"}, "'nope' is not a row step of the new graph"),
        ({"g": "a"}, "'a' is not a group step of the new graph"),
    ],
)
def test_maps_are_checked_against_both_graphs(maps: dict[str, str], problem: str) -> None:
    old = graph("a", "b", "g", group=("g",))
    new = graph("a", "c", "h", group=("h",))
    with pytest.raises(ConfigurationError, match=problem):
        check_maps(old, new, maps)


def test_failed_rows_cannot_be_mapped_to_a_start_step() -> None:
    old, new = graph("a"), graph("a2")
    (failed,) = fates(old, new, {(ROW, "a", "failed"): 1}, {"a": "new"})
    assert failed.stranded and "retry cannot run" in failed.what


def test_a_removed_group_stage_strands_its_groups() -> None:
    old = graph("a", "g", "h", group=("g", "h"))
    new = graph("a", "g", group=("g",))
    assert positions_to_count(old, new) == {ROW: [], GROUP: ["g", "h"]}
    said = fates(old, new, {(GROUP, "h", "running"): 1, (GROUP, "g", "done"): 5}, {})
    assert [(f.level, f.stranded) for f in said] == [(GROUP, False), (GROUP, True)]
    assert said[0].what == "nothing follows g any more (h did): they are finished"
    assert said[1].line().startswith("1 groups at (h, running): would be stranded")


def test_a_stage_that_becomes_a_group_stage_leaves_its_row_positions() -> None:
    old, new = graph("a", "g"), graph("a", "g", group=("g",))
    assert (ROW, "g") in changed_stages(old, new)
    (stuck,) = fates(old, new, {(ROW, "g", "running"): 1}, {})
    assert stuck.stranded


def test_start_step_statuses_of_the_users_own_are_not_the_pipelines() -> None:
    old, new = graph("a"), Graph(("begin",), (("a", "begin", False),))
    said = fates(old, new, {(ROW, "new", "running"): 3, (ROW, "new", "done"): 2}, {})
    assert [(f.status, f.stranded) for f in said] == [("done", True)]


def test_the_plan_refuses_live_runs_at_stages_whose_place_changed() -> None:
    old = pipeline("a", "c")
    made = plan(pipeline("a", "b", "c"), fingerprint(old), {}, [("a", "w1", 2)], {})
    assert made.changed and not made.stranded
    (why,) = made.refusals()
    assert why.startswith("2 live run(s) of a by worker w1") and "stop the workers" in why
    assert "  refused:" in made.lines()


def test_an_unchanged_graph_ignores_maps_and_says_so() -> None:
    same = pipeline("a", "b")
    made = plan(same, fingerprint(same), {}, [], {"x": "y"})
    assert not made.changed and made.refusals() == []
    assert made.lines() == ["pipeline p: stage graph as installed"]
    assert plan(same, None, {}, [], {}).lines() == [
        "pipeline p: not installed yet: migrate installs it"
    ]


def test_policy_changes_are_noted_and_older_installs_say_they_did_not_record_them() -> None:
    before: dict[str, Any] = {"policies": policy_of(pipeline("a", retry={"a": 3}))}
    after = policy_of(pipeline("a", retry={"a": 5}))
    (line,) = policy_lines(before, after)
    assert line.startswith("stage a: max_attempts 3 → 5")
    assert policy_lines({}, after) == [
        "retry policies and time-outs: not recorded by the version that installed it"
    ]
    # a policy is outside the digest: changing it needs no migrate
    assert (
        fingerprint(pipeline("a", retry={"a": 3}))["digest"]
        == fingerprint(pipeline("a", retry={"a": 5}))["digest"]
    )


def test_a_running_worker_is_stale_only_for_the_stages_whose_place_changed() -> None:
    installed = fingerprint(pipeline("a", "b", "c", "d"))
    mine = pipeline("a", "c", "d")
    # a's next stage and c's step before it differ; d keeps its place
    assert stale_stages(installed, mine, ["a", "c", "d"]) == ["a", "c"]
    assert stale_stages(installed, mine, ["d"]) == []
    assert stale_stages(fingerprint(mine), mine, ["a", "c", "d"]) == []


def test_a_reordering_refuses_rows_that_would_skip_a_stage_and_says_what_reruns() -> None:
    old, new = graph("a", "b", "c"), graph("a", "c", "b")
    assert diff_lines(old, new) == [
        "moved stage b: after c (was a)",
        "moved stage c: after a (was b)",
    ]
    counts = {
        (ROW, "a", "done"): 1,
        (ROW, "b", "done"): 2,
        (ROW, "b", "running"): 3,
        (ROW, "c", "done"): 4,
    }
    said = {(f.step, f.status): f for f in fates(old, new, counts, {})}
    assert said["a", "done"].what == "will next run c (was b)"
    assert said["b", "done"].stranded and said["b", "running"].stranded
    assert said["b", "done"].what.startswith(
        "would skip c: they wait for it, and it now runs before b"
    )
    assert not said["c", "done"].stranded
    assert said["c", "done"].what.startswith(
        "b now follows c, the installed graph's last step (they ran it before): migrate asks"
    )


def test_a_stranded_step_gets_an_example_map() -> None:
    (line,) = fates(graph("a", "b", "c"), graph("a", "c"), {(ROW, "b", "done"): 1}, {})
    assert line.what.endswith("(--map b=STEP, e.g. --map b=a, the step it followed)")


def test_rows_at_a_step_a_new_group_stage_follows_are_told_how_their_groups_form() -> None:
    (appended,) = fates(
        graph("a", "c"), graph("a", "c", "g", group=("g",)), {(ROW, "c", "done"): 3}, {}
    )
    assert "form with `pgstagechain recover --deep`" in appended.what
    # a group stage put before another: the groups were formed already
    (inserted,) = fates(
        graph("a", "g", group=("g",)),
        graph("a", "f", "g", group=("f", "g")),
        {(ROW, "a", "done"): 3},
        {},
    )
    assert inserted.what == "will next run the new stage f (was g)"
