"""A pipeline drawn from its registry: Mermaid, Graphviz DOT, or SVG laid out here.

Pure functions of a :class:`~pgstagechain.Pipeline` (and, for a live drawing, of a
:class:`~pgstagechain.admin.PipelineStatus`): ``pgstagechain graph`` prints them, the
dashboard shows the SVG, and the docs embed it. No Graphviz binary is needed.

A pipeline is a set of chains: each stage follows exactly one step and each step has at
most one next stage, so every start step heads a straight line of stages. The SVG lays
each chain out in rows of a few stages, snaking back and forth so every arrow is short.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal
from xml.sax.saxutils import escape, quoteattr

import attrs

from . import admin
from ._pipeline import Pipeline

__all__ = [
    "FORMATS",
    "Live",
    "Node",
    "chains",
    "live_counts",
    "render",
    "to_dot",
    "to_mermaid",
    "to_svg",
]

FORMATS = ("mermaid", "dot", "svg")
Kind = Literal["start", "row", "group"]


@attrs.frozen(kw_only=True)
class Node:
    """A start step, a row stage or a group (fan-in) stage."""

    name: str
    kind: Kind
    after: str | None = None


@attrs.frozen(kw_only=True)
class Live:
    """What a live drawing shows on a stage."""

    waiting: int = 0
    running: int = 0
    failed: int = 0
    #: runs that succeeded per minute, over the status window
    per_minute: float = 0.0
    oldest_waiting_seconds: float | None = None


def chains(pipeline: Pipeline) -> list[list[Node]]:
    """Each start step and the stages that follow it, in order; then any stage no start
    step leads to (a pipeline that does not validate), one chain each."""
    found: list[list[Node]] = []
    seen: set[str] = set()
    for start in pipeline.start_steps:
        chain = [Node(name=start, kind="start")]
        step = start
        while (nxt := pipeline.next_stage(step)) is not None and nxt.name not in seen:
            seen.add(nxt.name)
            chain.append(Node(name=nxt.name, kind="group" if nxt.group else "row", after=step))
            step = nxt.name
        found.append(chain)
    for each in pipeline:
        if each.name not in seen:
            seen.add(each.name)
            kind: Kind = "group" if each.group else "row"
            found.append([Node(name=each.name, kind=kind, after=each.after)])
    return found


def _fan_in(pipeline: Pipeline, node: Node) -> bool:
    """The link where rows gather into their group: a row step into a group stage."""
    return (
        node.kind == "group" and node.after is not None and not pipeline.is_group_step(node.after)
    )


def _nodes(pipeline: Pipeline) -> list[Node]:
    return [node for chain in chains(pipeline) for node in chain]


def live_counts(status: admin.PipelineStatus | admin.PipelineLive) -> dict[str, Live]:
    """Each stage's :class:`Live` figures from a status read (reads only the fields it
    names, so figures added to the status later change nothing here)."""
    minutes = max(status.window_seconds / 60.0, 1e-9)
    found: dict[str, Live] = {}
    for each in status.stages:
        age = each.oldest_waiting
        found[each.stage] = Live(
            waiting=each.waiting,
            running=each.running,
            failed=each.failed,
            per_minute=each.runs.succeeded / minutes,
            oldest_waiting_seconds=None if age is None else age.total_seconds(),
        )
    return found


def _rate(per_minute: float) -> str:
    return f"{per_minute:.1f}/min" if per_minute < 10 else f"{per_minute:.0f}/min"


def _counts(live: Live) -> str:
    return f"waiting {live.waiting} · running {live.running} · failed {live.failed}"


# -- Mermaid ---------------------------------------------------------------------------------------


def _mermaid_text(text: str) -> str:
    return text.replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")


def to_mermaid(pipeline: Pipeline, live: Mapping[str, Live] | None = None) -> str:
    """A Mermaid ``flowchart``: start steps as stadiums, row stages as boxes, group stages
    as subroutine boxes of class ``group``; the fan-in arrow (rows into their group) is thick."""
    lines = ["flowchart LR"]
    ids = {node.name: f"n{i}" for i, node in enumerate(_nodes(pipeline))}
    for node in _nodes(pipeline):
        parts = [node.name]
        if node.kind == "group":
            parts.append("group (fan-in)")
        elif node.kind == "start":
            parts.append("start")
        if live is not None and node.name in live:
            figures = live[node.name]
            parts += [_counts(figures), _rate(figures.per_minute)]
        label = "<br/>".join(_mermaid_text(p) for p in parts)
        open_, close = {"start": ("([", "])"), "row": ("[", "]"), "group": ("[[", "]]")}[node.kind]
        lines.append(f'    {ids[node.name]}{open_}"{label}"{close}:::{node.kind}')
    for node in _nodes(pipeline):
        if node.after is None or node.after not in ids:
            continue
        arrow = "==>|fan-in per group|" if _fan_in(pipeline, node) else "-->"
        lines.append(f"    {ids[node.after]} {arrow} {ids[node.name]}")
    lines += [
        "    classDef start fill:#f1f3f4,stroke:#5f6368,stroke-dasharray:4 3",
        "    classDef row fill:#e8f0fe,stroke:#1a73e8",
        "    classDef group fill:#f3e8fd,stroke:#8430ce,stroke-width:3px",
    ]
    return "\n".join(lines) + "\n"


# -- DOT -------------------------------------------------------------------------------------------


def _dot_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(pipeline: Pipeline, live: Mapping[str, Live] | None = None) -> str:
    """A Graphviz ``digraph``: start steps dashed ovals, row stages boxes, group stages
    double-bordered boxes (``peripheries=2``); the fan-in arrow is bold."""
    style = {
        "start": 'shape=oval, style=dashed, color="#5f6368"',
        "row": 'shape=box, style="rounded,filled", fillcolor="#e8f0fe", color="#1a73e8"',
        "group": 'shape=box, peripheries=2, style=filled, fillcolor="#f3e8fd", color="#8430ce"',
    }
    lines = [
        f"digraph {_dot_string(pipeline.name)} {{",
        "    rankdir=LR;",
        '    node [fontname="Helvetica", fontsize=11];',
    ]
    for node in _nodes(pipeline):
        label = node.name + {"start": "\nstart", "row": "", "group": "\ngroup (fan-in)"}[node.kind]
        if live is not None and node.name in live:
            figures = live[node.name]
            label += f"\n{_counts(figures)}\n{_rate(figures.per_minute)}"
        lines.append(
            f"    {_dot_string(node.name)} [{style[node.kind]}, "
            f"class={node.kind}, label={_dot_string(label)}];"
        )
    for node in _nodes(pipeline):
        if node.after is not None:
            extra = ' [style=bold, label="fan-in per group"]' if _fan_in(pipeline, node) else ""
            lines.append(f"    {_dot_string(node.after)} -> {_dot_string(node.name)}{extra};")
    lines.append("}")
    return "\n".join(lines) + "\n"


# -- SVG -------------------------------------------------------------------------------------------

WIDTH, GAP_X, GAP_Y, MARGIN = 200, 44, 40, 16
SVG_STYLE = """
.node rect { stroke-width: 1.5; }
.node.start rect { fill: #f1f3f4; stroke: #5f6368; stroke-dasharray: 5 3; }
.node.row rect { fill: #e8f0fe; stroke: #1a73e8; }
.node.group rect { fill: #f3e8fd; stroke: #8430ce; stroke-width: 3; }
.node.group rect.inner { fill: none; stroke-width: 1; }
.node.backlog-1 rect.outer { fill: #fef7e0; }
.node.backlog-2 rect.outer { fill: #fde293; }
.node.backlog-3 rect.outer { fill: #f6aea9; }
text { font-family: Helvetica, Arial, sans-serif; fill: #202124; }
text.name { font-size: 14px; font-weight: bold; }
text.kind { font-size: 10px; fill: #5f6368; }
text.counts, text.rate { font-size: 11px; }
text.failed { fill: #c5221f; font-weight: bold; }
.edge { stroke: #5f6368; stroke-width: 1.5; fill: none; marker-end: url(#arrow); }
.edge.fan-in { stroke: #8430ce; stroke-width: 3; stroke-dasharray: 6 3; }
"""


def backlog_level(live: Live | None) -> int:
    """0 (nothing waits) to 3 (many wait, or for long): the colour of a stage's box."""
    if live is None or live.waiting == 0:
        return 0
    age = live.oldest_waiting_seconds or 0.0
    if live.waiting >= 1000 or age >= 600:
        return 3
    if live.waiting >= 100 or age >= 60:
        return 2
    return 1


def _place(pipeline: Pipeline, per_row: int) -> list[tuple[Node, int, int]]:
    """Each node with its (row, column): chains in rows of ``per_row``, snaking."""
    placed: list[tuple[Node, int, int]] = []
    row = 0
    for chain in chains(pipeline):
        for i, node in enumerate(chain):
            r, c = divmod(i, per_row)
            placed.append((node, row + r, c if r % 2 == 0 else per_row - 1 - c))
        row += math.ceil(len(chain) / per_row)
    return placed


def to_svg(
    pipeline: Pipeline,
    live: Mapping[str, Live] | None = None,
    *,
    per_row: int = 4,
    inline: bool = False,
) -> str:
    """A standalone SVG drawing; with ``live``, every stage also shows its counts and
    throughput and is coloured by its backlog. Each stage is a ``<g class="node KIND"
    data-stage="NAME">`` whose ``text`` elements carry a ``data-field`` (the dashboard
    fills them in). ``inline`` leaves out the ``<style>`` (a page's own CSS styles it)."""
    if per_row < 1:
        raise ValueError("per_row must be at least 1")
    height = 84 if live is not None else 52
    placed = _place(pipeline, per_row)
    where = {node.name: (r, c) for node, r, c in placed}
    rows = max((r for _, r, _ in placed), default=0) + 1
    columns = min(per_row, max((c for _, _, c in placed), default=0) + 1)
    total_w = MARGIN * 2 + columns * WIDTH + (columns - 1) * GAP_X
    total_h = MARGIN * 2 + rows * height + (rows - 1) * GAP_Y

    def box(name: str) -> tuple[float, float]:
        r, c = where[name]
        return MARGIN + c * (WIDTH + GAP_X), MARGIN + r * (height + GAP_Y)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="pipeline-graph" '
        f'width="{total_w}" height="{total_h}" viewBox="0 0 {total_w} {total_h}" '
        f"data-pipeline={quoteattr(pipeline.name)}>",
        f"<title>{escape(f'pipeline {pipeline.name}')}</title>",
        "" if inline else f"<style>{SVG_STYLE}</style>",
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="9" '
        'markerHeight="9" markerUnits="userSpaceOnUse" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="#5f6368"/></marker></defs>',
    ]
    for node, _, _ in placed:
        if node.after is None or node.after not in where:
            continue
        (x1, y1), (x2, y2) = box(node.after), box(node.name)
        if y1 == y2:
            left_to_right = x2 > x1
            sx = x1 + WIDTH if left_to_right else x1
            ex = x2 - 2 if left_to_right else x2 + WIDTH + 2
            path = f"M{sx},{y1 + height / 2} L{ex},{y2 + height / 2}"
        else:
            path = f"M{x1 + WIDTH / 2},{y1 + height} L{x2 + WIDTH / 2},{y2 - 2}"
        kind = "edge fan-in" if _fan_in(pipeline, node) else "edge"
        out.append(
            f'<path class="{kind}" d="{path}" data-from={quoteattr(node.after)} '
            f"data-to={quoteattr(node.name)}/>"
        )
    for node, _, _ in placed:
        x, y = box(node.name)
        figures = live.get(node.name) if live is not None else None
        level = backlog_level(figures) if node.kind != "start" else 0
        classes = f"node {node.kind}" + (f" backlog-{level}" if level else "")
        out.append(
            f'<g class="{classes}" data-stage={quoteattr(node.name)} '
            f'data-kind="{node.kind}" transform="translate({x},{y})">'
        )
        radius = height / 2 if node.kind == "start" else 6
        out.append(
            f'<rect class="outer" width="{WIDTH}" height="{height}" rx="{radius}" ry="{radius}"/>'
        )
        if node.kind == "group":
            out.append(
                f'<rect class="inner" x="4" y="4" width="{WIDTH - 8}" height="{height - 8}" '
                'rx="4" ry="4"/>'
            )
        kind_label = {"start": "start step", "row": "row stage", "group": "group stage (fan-in)"}
        left = 24 if node.kind == "start" else 12
        out.append(f'<text class="name" x="{left}" y="22">{escape(node.name)}</text>')
        out.append(f'<text class="kind" x="{left}" y="38">{kind_label[node.kind]}</text>')
        if live is not None and node.kind != "start":
            shown = figures or Live()
            out.append(
                f'<text class="counts" x="12" y="56">'
                f'waiting <tspan data-field="waiting">{shown.waiting}</tspan> · '
                f'running <tspan data-field="running">{shown.running}</tspan> · '
                f'failed <tspan data-field="failed"'
                f"{' class=' + quoteattr('failed') if shown.failed else ''}>"
                f"{shown.failed}</tspan></text>"
            )
            age = shown.oldest_waiting_seconds
            out.append(
                f'<text class="rate" x="12" y="73">'
                f'<tspan data-field="rate">{_rate(shown.per_minute)}</tspan>'
                f'<tspan data-field="age">{"" if age is None else f" · oldest {age:.0f}s"}'
                "</tspan></text>"
            )
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def render(pipeline: Pipeline, fmt: str, live: Mapping[str, Live] | None = None) -> str:
    """The drawing in format ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "mermaid":
        return to_mermaid(pipeline, live)
    if fmt == "dot":
        return to_dot(pipeline, live)
    if fmt == "svg":
        return to_svg(pipeline, live)
    raise ValueError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
