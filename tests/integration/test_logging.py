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
from tests.apps.seed import add_jobs, create_tables, seed_pipeline

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
            "tests.apps.cli_app:pipeline",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 2
    assert "s3cret" not in shown.stdout + shown.stderr
    assert shown.stderr.startswith("error: connection failed")
    assert "password=***" in shown.stderr


def test_library_loggers_leave_output_to_the_host() -> None:
    """No handler, level or propagation of its own: the host's configuration decides."""
    import pgstagechain.cli
    import pgstagechain.contrib.django.management.commands.pgstagechain_worker
    import pgstagechain.contrib.fastapi
    import pgstagechain.http  # noqa: F401

    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "pgstagechain"]
    assert {"pgstagechain.worker", "pgstagechain.listener", "pgstagechain.http"} <= set(names)
    for name in names:
        logger = logging.getLogger(name)
        assert logger.handlers == [] and logger.propagate, name
        assert logger.level == logging.NOTSET, name


def test_uvicorn_with_the_example_log_config_shows_the_librarys_info(
    pgstagechain_dsn: str,
) -> None:
    import os
    import signal
    import time

    import anyio

    from tests.apps import web_app
    from tests.helpers import free_port

    web_app.create_table(pgstagechain_dsn)
    anyio.run(migrate, pgstagechain_dsn, web_app.pipeline)
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "tests.apps.web_app:app",
        "--port",
        str(free_port()),
    ]
    command += ["--log-config", "examples/fastapi_app/log_config.json"]
    env = {**os.environ, "PGSTAGECHAIN_DSN": pgstagechain_dsn}
    with subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) as process:
        assert process.stderr is not None
        seen = ""
        deadline = time.monotonic() + 60
        while "Application startup complete" not in seen:
            line = process.stderr.readline()
            assert line and time.monotonic() < deadline, seen
            seen += line
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=60)
    started = [line for line in seen.splitlines() if "started worker" in line]
    assert len(started) == 1, seen
    # time, level and logger name, as the host's format says
    assert " INFO pgstagechain.contrib: started worker " in started[0]
    assert started[0][:4].isdigit()
    assert "INFO pgstagechain.contrib: worker " in rest and "drained" in rest
