"""A small web app embedding a worker, as a user would write it, for tests that run it
under a real uvicorn (in a thread or as a subprocess).

Configured from the environment: ``PGSTAGECHAIN_DSN``, ``WEB_APP_STARTUP_TIMEOUT``.
"""

from __future__ import annotations

import os
from typing import Any

import psycopg
from fastapi import Depends, FastAPI, Header, HTTPException

from pgstagechain import Pipeline
from pgstagechain.contrib.fastapi import status_router, worker_lifespan

TOKEN = "s3cret-admin-token"
TABLE = """
CREATE TABLE orders (
    id bigint PRIMARY KEY,
    step text NOT NULL DEFAULT 'new',
    status text NOT NULL DEFAULT 'done',
    charged_at timestamptz
);
"""

pipeline = Pipeline("orders", table="orders", key="id", step_column="step", start="new")


@pipeline.stage(after="new")
async def charge(ctx: Any) -> dict[str, Any]:
    await ctx.conn.execute("UPDATE orders SET charged_at = now() WHERE id = %s", (ctx.key,))
    return {"charged": ctx.key}


@pipeline.stage(after="charge")
def ship(ctx: Any) -> str:
    return f"shipped {ctx.key}"


def create_table(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(TABLE)


async def require_admin(authorization: str = Header(default="")) -> None:
    """The app's own check: a bearer token here, a session or an OAuth scope in real life."""
    if authorization != f"Bearer {TOKEN}":
        raise HTTPException(401, "not authenticated", headers={"WWW-Authenticate": "Bearer"})


def build(dsn: str | None = None, **worker_options: Any) -> FastAPI:
    startup = os.environ.get("WEB_APP_STARTUP_TIMEOUT")
    if startup:
        worker_options.setdefault("startup_timeout", float(startup))
    app = FastAPI(lifespan=worker_lifespan(pipeline, dsn, **worker_options))
    app.include_router(
        status_router(pipeline, dsn, dependencies=[Depends(require_admin)], manual=True),
        prefix="/pipelines",
    )

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    return app


app = build()
