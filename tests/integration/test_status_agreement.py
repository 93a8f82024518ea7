"""One database state, three readers: ``pgstagechain status --json``, the FastAPI status
router and the Feedly app's progress figures all show the numbers of
:func:`pgstagechain.admin.status`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI

from examples.feedly import app as feedly
from examples.feedly.pipeline import pipeline
from pgstagechain import admin, claim, complete, fail
from pgstagechain.contrib.fastapi import status_router

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
FEEDLY = "examples.feedly.pipeline:pipeline"


def sql(dsn: str, statement: str, params: Any = None) -> list[Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def new_job(dsn: str, variants: int) -> tuple[int, list[int]]:
    """A job and its variants at (img_gen, running), as the image generator leaves them."""
    ((job,),) = sql(
        dsn,
        "INSERT INTO jobs (tenant_id, ad_copy, out_dir) VALUES ('t', 'copy', '/tmp')"
        " RETURNING job_id",
    )
    keys = []
    for n in range(variants):
        asset = f"{job}-{n}"
        sql(
            dsn,
            "INSERT INTO img_assets (img_asset_id, tenant_id, path) VALUES (%s, 't', '/x.png')",
            (asset,),
        )
        ((key,),) = sql(
            dsn,
            "INSERT INTO jobs_variants (job_id, img_asset_id, tenant_id) VALUES (%s, %s, 't')"
            " RETURNING job_variants_id",
            (job, asset),
        )
        keys.append(key)
    return job, keys


def place(dsn: str, key: int, step: str, status: str = "done") -> None:
    sql(
        dsn,
        "UPDATE jobs_variants SET current_step = %s, status = %s WHERE job_variants_id = %s",
        (step, status, key),
    )


async def build_state(dsn: str) -> list[int]:
    """Rows spread over the stages, a failed row, a retry pending, formed groups."""
    await feedly.prepare(dsn)
    formed, formed_keys = new_job(dsn, 2)  # both variants through: the group forms
    spread, (waiting, broken, retrying) = new_job(dsn, 3)
    live, (running,) = new_job(dsn, 1)
    finished, finished_keys = new_job(dsn, 1)  # its group went on past ad_copy_gen_kor
    for key in (*formed_keys, *finished_keys):
        place(dsn, key, "iou_eval")
    place(dsn, waiting, "planner")
    place(dsn, broken, "planner")
    place(dsn, retrying, "img_gen")
    place(dsn, running, "vlm_analyze")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        got = await claim(conn, pipeline, "overlay", broken)
        assert got is not None
        assert await fail(conn, pipeline, got, "Traceback ...\nOSError: disk full")
        got = await claim(conn, pipeline, "vlm_analyze", retrying)
        assert got is not None
        assert await fail(conn, pipeline, got, "ConnectError: model down", retry_in=600)
        assert await claim(conn, pipeline, "yolo_detect", running, worker_id="w1") is not None
        got = await claim(conn, pipeline, "ad_copy_gen_kor", str(finished))
        assert got is not None
        await complete(conn, pipeline, got, {"copy": "ok"})
    return [formed, spread, live, finished]


def cli_status(dsn: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "pgstagechain", "--dsn", dsn, "status", "--json", FEEDLY],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout)
    return found


async def http_status(dsn: str) -> dict[str, Any]:
    app = FastAPI()
    app.include_router(status_router(pipeline, dsn, cache_seconds=0), prefix="/pipelines")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            reply = await client.get("/pipelines/feedly")
    assert reply.status_code == 200, reply.text
    found: dict[str, Any] = reply.json()
    return found


async def test_cli_router_and_feedly_show_the_same_figures(pgstagechain_dsn: str) -> None:
    job_ids = await build_state(pgstagechain_dsn)
    from_cli = cli_status(pgstagechain_dsn)
    from_http = await http_status(pgstagechain_dsn)
    async with await psycopg.AsyncConnection.connect(pgstagechain_dsn, autocommit=True) as conn:
        snap = await feedly.snapshot(conn, job_ids)
        live = await admin.workers(conn, pipeline)

    # the figures themselves: the definition in pgstagechain.admin, stage by stage
    figures = {
        s["name"]: (s["waiting"], s["running"], s["retrying"], s["done"], s["failed"])
        for s in from_cli["stages"]
    }
    assert figures == {
        "vlm_analyze": (0, 1, 1, 6, 0),
        "yolo_detect": (0, 1, 0, 5, 0),
        "planner": (0, 0, 0, 5, 0),
        "overlay": (1, 0, 0, 3, 1),
        "ocr_eval": (0, 0, 0, 3, 0),
        "vlm_judge": (0, 0, 0, 3, 0),
        "readability_eval": (0, 0, 0, 3, 0),
        "iou_eval": (0, 0, 0, 3, 0),
        "ad_copy_gen_kor": (1, 0, 0, 1, 0),
        "instagram_feed_gen": (1, 0, 0, 0, 0),
    }
    assert from_cli["stages"][0]["runs"]["failed"] == 1  # the attempt with a retry pending

    # the router shows the very same document (without the table's name); only the ages
    # have grown between the two reads
    def counts(found: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {**s, "oldest_waiting_seconds": s["oldest_waiting_seconds"] is not None}
            for s in found["stages"]
        ]

    assert counts(from_http) == counts(from_cli)
    assert from_http["pipeline"] == from_cli["pipeline"] == "feedly"

    # the Feedly app's progress bars
    for stage in from_cli["stages"]:
        name = stage["name"]
        assert (snap.done[name], snap.running[name], snap.failed[name]) == (
            stage["done"],
            stage["running"],
            stage["failed"],
        ), name
    assert not snap.finished(job_ids)  # a row runs, another waits
    assert [(f["level"], f["stage"], f["job_id"]) for f in snap.failures] == [
        ("variant", "overlay", job_ids[1])
    ]
    assert snap.failures[0]["error"].endswith("OSError: disk full")
    assert [(w.worker_id, w.stages) for w in live] == [("w1", ("yolo_detect",))]
