"""A pipeline: the user's table, its state columns, and the graph of stages over it."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ParamSpec, TypeVar

import attrs

from ._retention import Retention, check_retention
from ._stage import FanIn, FunctionStage, Retry, Stage, check_name, stage
from .errors import ConfigurationError, StageDeclarationError

P = ParamSpec("P")
R = TypeVar("R")

PIPELINE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")
#: rows and groups are announced on this many channels of a pipeline, by a hash of their key
#: (``hashtext(key) & (PARTITIONS - 1)``), so that a worker hears only the keys it owns
PARTITIONS = 64


def _sql_name(kind: str) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def check(_instance: Any, _attribute: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, str) or not value or "\x00" in value or len(value.encode()) > 63:
            raise ConfigurationError(
                f"{kind} must be a non-empty name of at most 63 bytes, got {value!r}"
            )

    return check


@attrs.frozen(kw_only=True)
class Statuses:
    """The values the status column takes. Defaults follow the common convention."""

    done: str = "done"
    running: str = "running"
    failed: str = "failed"

    def __attrs_post_init__(self) -> None:
        values = (self.done, self.running, self.failed)
        if len(set(values)) != 3 or not all(isinstance(v, str) and v for v in values):
            raise ConfigurationError(f"status values must be three distinct strings: {values}")


@attrs.frozen(kw_only=True)
class TableSpec:
    """Where a pipeline's rows live and which columns carry their state."""

    table: str = attrs.field(validator=_sql_name("table"))
    schema: str = attrs.field(default="public", validator=_sql_name("schema"))
    key: str = attrs.field(default="id", validator=_sql_name("key column"))
    step_column: str = attrs.field(default="current_step", validator=_sql_name("step column"))
    status_column: str = attrs.field(default="status", validator=_sql_name("status column"))
    group_column: str | None = attrs.field(default=None)
    #: a column of the member rows holding how many members their group has
    group_size_column: str | None = attrs.field(default=None)
    extra_columns: tuple[str, ...] = attrs.field(default=())
    statuses: Statuses = Statuses()

    @group_column.validator
    def _check_group(self, attribute: attrs.Attribute[Any], value: str | None) -> None:
        if value is not None:
            _sql_name("group column")(self, attribute, value)

    @group_size_column.validator
    def _check_group_size(self, attribute: attrs.Attribute[Any], value: str | None) -> None:
        if value is not None:
            _sql_name("group size column")(self, attribute, value)
            if self.group_column is None:
                raise ConfigurationError("group_size_column needs group_column to be set")

    @extra_columns.validator
    def _check_extras(self, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
        for column in value:
            _sql_name("extra column")(self, attribute, column)
        if len(set(value)) != len(value):
            raise ConfigurationError(f"extra columns are listed twice: {value}")

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the pipeline reads, each once."""
        named = [self.key, self.step_column, self.status_column, self.group_column]
        named.append(self.group_size_column)
        named += list(self.extra_columns)
        return tuple(dict.fromkeys(c for c in named if c is not None))


class Pipeline:
    """A named chain of stages over one table of the user's.

    ``start`` names the steps that something outside the pipeline sets to done (the
    seed's ``img_gen``); every stage must lead back to one of them.

    ``group_size_column`` names a column of the member rows that holds how many members
    their group has: a group then never forms before that many members exist, even when
    they are inserted one by one and the first finishes before the last is inserted.

    ``retention`` (a :class:`Retention`) lets the workers delete finished runs older than
    a window; without it the run ledger keeps every run.

    >>> pipeline = Pipeline("ads", table="jobs_variants", key="job_variants_id",
    ...                     group_column="job_id", start="img_gen")
    >>> @pipeline.stage(after="img_gen")
    ... async def vlm_analyze(ctx): ...
    """

    def __init__(
        self,
        name: str,
        *,
        table: str,
        start: str | Iterable[str],
        schema: str = "public",
        key: str = "id",
        step_column: str = "current_step",
        status_column: str = "status",
        group_column: str | None = None,
        group_size_column: str | None = None,
        extra_columns: Iterable[str] = (),
        statuses: Statuses | None = None,
        stages: Iterable[Stage] = (),
        retention: Retention | None = None,
    ) -> None:
        if not isinstance(name, str) or not PIPELINE_NAME.match(name):
            raise ConfigurationError(
                f"pipeline name must match {PIPELINE_NAME.pattern} (got {name!r})"
            )
        self.name = name
        #: how long finished runs are kept (None: for ever); see :class:`Retention`
        self.retention = check_retention(retention)
        self.table = TableSpec(
            table=table,
            schema=schema,
            key=key,
            step_column=step_column,
            status_column=status_column,
            group_column=group_column,
            group_size_column=group_size_column,
            extra_columns=tuple(extra_columns),
            statuses=statuses or Statuses(),
        )
        starts: tuple[str, ...] = (
            (start,) if isinstance(start, str) else tuple(str(s) for s in start)
        )
        if not starts:
            raise ConfigurationError(f"pipeline {name!r} needs at least one start step")
        self.start_steps = tuple(check_name("start step", s) for s in starts)
        self._stages: dict[str, Stage] = {}
        self._successors: dict[str, Stage] = {}
        for each in stages:
            self.add(each)

    @property
    def channel(self) -> str:
        """The LISTEN/NOTIFY channel of this pipeline: workers joining and leaving, retries
        due, slots freed."""
        return f"pgstagechain_{self.name}"

    def partition_channel(self, partition: int) -> str:
        """The channel on which rows and groups whose key hashes to ``partition`` are
        announced when they reach a stage's done state."""
        return f"{self.channel}.{partition}"

    @property
    def partition_channels(self) -> tuple[str, ...]:
        return tuple(self.partition_channel(p) for p in range(PARTITIONS))

    @property
    def stages(self) -> tuple[Stage, ...]:
        return tuple(self._stages.values())

    def __iter__(self) -> Iterator[Stage]:
        return iter(self._stages.values())

    def __getitem__(self, name: str) -> Stage:
        try:
            return self._stages[name]
        except KeyError:
            raise KeyError(f"pipeline {self.name!r} has no stage {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._stages

    def add(self, new: Stage) -> Stage:
        """Register ``new``; reject a name or predecessor already taken."""
        if not isinstance(new, Stage):
            raise StageDeclarationError(str(new), "only Stage instances can be added")
        if new.name in self._stages:
            raise StageDeclarationError(new.name, "a stage of this name is already registered")
        if new.name in self.start_steps:
            raise StageDeclarationError(new.name, "a stage cannot share its name with a start step")
        rival = self._successors.get(new.after)
        if rival is not None:
            raise StageDeclarationError(
                new.name,
                f"step {new.after!r} is already followed by stage {rival.name!r}; "
                "a step has exactly one next stage",
            )
        if new.group and self.table.group_column is None:
            raise StageDeclarationError(
                new.name, "a group stage needs the pipeline's group_column to be set"
            )
        self._stages[new.name] = new
        self._successors[new.after] = new
        return new

    def stage(
        self,
        *,
        after: str,
        name: str | None = None,
        group: bool = False,
        retry: Retry | None = None,
        timeout: float | None = None,
        concurrency: int | None = None,
        connection: bool = True,
        fan_in: FanIn | None = None,
        max_running: int | None = None,
        max_per_second: float | None = None,
        burst: float | None = None,
    ) -> Callable[[Callable[P, R]], FunctionStage[P, R]]:
        """Decorator: make a stage of a function and register it here."""
        make = stage(
            after=after,
            name=name,
            group=group,
            retry=retry,
            timeout=timeout,
            concurrency=concurrency,
            connection=connection,
            fan_in=fan_in,
            max_running=max_running,
            max_per_second=max_per_second,
            burst=burst,
        )

        def decorate(func: Callable[P, R]) -> FunctionStage[P, R]:
            made = make(func)
            self.add(made)
            return made

        return decorate

    def next_stage(self, step: str) -> Stage | None:
        """The stage that runs when a row (or group) reaches ``(step, done)``."""
        return self._successors.get(step)

    def is_group_step(self, step: str) -> bool:
        """True when ``step`` is a group stage (its state lives in the group table)."""
        found = self._stages.get(step)
        return found is not None and found.group

    def fan_in_steps(self) -> tuple[str, ...]:
        """Row-level steps whose next stage is a group stage."""
        return tuple(s.after for s in self if s.group and not self.is_group_step(s.after))

    def fan_in_of(self) -> dict[str, Stage]:
        """Each row step (start steps included) whose chain leads to a group stage, with that
        group stage: the stage whose group its rows are members of."""
        found: dict[str, Stage] = {}
        for step in (*self.start_steps, *(s.name for s in self if not s.group)):
            current = step
            seen = {current}
            while (following := self.next_stage(current)) is not None and not following.group:
                current = following.name
                if current in seen:
                    break
                seen.add(current)
            if following is not None and following.group:
                found[step] = following
        return found

    def validate(self) -> None:
        """Check the whole graph; raise :class:`StageDeclarationError` naming the culprit."""
        if not self._stages:
            raise ConfigurationError(f"pipeline {self.name!r} has no stages")
        for each in self:
            if each.after not in self._stages and each.after not in self.start_steps:
                raise StageDeclarationError(
                    each.name,
                    f"follows unknown step {each.after!r} "
                    f"(known: stages {sorted(self._stages)}, start steps {list(self.start_steps)})",
                )
            if not each.group and self.is_group_step(each.after):
                raise StageDeclarationError(
                    each.name,
                    f"a row stage cannot follow group stage {each.after!r} (fan-out is not supported)",
                )
            if self.is_group_step(each.after) and each.fan_in is not FanIn.ALL_DONE:
                raise StageDeclarationError(
                    each.name,
                    f"fan_in={each.fan_in.name} belongs on the first group stage of the chain; "
                    f"{each.name!r} follows group stage {each.after!r}",
                )
        for each in self:
            seen = [each.name]
            step = each.after
            while step not in self.start_steps:
                if step in seen:
                    cycle = " -> ".join([*reversed(seen), step])
                    raise StageDeclarationError(each.name, f"stages form a cycle: {cycle}")
                seen.append(step)
                step = self._stages[step].after

    def __repr__(self) -> str:
        return f"<Pipeline {self.name!r} on {self.table.schema}.{self.table.table}: {len(self._stages)} stages>"
