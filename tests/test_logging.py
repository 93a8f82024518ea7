"""Structured logs: every record about a run carries the run's identity."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from typing import Any

import pytest

from pgstagechain import Worker, migrate
from pgstagechain._logging import JsonFormatter
from tests.seed import add_jobs, create_tables, seed_pipeline

pytestmark = pytest.mark.anyio


async def test_handler_and_failure_records_are_json_with_the_run(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)

    async def handler(ctx: Any) -> None:
        ctx.log.info("looking at %s", ctx.row["img_asset_id"])
        if ctx.stage == "yolo_detect":
            raise RuntimeError("no boxes")

    pipeline = seed_pipeline(handler)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=1)
    out = io.StringIO()
    sink = logging.StreamHandler(out)
    sink.setFormatter(JsonFormatter())
    root = logging.getLogger("pgstagechain")
    root.addHandler(sink)
    root.setLevel(logging.INFO)
    try:
        await Worker(pipeline, pgstagechain_dsn, scan_interval=1).run_until_idle()
    finally:
        root.removeHandler(sink)
        root.setLevel(logging.NOTSET)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    said = [r for r in records if r["message"] == "looking at asset-1-1"]
    assert [(r["stage"], r["key"], r["attempt"]) for r in said] == [
        ("vlm_analyze", "101", 1),
        ("yolo_detect", "101", 1),
    ]
    [failure] = [r for r in records if r["level"] == "ERROR"]
    assert failure["stage"] == "yolo_detect" and failure["key"] == "101"
    assert failure["pipeline"] == "feedly" and "no boxes" in failure["message"]


def test_cli_json_logs_never_show_the_password() -> None:
    shown = subprocess.run(
        [
            sys.executable,
            "-m",
            "pgstagechain",
            "--log-format",
            "json",
            "--dsn",
            "host=127.0.0.1 port=1 user=u password=s3cret dbname=x connect_timeout=2",
            "recover",
            "tests.cli_app:pipeline",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 2
    assert "s3cret" not in shown.stdout + shown.stderr
    assert shown.stderr.startswith("error: connection failed")
    assert "password=***" in shown.stderr
