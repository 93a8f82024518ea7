"""The plan of a graph change, as ``migrate --plan`` shows it and ``migrate`` carries it
out: :func:`plan` puts the diff and the fates (see ``_graph_change``) together,
:func:`read_plan` reads the counts it needs, :func:`apply_plan` moves the mapped rows, in
migrate's transaction, after the new trigger function is in place.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from psycopg import AsyncConnection

from ._graph_change import (
    GROUP,
    ROW,
    STATUSES,
    Fate,
    Graph,
    changed_stages,
    check_maps,
    diff_lines,
    fates,
    policy_lines,
    policy_of,
    positions_to_count,
    rerun_from,
)
from ._pipeline import Pipeline
from ._sql import Statements, pipeline_params
from .errors import ConfigurationError


@attrs.frozen
class GraphPlan:
    """What ``migrate`` would do to a pipeline's rows in flight, said before doing it."""

    pipeline: str
    installed: Graph | None
    new: Graph
    fates: tuple[Fate, ...] = ()
    #: ``(stage, worker, live runs)`` at stages whose place changed
    busy: tuple[tuple[str, str, int], ...] = ()
    maps: Mapping[str, str] = attrs.field(factory=dict)
    notes: tuple[str, ...] = ()
    #: installed stages whose place changes: their workers stop before migrate
    moved: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return self.installed is not None and self.installed != self.new

    @property
    def stranded(self) -> tuple[Fate, ...]:
        return tuple(f for f in self.fates if f.stranded)

    def refusals(self) -> list[str]:
        """Why ``migrate`` will not make this change as it stands (empty: it will)."""
        found = [f.line() for f in self.stranded]
        found += [
            f"{count} live run(s) of {stage} by worker {worker}: a worker still running the "
            "installed graph would finish or claim them by it; stop the workers that serve "
            f"{stage} (SIGTERM: they finish or hand back their runs) before migrating"
            for stage, worker, count in self.busy
        ]
        return found

    def lines(self) -> list[str]:
        """The plan as text, one line each."""
        if self.installed is None:
            return [f"pipeline {self.pipeline}: not installed yet: migrate installs it"]
        if not self.changed:
            return [f"pipeline {self.pipeline}: stage graph as installed", *self.notes]
        found = [f"pipeline {self.pipeline}: the stage graph changes"]
        found += [f"  installed: {chain}" for chain in self.installed.chains()]
        found += [f"  new:       {chain}" for chain in self.new.chains()]
        found += [f"  {line}" for line in diff_lines(self.installed, self.new)]
        found += [f"  map {old} → {new}" for old, new in self.maps.items()]
        found += [f"  {fate.line()}" for fate in self.fates] or [
            "  no rows or groups in flight at the steps it changes"
        ]
        if self.moved:
            found.append(
                f"  before migrating, stop the workers that serve {', '.join(self.moved)} "
                "(their place changes; workers of other stages can stay)"
            )
        found += [f"  {note}" for note in self.notes]
        refused = self.refusals()
        if refused:
            found.append("  refused:")
            found += [f"    {why}" for why in refused]
        return found


def parse_maps(given: Iterable[str]) -> dict[str, str]:
    """``OLD=NEW`` values (``--map`` on a command line) as a dict, each OLD once."""
    found: dict[str, str] = {}
    for each in given:
        old, sep, new = each.partition("=")
        if not sep or not old or not new:
            raise ConfigurationError(f"--map takes OLD=NEW (a step of each graph), got {each!r}")
        if old in found:
            raise ConfigurationError(f"--map {old}=... is given twice")
        found[old] = new
    return found


def plan(
    pipeline: Pipeline,
    config: Mapping[str, Any] | None,
    counts: Mapping[tuple[str, str, str], int],
    live: Iterable[tuple[str, str, int]],
    maps: Mapping[str, str],
) -> GraphPlan:
    """The plan for installing ``pipeline`` over ``config`` (None: not installed)."""
    new = Graph.of(pipeline)
    if config is None:
        return GraphPlan(pipeline.name, None, new)
    old = Graph.installed(config)
    notes = tuple(policy_lines(config, policy_of(pipeline)))
    if old == new:
        return GraphPlan(pipeline.name, old, new, notes=notes)
    checked = check_maps(old, new, maps)
    return GraphPlan(
        pipeline.name,
        old,
        new,
        tuple(fates(old, new, counts, checked)),
        tuple(sorted(live)),
        checked,
        notes,
        tuple(sorted({stage for _level, stage in changed_stages(old, new)})),
    )


async def read_plan(
    conn: AsyncConnection[Any],
    q: Statements,
    pipeline: Pipeline,
    config: Mapping[str, Any] | None,
    maps: Mapping[str, str],
) -> GraphPlan:
    """:func:`plan`, with the counts and live runs read from the database."""
    counts: dict[tuple[str, str, str], int] = {}
    live: list[tuple[str, str, int]] = []
    if config is not None:
        old, new = Graph.installed(config), Graph.of(pipeline)
        if old != new:
            params = pipeline_params(pipeline)
            canonical = {params[s]: s for s in STATUSES}
            for level, steps in positions_to_count(old, new).items():
                if steps:
                    cur = await conn.execute(
                        q.text(f"positions_of_{level}s"), {**params, "steps": steps}
                    )
                    for step, status, count in await cur.fetchall():
                        if level == GROUP or status in canonical:
                            counts[(level, step, canonical.get(status, status))] = int(count)
            for level in (ROW, GROUP):
                busy = [s for lv, s in changed_stages(old, new) if lv == level]
                if busy:
                    cur = await conn.execute(
                        q.text(f"live_runs_of_{level}s"), {**params, "steps": busy}
                    )
                    live += [(s, w, int(n)) for s, w, n in await cur.fetchall()]
    return plan(pipeline, config, counts, live, maps)


async def apply_plan(
    conn: AsyncConnection[Any], q: Statements, pipeline: Pipeline, found: GraphPlan
) -> None:
    """Move the mapped rows and groups, and rename the ledger's runs of a renamed stage.
    Called in migrate's transaction once the new trigger function is in place, so that the
    moved rows are announced by the new graph."""
    if not found.changed or found.installed is None:
        return
    old, new = found.installed, found.new
    for old_step, new_step in found.maps.items():
        level = old.level(old_step)
        reason = (
            f"cancelled by migrate: stage {old_step} is no longer in the graph; its rows were "
            f"mapped to {new_step} and run again from ({rerun_from(new, new_step)}, done)"
        )
        await conn.execute(
            q.text(f"map_{level}s"),
            {
                **pipeline_params(pipeline),
                "old": old_step,
                "new": new_step,
                "rerun_from": rerun_from(new, new_step),
                "reason": reason,
            },
        )
        if new.is_stage(new_step) and not old.is_stage(new_step) and old.is_stage(old_step):
            await conn.execute(
                q.text("rename_runs"),
                {**pipeline_params(pipeline), "old": old_step, "new": new_step},
            )
