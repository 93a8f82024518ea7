"""Stages: what runs after which step, and how it is retried.

A stage is either a subclass of :class:`Stage` overriding ``run`` or a function
decorated with :func:`stage`. ``run`` may be ``async def`` (runs on the event loop)
or a plain ``def`` (runs in a worker thread so it never blocks the loop).
"""

from __future__ import annotations

import enum
import functools
import inspect
import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

import attrs

from .errors import StageDeclarationError

if TYPE_CHECKING:
    from ._context import StageContext

P = ParamSpec("P")
R = TypeVar("R")

NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def check_name(kind: str, name: object) -> str:
    """Return ``name`` if it is a plain identifier, else raise a typed error naming it."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise StageDeclarationError(
            str(name), f"{kind} name must match {NAME_PATTERN.pattern} (got {name!r})"
        )
    return name


@attrs.frozen(kw_only=True)
class Retry:
    """How often a failed stage is tried again, and how long to wait in between.

    The delay before attempt ``n + 1`` is ``min(max_delay, base_delay * 2 ** (n - 1))``
    with full jitter, so retries of many rows do not arrive in lock step.
    """

    max_attempts: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    base_delay: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    max_delay: float = attrs.field(default=60.0, validator=attrs.validators.ge(0))

    def delay(self, attempt: int, jitter: float) -> float:
        """Seconds to wait after failed ``attempt``; ``jitter`` is a number in [0, 1)."""
        ceiling = min(self.max_delay, self.base_delay * 2.0 ** max(0, attempt - 1))
        return float(ceiling * (0.5 + jitter / 2))


NO_RETRY = Retry()


class FanIn(enum.Enum):
    """When a group stage's group forms from its members (the rows of one group).

    A member *fails for good* when it lands on ``(stage, failed)``: its attempts are used
    up, it raised :class:`~pgstagechain.PermanentError`, or an operator cancelled it.
    """

    #: Wait until every member is done at the step the group stage follows (the default).
    #: A group with a member failed for good waits for an operator, and ``status`` shows it
    #: as stalled, with the member's error.
    ALL_DONE = "all_done"
    #: Proceed once every member is done or failed for good, with at least one done; the
    #: handler gets the done ones in ``ctx.members`` and the failed ones, with their stage
    #: and error, in ``ctx.failed_members``. When every member failed, the group fails.
    SETTLED = "settled"
    #: Fail the group as soon as one member fails for good, with that member's error as
    #: the reason; otherwise as ``ALL_DONE``.
    FAIL_FAST = "fail_fast"


class Stage:
    """One step of a pipeline. Subclass it and override :meth:`run`, or use :func:`stage`.

    Class attributes give the defaults; keyword arguments to the constructor override them::

        class Overlay(Stage):
            after = "planner"

            async def run(self, ctx): ...

    ``name`` defaults to the class name in snake case.
    """

    name: str = ""
    after: str = ""
    group: bool = False
    retry: Retry = NO_RETRY
    timeout: float | None = None
    concurrency: int | None = None
    #: for the first group stage of a chain: when its group forms (see :class:`FanIn`)
    fan_in: FanIn = FanIn.ALL_DONE
    #: False for stages that never write to the database (``ctx.conn`` is then None). With
    #: True, ``ctx.conn`` is checked out on the handler's first read of it; a handler that
    #: never reads it is completed in a batch all the same.
    connection: bool = True
    #: the most live runs of this stage at once, over every worker on every machine
    #: (None: no limit beyond each worker's own concurrency)
    max_running: int | None = None
    #: the most runs started per second, over every worker (a token bucket in the database)
    max_per_second: float | None = None
    #: how many runs may start at once after a quiet spell (the bucket's size); default
    #: ``max(1, max_per_second / 10)``, so any one second sees at most 1.1 x the rate
    burst: float | None = None

    def __init__(
        self,
        *,
        name: str | None = None,
        after: str | None = None,
        group: bool | None = None,
        retry: Retry | None = None,
        timeout: float | None = None,
        concurrency: int | None = None,
        connection: bool | None = None,
        fan_in: FanIn | None = None,
        max_running: int | None = None,
        max_per_second: float | None = None,
        burst: float | None = None,
    ) -> None:
        self.name = check_name("stage", name or self.name or _snake(type(self).__name__))
        self.after = check_name("predecessor step", after or self.after)
        if self.after == self.name:
            raise StageDeclarationError(self.name, "a stage cannot follow itself")
        if group is not None:
            self.group = group
        if retry is not None:
            self.retry = retry
        if timeout is not None:
            self.timeout = timeout
        if self.timeout is not None and self.timeout <= 0:
            raise StageDeclarationError(self.name, f"timeout must be positive, got {self.timeout}")
        if concurrency is not None:
            self.concurrency = concurrency
        if self.concurrency is not None and self.concurrency < 1:
            raise StageDeclarationError(
                self.name, f"concurrency must be at least 1, got {self.concurrency}"
            )
        if connection is not None:
            self.connection = connection
        if fan_in is not None:
            self.fan_in = fan_in
        if not isinstance(self.fan_in, FanIn):
            raise StageDeclarationError(
                self.name,
                f"fan_in must be a FanIn (one of {[p.name for p in FanIn]}), got {self.fan_in!r}",
            )
        if self.fan_in is not FanIn.ALL_DONE and not self.group:
            raise StageDeclarationError(
                self.name, f"fan_in={self.fan_in.name} applies to group stages only (group=True)"
            )
        if max_running is not None:
            self.max_running = max_running
        if max_per_second is not None:
            self.max_per_second = max_per_second
        if burst is not None:
            self.burst = burst
        self._check_limits()
        if type(self).run is Stage.run and not isinstance(self, FunctionStage):
            raise StageDeclarationError(self.name, "a Stage subclass must override run()")

    def _check_limits(self) -> None:
        running, rate, burst = self.max_running, self.max_per_second, self.burst
        if running is not None and (
            isinstance(running, bool) or not isinstance(running, int) or running < 1
        ):
            raise StageDeclarationError(
                self.name, f"max_running must be a positive integer or None, got {running!r}"
            )
        if rate is not None and not _positive_number(rate):
            raise StageDeclarationError(
                self.name, f"max_per_second must be a positive number or None, got {rate!r}"
            )
        if burst is not None:
            if rate is None:
                raise StageDeclarationError(self.name, "burst applies only with max_per_second")
            if not _positive_number(burst) or burst < 1:
                raise StageDeclarationError(
                    self.name, f"burst must be a number of at least 1, got {burst!r}"
                )

    @property
    def rate_burst(self) -> float | None:
        """The token bucket's size: ``burst``, else ``max(1, max_per_second / 10)``."""
        if self.max_per_second is None:
            return None
        return float(self.burst if self.burst is not None else max(1.0, self.max_per_second / 10))

    @property
    def limited(self) -> bool:
        """True when the stage has a cluster-wide limit (``max_running`` or a rate)."""
        return self.max_running is not None or self.max_per_second is not None

    @functools.cached_property
    def is_async(self) -> bool:
        """True when ``run`` is a coroutine function (it then runs on the event loop); asked
        for every run, so looked up once."""
        return inspect.iscoroutinefunction(self.run)

    def run(self, ctx: StageContext[Any]) -> Any:
        """Do the stage's work for one row (or one group) and return a small JSON-able result."""
        raise NotImplementedError

    def __repr__(self) -> str:
        level = "group" if self.group else "row"
        return f"<{type(self).__name__} {self.name!r} after {self.after!r} ({level})>"


class FunctionStage(Stage, Generic[P, R]):
    """A stage made from a function by :func:`stage`; calling it calls the function."""

    def __init__(self, func: Callable[P, R], **options: Any) -> None:
        self.func = func
        super().__init__(name=options.pop("name", None) or func.__name__, **options)
        functools.update_wrapper(self, func)

    @functools.cached_property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.func)

    def run(self, ctx: StageContext[Any]) -> Any:
        return self.func(ctx)  # type: ignore[arg-type, call-arg]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.func(*args, **kwargs)


def stage(
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
    """Turn a function ``(ctx) -> result`` into a :class:`Stage` that runs after step ``after``.

    ``max_running`` and ``max_per_second`` (with ``burst``) limit the stage over every
    worker at once; the database enforces them (see "Stage limits" in the operations guide).
    The function may be ``async def`` or a plain ``def``. Register the result with
    ``Pipeline(stages=[...])`` or :meth:`Pipeline.add`, or use :meth:`Pipeline.stage`,
    which does both.
    """

    def decorate(func: Callable[P, R]) -> FunctionStage[P, R]:
        if not callable(func):
            raise StageDeclarationError(str(name), f"@stage needs a function, got {func!r}")
        return FunctionStage(
            func,
            name=name,
            after=after,
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

    return decorate


def _positive_number(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()
