"""A FastAPI app that runs the seed's chain with HTTP stages and its own workers.

The stages are HTTP services (here: routes of this same app under /models, standing in
for the model servers); the worker runs inside the app and drains on shutdown.

    export PGSTAGECHAIN_DSN="dbname=example" ADMIN_TOKEN="$(openssl rand -hex 16)"
    pgstagechain migrate examples.fastapi_app.app:pipeline   # once: schema and trigger
    uvicorn examples.fastapi_app.app:app --port 8000
    curl -X POST localhost:8000/jobs -H 'content-type: application/json' -d '{"job_id": 1}'
    curl localhost:8000/pipelines/feedly -H "Authorization: Bearer $ADMIN_TOKEN"
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from fastapi import Depends, FastAPI, Header, HTTPException
from pydantic import BaseModel

from pgstagechain import Pipeline, Retry, StageContext
from pgstagechain.contrib.fastapi import status_router, worker_lifespan
from pgstagechain.http import HttpStage

DSN = os.environ.get("PGSTAGECHAIN_DSN", "")
MODELS = os.environ.get("MODELS_URL", "http://127.0.0.1:8000/models")
ADMIN_TOKEN = os.environ.get("ADMIN_TOKEN", "")

TABLES = """
CREATE TABLE IF NOT EXISTS jobs (job_id bigint PRIMARY KEY, tenant_id text NOT NULL);
CREATE TABLE IF NOT EXISTS jobs_variants (
    job_variants_id bigint PRIMARY KEY,
    job_id bigint NOT NULL REFERENCES jobs,
    tenant_id text NOT NULL,
    current_step text NOT NULL DEFAULT 'img_gen',
    status text NOT NULL DEFAULT 'running'
);
"""

pipeline = Pipeline(
    "feedly",
    table="jobs_variants",
    key="job_variants_id",
    group_column="job_id",
    extra_columns=["tenant_id"],
    start="img_gen",
)
seed_fields = {"key_field": "job_variants_id", "group_field": "job_id"}
retry = Retry(max_attempts=5, base_delay=2.0)


def with_overlay(ctx: StageContext[Any]) -> dict[str, Any]:
    return {"overlay_id": ctx.results["overlay"]["overlay_id"]}


pipeline.add(
    HttpStage(
        name="vlm_analyze", after="img_gen", url=f"{MODELS}/vlm_analyze", retry=retry, **seed_fields
    )
)
pipeline.add(
    HttpStage(
        name="overlay", after="vlm_analyze", url=f"{MODELS}/overlay", retry=retry, **seed_fields
    )
)
pipeline.add(
    HttpStage(
        name="vlm_judge",
        after="overlay",
        url=f"{MODELS}/vlm_judge",
        payload=with_overlay,
        retry=retry,
        **seed_fields,
    )
)
pipeline.add(
    HttpStage(
        name="instagram_feed_gen",
        after="vlm_judge",
        group=True,
        url=f"{MODELS}/instagram_feed_gen",
        retry=retry,
        **seed_fields,
    )
)


@asynccontextmanager
async def own_lifespan(app: FastAPI) -> AsyncIterator[None]:
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(TABLES)
    yield


# migrate=True installs the schema and trigger at startup: convenient here; in production
# run `pgstagechain migrate` in the deploy step instead. single=True runs the worker in one
# process only under `uvicorn --workers N` (the others hold one connection each, ready to
# take over); PGSTAGECHAIN_WORKER_ENABLED=0 turns it off altogether for a replica.
# pool_size=2: HTTP stages need no connection of their own, so the worker holds at most
# 4 + 2 + 2 = 8 (Worker.max_connections).
app = FastAPI(
    lifespan=worker_lifespan(
        pipeline,
        DSN,
        lifespan=own_lifespan,
        migrate=True,
        single=True,
        concurrency=20,
        pool_size=2,
        startup_timeout=30,
    )
)


async def require_admin(authorization: str = Header(default="")) -> None:
    """Your app's own check goes here (a session, an OAuth scope); this demo takes a token.
    Without ADMIN_TOKEN set, nobody gets in."""
    expected = f"Bearer {ADMIN_TOKEN}"
    if not ADMIN_TOKEN or not secrets.compare_digest(authorization, expected):
        raise HTTPException(401, "not authenticated", headers={"WWW-Authenticate": "Bearer"})


# The status routes and the manual run route are admin routes: every one of them runs
# require_admin first. manual=True refuses to be set up without such a dependency.
app.include_router(
    status_router(pipeline, DSN, manual=True, dependencies=[Depends(require_admin)]),
    prefix="/pipelines",
)


class NewJob(BaseModel):
    job_id: int
    tenant_id: str = "demo"
    variants: int = 3


@app.post("/jobs", status_code=201)
def create_job(job: NewJob) -> dict[str, Any]:
    # Insert the job and release its variants at (img_gen, done) in one transaction:
    # the trigger's notification goes out when it commits.
    with psycopg.connect(DSN) as conn:
        conn.execute("INSERT INTO jobs VALUES (%s, %s)", (job.job_id, job.tenant_id))
        conn.execute(
            "INSERT INTO jobs_variants (job_variants_id, job_id, tenant_id, status)"
            " SELECT %s * 100 + n, %s, %s, 'done' FROM generate_series(1, %s) n",
            (job.job_id, job.job_id, job.tenant_id, job.variants),
        )
    return {"job_id": job.job_id, "variants": job.variants}


# Stand-ins for the model services the stages call.
@app.post("/models/{stage}")
def model(stage: str, body: dict[str, Any]) -> dict[str, Any]:
    answer: dict[str, Any] = {"stage": stage, "received": body}
    if stage == "overlay":
        answer["overlay_id"] = f"ov-{body['job_variants_id']}"
    return answer
