"""The pipeline drawn from its registry: the seed's ten stages in Mermaid, DOT and SVG."""

from __future__ import annotations

import itertools
import re
import xml.etree.ElementTree as ET

import pydot
import pytest

from pgstagechain import Pipeline, graph
from tests.apps.seed import GROUP_STAGES, ROW_STAGES, seed_pipeline

# pydot still calls pyparsing's old camelCase names
pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated - use")

SVG = "{http://www.w3.org/2000/svg}"


async def handler(ctx: object) -> None:
    return None


@pytest.fixture
def seed() -> Pipeline:
    return seed_pipeline(handler)


def test_chains_follow_the_registry(seed: Pipeline) -> None:
    (chain,) = graph.chains(seed)
    assert [n.name for n in chain] == ["img_gen", *ROW_STAGES, *GROUP_STAGES]
    assert [n.kind for n in chain] == ["start"] + ["row"] * 8 + ["group"] * 2


def test_dot_parses_with_every_stage_and_marks_group_stages(seed: Pipeline) -> None:
    (parsed,) = pydot.graph_from_dot_data(graph.to_dot(seed))
    nodes = {n.get_name().strip('"'): n for n in parsed.get_nodes() if n.get_name() != "node"}
    assert set(nodes) == {"img_gen", *ROW_STAGES, *GROUP_STAGES}
    for name in GROUP_STAGES:
        assert nodes[name].get("peripheries") == "2"
        assert nodes[name].get("class") == "group"
    for name in ROW_STAGES:
        assert nodes[name].get("peripheries") is None
        assert nodes[name].get("class") == "row"
    edges = {
        (e.get_source().strip('"'), e.get_destination().strip('"')) for e in parsed.get_edges()
    }
    chain = ["img_gen", *ROW_STAGES, *GROUP_STAGES]
    assert edges == set(itertools.pairwise(chain))


def test_mermaid_has_a_node_line_per_stage_and_an_edge_per_link(seed: Pipeline) -> None:
    lines = graph.to_mermaid(seed).splitlines()
    assert lines[0] == "flowchart LR"
    node = re.compile(r'^    (n\d+)(\(\[|\[\[|\[)"([^"]*)"(\]\)|\]\]|\]):::(start|row|group)$')
    edge = re.compile(r"^    (n\d+) (-->|==>\|fan-in per group\|) (n\d+)$")
    nodes = {m[1]: m for line in lines if (m := node.match(line))}
    edges = [m for line in lines if (m := edge.match(line))]
    by_name = {m[3].split("<br/>")[0]: m for m in nodes.values()}
    assert set(by_name) == {"img_gen", *ROW_STAGES, *GROUP_STAGES}
    for name in GROUP_STAGES:
        assert by_name[name][2] == "[[" and by_name[name][5] == "group"
    for name in ROW_STAGES:
        assert by_name[name][2] == "[" and by_name[name][5] == "row"
    assert len(edges) == 10 and all(e[1] in nodes and e[3] in nodes for e in edges)
    assert [e[2] for e in edges].count("==>|fan-in per group|") == 1  # iou_eval into its group
    assert sum(1 for line in lines if line.startswith("    classDef ")) == 3
    # every line is a header, a node, an edge or a class definition
    assert len(lines) == 1 + len(nodes) + len(edges) + 3


def test_svg_is_well_formed_with_one_node_per_stage(seed: Pipeline) -> None:
    root = ET.fromstring(graph.to_svg(seed))
    groups = {g.get("data-stage"): g for g in root.iter(f"{SVG}g")}
    assert set(groups) == {"img_gen", *ROW_STAGES, *GROUP_STAGES}
    for name in GROUP_STAGES:
        assert groups[name].get("class") == "node group"
        assert len(groups[name].findall(f"{SVG}rect")) == 2  # the double border
    for name in ROW_STAGES:
        assert groups[name].get("class") == "node row"
        assert len(groups[name].findall(f"{SVG}rect")) == 1
    paths = [p for p in root.iter(f"{SVG}path") if "edge" in (p.get("class") or "")]
    assert len(paths) == 10
    fan_in = [p for p in paths if p.get("class") == "edge fan-in"]
    assert [(p.get("data-from"), p.get("data-to")) for p in fan_in] == [
        ("iou_eval", GROUP_STAGES[0])
    ]
    style = root.find(f"{SVG}style")
    assert style is not None and ".node.group rect" in (style.text or "")


def test_live_figures_are_drawn(seed: Pipeline) -> None:
    live = {"planner": graph.Live(waiting=1500, running=2, failed=3, per_minute=12.5)}
    root = ET.fromstring(graph.to_svg(seed, live))
    planner = next(g for g in root.iter(f"{SVG}g") if g.get("data-stage") == "planner")
    fields = {t.get("data-field"): "".join(t.itertext()) for t in planner.iter(f"{SVG}tspan")}
    assert fields["waiting"] == "1500" and fields["running"] == "2" and fields["failed"] == "3"
    assert fields["rate"] == "12/min" or fields["rate"] == "13/min"
    assert "backlog-3" in (planner.get("class") or "")
    assert "waiting 1500 · running 2 · failed 3" in graph.to_mermaid(seed, live)
    assert "waiting 1500" in graph.to_dot(seed, live)


def test_hostile_pipeline_name_is_escaped() -> None:
    pipeline = Pipeline("x", table='t"<b>', start="s")
    pipeline.stage(after="s", name="a")(handler)
    ET.fromstring(graph.to_svg(pipeline))
    pydot.graph_from_dot_data(graph.to_dot(pipeline))


def test_unknown_format_is_named(seed: Pipeline) -> None:
    with pytest.raises(ValueError, match="unknown format 'png'"):
        graph.render(seed, "png")
