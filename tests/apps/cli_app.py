"""The seed's pipeline for the command-line tests: ``python -m pgstagechain ... tests.apps.cli_app:pipeline``.

A row whose ``img_asset_id`` starts with ``bad`` fails at ``overlay`` for good; fix the
column and ``retry`` it to see it through.
"""

from __future__ import annotations

from typing import Any

from pgstagechain import PermanentError
from tests.apps.seed import seed_pipeline


async def handler(ctx: Any) -> dict[str, Any]:
    if ctx.stage == "overlay" and str(ctx.row.get("img_asset_id", "")).startswith("bad"):
        raise PermanentError(f"cannot overlay {ctx.row['img_asset_id']}: unreadable image")
    return {"stage": ctx.stage, "key": str(ctx.key)}


pipeline = seed_pipeline(handler)
