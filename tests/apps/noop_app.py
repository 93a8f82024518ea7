"""The seed's ten-stage shape with no-op handlers, for worker subprocesses in tests."""

from __future__ import annotations

from typing import Any

from tests.apps.seed import seed_pipeline


async def noop(ctx: Any) -> None:
    return None


pipeline = seed_pipeline(noop)
