"""Changing the stage graph of a live pipeline: what changed between the installed graph and
the code's, where that leaves the rows and groups in flight, and the moves (``--map``) that
keep every one of them.

The diff and the fate of each position are pure functions of the two graphs and the counts
read from the database, so that ``migrate --plan`` and ``migrate`` say the same thing and
the unit tests need no database; ``_migration_plan`` reads the counts and moves the
mapped rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from ._pipeline import Pipeline
from .errors import ConfigurationError

ROW = "row"
GROUP = "group"
STATUSES = ("done", "running", "failed")


@attrs.frozen
class Graph:
    """A stage graph as the database records it: start steps and ``(name, after, group)``."""

    start: tuple[str, ...]
    stages: tuple[tuple[str, str, bool], ...]

    @classmethod
    def of(cls, pipeline: Pipeline) -> Graph:
        return cls(
            tuple(pipeline.start_steps), tuple(sorted((s.name, s.after, s.group) for s in pipeline))
        )

    @classmethod
    def installed(cls, config: Mapping[str, Any]) -> Graph:
        """The graph an install recorded (every version recorded ``start`` and ``stages``)."""
        return cls(
            tuple(config.get("start", ())),
            tuple(sorted((str(n), str(a), bool(g)) for n, a, g in config.get("stages", ()))),
        )

    def steps(self, level: str) -> set[str]:
        """The steps rows (``row``) or groups (``group``) can stand at."""
        if level == GROUP:
            return {name for name, _after, group in self.stages if group}
        return set(self.start) | {name for name, _after, group in self.stages if not group}

    def level(self, step: str) -> str | None:
        for level in (ROW, GROUP):
            if step in self.steps(level):
                return level
        return None

    def after(self, stage: str) -> str | None:
        return next((a for name, a, _group in self.stages if name == stage), None)

    def next(self, step: str) -> str | None:
        return next((name for name, a, _group in self.stages if a == step), None)

    def upstream(self, step: str) -> list[str]:
        """The steps before ``step`` in its chain, from the start step on."""
        found: list[str] = []
        while (step := self.after(step) or "") and step not in found:
            found.insert(0, step)
        return found

    def downstream(self, step: str) -> list[str]:
        """The stages after ``step`` in its chain, in order."""
        found: list[str] = []
        while (step := self.next(step) or "") and step not in found:
            found.append(step)
        return found

    def is_stage(self, step: str) -> bool:
        return any(name == step for name, _after, _group in self.stages)

    def chains(self) -> list[str]:
        """Each chain from a start step, drawn on one line; group stages marked."""
        drawn = []
        for first in self.start:
            parts, step, seen = [first], first, {first}
            while (following := self.next(step)) is not None and following not in seen:
                group = any(n == following and g for n, _a, g in self.stages)
                parts.append(f"{following} [group]" if group else following)
                step = following
                seen.add(step)
            drawn.append(" → ".join(parts))
        return drawn


@attrs.frozen
class Fate:
    """What the change does to the rows (or groups) at one ``(step, status)``."""

    level: str
    step: str
    status: str
    count: int
    what: str
    stranded: bool = False

    def line(self) -> str:
        things = "rows" if self.level == ROW else "groups"
        return f"{self.count} {things} at ({self.step}, {self.status}): {self.what}"


def diff_lines(old: Graph, new: Graph) -> list[str]:
    """The stages added, removed and moved, one line each."""
    found = []
    for level in (ROW, GROUP):
        kind = "group stage" if level == GROUP else "stage"
        before = old.steps(level) - set(old.start)
        after = new.steps(level) - set(new.start)
        found += [f"added {kind} {s} (after {new.after(s)})" for s in sorted(after - before)]
        found += [f"removed {kind} {s} (was after {old.after(s)})" for s in sorted(before - after)]
        for stage in sorted(before & after):
            if old.after(stage) != new.after(stage):
                found.append(
                    f"moved {kind} {stage}: after {new.after(stage)} (was {old.after(stage)})"
                )
    found += [f"added start step {s}" for s in new.start if s not in old.start]
    found += [f"removed start step {s}" for s in old.start if s not in new.start]
    return found


def gone(old: Graph, new: Graph) -> list[tuple[str, str]]:
    """``(level, step)`` of the installed graph that the new one has no place for."""
    return [
        (level, step)
        for level in (ROW, GROUP)
        for step in sorted(old.steps(level) - new.steps(level))
    ]


def moved_on(old: Graph, new: Graph) -> list[tuple[str, str]]:
    """``(level, step)`` kept by the new graph whose next stage is another one."""
    return [
        (level, step)
        for level in (ROW, GROUP)
        for step in sorted(old.steps(level) & new.steps(level))
        if old.next(step) != new.next(step)
    ]


def changed_stages(old: Graph, new: Graph) -> list[tuple[str, str]]:
    """Installed stages whose place changed (gone, after another step, or followed by
    another stage): a worker still running the installed graph would claim or finish them
    by it, so none of their runs may be live when the change is made."""
    found = [(lv, s) for lv, s in gone(old, new) if old.is_stage(s)]
    found += [(lv, s) for lv, s in moved_on(old, new) if old.is_stage(s)]
    for level in (ROW, GROUP):
        for stage in sorted((old.steps(level) & new.steps(level)) - set(old.start)):
            if old.after(stage) != new.after(stage) and (level, stage) not in found:
                found.append((level, stage))
    return sorted(set(found))


def positions_to_count(old: Graph, new: Graph) -> dict[str, list[str]]:
    """The steps of each level whose rows the change concerns."""
    steps: dict[str, list[str]] = {ROW: [], GROUP: []}
    for level, step in [*gone(old, new), *moved_on(old, new)]:
        steps[level].append(step)
    return {level: sorted(set(found)) for level, found in steps.items()}


def check_maps(old: Graph, new: Graph, maps: Mapping[str, str]) -> dict[str, str]:
    """``maps`` checked against both graphs: each OLD a step the new graph no longer has,
    each NEW a step of the new graph at the same level (rows stay rows, groups groups)."""
    for old_step, new_step in maps.items():
        level = old.level(old_step)
        if level is None:
            raise ConfigurationError(
                f"--map {old_step}={new_step}: {old_step!r} is not a step of the installed "
                f"graph (its steps: {sorted(old.steps(ROW) | old.steps(GROUP))})"
            )
        if old_step in new.steps(level):
            raise ConfigurationError(
                f"--map {old_step}={new_step}: {old_step!r} is still a step of the new graph; "
                "only steps it no longer has are mapped"
            )
        if new_step not in new.steps(level):
            raise ConfigurationError(
                f"--map {old_step}={new_step}: {new_step!r} is not a {level} step of the new "
                f"graph (its {level} steps: {sorted(new.steps(level))})"
            )
    return dict(maps)


def rerun_from(new: Graph, step: str) -> str:
    """Where a row that was running a mapped stage goes so that ``step`` runs again: the
    step before it (a start step is its own)."""
    return new.after(step) or step


def fates(
    old: Graph, new: Graph, counts: Mapping[tuple[str, str, str], int], maps: Mapping[str, str]
) -> list[Fate]:
    """What happens to the rows and groups counted at each ``(level, step, status)``."""
    found = []
    for (level, step, status), count in sorted(counts.items()):
        said = _fate(old, new, level, step, status, maps) if count else None
        if said is not None:
            found.append(Fate(level, step, status, count, *said))
    return found


def _kept(old: Graph, new: Graph, level: str, step: str, status: str) -> tuple[str, bool] | None:
    """Rows at a step both graphs have, whose next stage changed."""
    before, following = old.next(step), new.next(step)
    if status == "failed":
        return None  # a retry runs the same stage again, whatever follows it
    if before is not None and before in new.steps(level) and before not in new.downstream(step):
        # re-ordered: the stage they wait for now runs before this step, so they would pass
        # it by; no map says where such a row goes, it has to finish under the installed graph
        waiting = "they wait for" if status == "done" else f"when {step} finishes they wait for"
        return (
            f"would skip {before}: {waiting} it, and it now runs before {step}; let them "
            "finish under the installed graph before migrating (or move them by hand)",
            True,
        )
    if status == "running":
        return f"when {step} finishes they run {following or 'nothing more'} (was {before})", False
    if following is None:
        return f"nothing follows {step} any more ({before} did): they are finished", False
    again = following in old.upstream(step)
    if before is None:
        return (
            f"{following} now follows {step}, the installed graph's last step"
            f"{' (they ran it before)' if again else ''}: migrate asks --backfill (they run "
            f"it{_forming(old, new, level, step)}) or --no-backfill (they are moved past it)",
            False,
        )
    if again:
        return f"will run {following} again (they ran it before {step}; was {before})", False
    fresh = "the new stage " if not old.is_stage(following) else ""
    return (
        f"will next run {fresh}{following} (was {before}){_forming(old, new, level, step)}",
        False,
    )


def _forming(old: Graph, new: Graph, level: str, step: str) -> str:
    """Rows already at a step a group stage now follows (and none did): the trigger forms a
    group when a member lands there, so those already there need the deep scan."""
    following, before = new.next(step), old.next(step)
    if level == ROW and following in new.steps(GROUP) and before not in old.steps(GROUP):
        return "; groups whose members are all there form with `pgstagechain recover --deep`"
    return ""


def _fate(
    old: Graph, new: Graph, level: str, step: str, status: str, maps: Mapping[str, str]
) -> tuple[str, bool] | None:
    if status != "done" and not old.is_stage(step):
        return None  # a start step's other statuses are the user's own, not the pipeline's
    if step in new.steps(level):  # kept, with another stage after it
        return _kept(old, new, level, step, status)
    target = maps.get(step)
    if target is None:
        if status == "done" and old.next(step) is None:
            return "finished; the step is gone and nothing ran after it: left as they are", False
        waits = {"done": f"wait for {old.next(step)}", "running": "are being run"}
        kept = [s for s in old.upstream(step) if s in new.steps(level)]
        example = f", e.g. --map {step}={kept[-1]}, the step it followed" if kept else ""
        return (
            f"would be stranded: they {waits.get(status, 'failed there')} and the new graph "
            f"has no step {step}: map them (--map {step}=STEP{example})",
            True,
        )
    if status == "done":
        return f"move to ({target}, done), then run {new.next(target) or 'nothing more'}", False
    if status == "failed":
        if not new.is_stage(target):
            return (
                f"cannot move to ({target}, failed): {target} is a start step, which retry "
                f"cannot run; retry or cancel them first, or map {step} to a stage",
                True,
            )
        return f"move to ({target}, failed); a retry runs {target}", False
    return (
        f"their run or pending retry is cancelled (recorded in the ledger) and they move to "
        f"({rerun_from(new, target)}, done), so {new.next(rerun_from(new, target))} runs again",
        False,
    )


def stale_stages(config: Mapping[str, Any], pipeline: Pipeline, served: Iterable[str]) -> list[str]:
    """The stages a running worker serves whose place in the installed graph (``config``)
    is not the one its code gives them: the step they follow, the stage after them, their
    level. Claiming or finishing them by its own graph would go against the installed one."""
    installed, mine = Graph.installed(config), Graph.of(pipeline)
    return [
        s
        for s in served
        if (installed.after(s), installed.next(s), installed.level(s))
        != (mine.after(s), mine.next(s), mine.level(s))
    ]


def policy_of(pipeline: Pipeline) -> dict[str, dict[str, Any]]:
    """Each stage's retry policy and time-out, recorded beside the graph (outside the digest:
    workers apply their own code's policy, and a change needs no migrate)."""
    return {s.name: {"max_attempts": s.retry.max_attempts, "timeout": s.timeout} for s in pipeline}


def policy_lines(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The retry policies and time-outs that changed, stage by stage."""
    recorded = old.get("policies")
    if recorded is None:
        return ["retry policies and time-outs: not recorded by the version that installed it"]
    found = []
    for stage in sorted(set(recorded) & set(new)):
        changes = [
            f"{what} {recorded[stage].get(what)} → {new[stage][what]}"
            for what in ("max_attempts", "timeout")
            if recorded[stage].get(what) != new[stage][what]
        ]
        if changes:
            found.append(
                f"stage {stage}: {', '.join(changes)} (each worker applies its own code's "
                "policy to the failures it handles; a pending retry keeps its time)"
            )
    return found
