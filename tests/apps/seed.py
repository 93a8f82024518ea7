"""The seed's tables and the shape of its pipeline, shared by the tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg

from pgstagechain import Pipeline, Retry

ROW_STAGES = [
    "vlm_analyze",
    "yolo_detect",
    "planner",
    "overlay",
    "vlm_judge",
    "ocr_eval",
    "readability_eval",
    "iou_eval",
]
GROUP_STAGES = ["ad_copy_gen_kor", "instagram_feed_gen"]

TABLES = """
CREATE TABLE jobs (
    job_id bigint PRIMARY KEY,
    tenant_id text NOT NULL,
    current_step text,
    status text
);
CREATE TABLE jobs_variants (
    job_variants_id bigint PRIMARY KEY,
    job_id bigint NOT NULL REFERENCES jobs,
    img_asset_id text NOT NULL,
    tenant_id text NOT NULL,
    current_step text NOT NULL DEFAULT 'img_gen',
    status text NOT NULL DEFAULT 'running',
    updated_at timestamptz NOT NULL DEFAULT now()
);
"""


def create_tables(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(TABLES)


def add_jobs(
    dsn: str, jobs: int, variants: int, *, first_job: int = 1, release: bool = True
) -> list[int]:
    """Insert jobs and their variants; with ``release`` set every variant to (img_gen, done)."""
    status = "done" if release else "running"
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        job_ids = list(range(first_job, first_job + jobs))
        conn.execute(
            "INSERT INTO jobs (job_id, tenant_id, current_step, status)"
            " SELECT j, 'tenant-' || (j %% 3), 'img_gen', 'running' FROM unnest(%s::bigint[]) j",
            (job_ids,),
        )
        conn.execute(
            "INSERT INTO jobs_variants (job_variants_id, job_id, img_asset_id, tenant_id, current_step, status)"
            " SELECT j * 100 + v, j, 'asset-' || j || '-' || v, 'tenant-' || (j %% 3), 'img_gen', %s"
            " FROM unnest(%s::bigint[]) j, generate_series(1, %s) v",
            (status, job_ids, variants),
        )
    return job_ids


def seed_pipeline(
    handler: Callable[[Any], Any],
    group_handler: Callable[[Any], Any] | None = None,
    *,
    name: str = "feedly",
    retry: Retry | None = None,
) -> Pipeline:
    """The seed's ten stages, every one running ``handler`` (group stages ``group_handler``)."""
    pipeline = Pipeline(
        name,
        table="jobs_variants",
        key="job_variants_id",
        group_column="job_id",
        extra_columns=["tenant_id", "img_asset_id"],
        start="img_gen",
    )
    previous = "img_gen"
    for stage_name in ROW_STAGES:
        pipeline.stage(after=previous, name=stage_name, retry=retry)(handler)
        previous = stage_name
    for stage_name in GROUP_STAGES:
        pipeline.stage(after=previous, name=stage_name, group=True, retry=retry)(
            group_handler or handler
        )
        previous = stage_name
    return pipeline
