"""Cluster-wide stage limits: what the code declares, written to the database and read
back from it.

The database holds the limits every claim obeys (``pgstagechain.stage_limits`` and its
slots); they are written from the code when a pipeline is installed and when a worker
starts. Workers whose code declares other values (a rolling deploy) obey the database's
and say so in their log.
"""

from __future__ import annotations

from typing import Any

import attrs
from psycopg import AsyncConnection

from ._pipeline import Pipeline
from ._sql import plain

#: the schema version that brought the limits' tables
LIMITS_VERSION = 5


@attrs.frozen
class StageLimit:
    """One stage's limits: live runs at once, and a token bucket (rate, size)."""

    max_running: int | None = None
    max_per_second: float | None = None
    burst: float | None = None

    @property
    def slotted(self) -> bool:
        return self.max_running is not None

    def describe(self) -> str:
        parts = []
        if self.max_running is not None:
            parts.append(f"max_running={self.max_running}")
        if self.max_per_second is not None:
            parts.append(f"max_per_second={self.max_per_second:g} (burst {self.burst:g})")
        return ", ".join(parts) or "no limit"


def declared_limits(pipeline: Pipeline) -> dict[str, StageLimit]:
    """The limits the code declares, by stage (stages without limits left out)."""
    return {
        s.name: StageLimit(s.max_running, s.max_per_second, s.rate_burst)
        for s in pipeline
        if s.limited
    }


async def write_limits(conn: AsyncConnection[Any], pipeline: Pipeline) -> None:
    """Make the database's limits of ``pipeline`` the declared ones (no write when equal)."""
    declared = declared_limits(pipeline)
    await conn.execute(
        plain("write_limits"),
        {
            "pipeline": pipeline.name,
            "stages": list(declared),
            "max_running": [d.max_running for d in declared.values()],
            "max_per_second": [d.max_per_second for d in declared.values()],
            "burst": [d.burst for d in declared.values()],
        },
    )


async def read_limits(conn: AsyncConnection[Any], pipeline: Pipeline) -> dict[str, StageLimit]:
    """The limits the database holds for ``pipeline``, by stage."""
    cur = await conn.execute(plain("read_limits"), {"pipeline": pipeline.name})
    return {
        stage: StageLimit(running, rate, burst)
        for stage, running, rate, burst in await cur.fetchall()
    }


def differences(declared: dict[str, StageLimit], found: dict[str, StageLimit]) -> list[str]:
    """One line per stage whose limits in the database differ from the declared ones."""
    return [
        f"stage {stage!r}: database has {found.get(stage, StageLimit()).describe()}, "
        f"this worker's code declares {declared.get(stage, StageLimit()).describe()}"
        for stage in sorted(set(declared) | set(found))
        if declared.get(stage) != found.get(stage)
    ]
