"""The Django example's ``ads`` pipeline with its ``judge`` stage renamed ``assess``: for
the test of ``manage.py pgstagechain_migrate --plan`` and ``--map`` on a changed graph."""

from __future__ import annotations

from typing import Any

from pgstagechain import Pipeline, Retry

pipeline = Pipeline(
    "ads",
    table="jobs_variants",
    key="job_variants_id",
    group_column="job_id",
    extra_columns=["tenant_id"],
    start="img_gen",
)


@pipeline.stage(after="img_gen", retry=Retry(max_attempts=3))
def analyze(ctx: Any) -> None:
    return None


@pipeline.stage(after="analyze")
async def assess(ctx: Any) -> None:
    return None


@pipeline.stage(after="assess", group=True)
async def compose_feed(ctx: Any) -> None:
    return None
