"""The web dashboard in a real headless Chromium, against a real database and a real
worker process: live counts, failures, retry (allowed and refused), hostile text."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from pgstagechain.dashboard import WRITE_HEADER, dashboard_app
from tests.apps import hostile_app
from tests.apps.cli_app import pipeline
from tests.apps.seed import add_jobs, create_tables
from tests.helpers import free_port, uvicorn_serving, wait_for

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN = "dashboard-test-token-0123456789"
BAD_KEY = 101  # its image is unreadable: it fails at overlay for good
HOSTILE_KEYS = ["<script>window.__pwned = 1</script>", '"><img src=x onerror="window.__pwned=2">']

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)"),
]


def install(dsn: str, app: str) -> None:
    """``pgstagechain migrate``: the schema and the pipeline's trigger."""
    subprocess.run(
        [sys.executable, "-m", "pgstagechain", "--dsn", dsn, "migrate", app],
        cwd=ROOT,
        env=dict(os.environ),
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.fixture
def browser() -> Iterator[Any]:
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as p:
        found = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield found
        finally:
            found.close()


@pytest.fixture
def seeded(pgstagechain_dsn: str) -> str:
    """Two jobs of three variants waiting at (img_gen, done); variant 101 is bad."""
    create_tables(pgstagechain_dsn)
    install(pgstagechain_dsn, "tests.apps.cli_app:pipeline")
    add_jobs(pgstagechain_dsn, jobs=2, variants=3, release=False)
    with psycopg.connect(pgstagechain_dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE jobs_variants SET img_asset_id = %s WHERE job_variants_id = %s",
            ('bad<img src=x onerror="window.__pwned=3">', BAD_KEY),
        )
        conn.execute("UPDATE jobs_variants SET status = 'done'")
    return pgstagechain_dsn


@pytest.fixture
def worker_process(seeded: str) -> Iterator[Any]:
    """Start a real worker process on demand; stop it at the end."""
    started: list[subprocess.Popen[str]] = []

    def start(app: str = "tests.apps.cli_app:pipeline") -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "pgstagechain", "--dsn", seeded, "worker", app],
            cwd=ROOT,
            env=dict(os.environ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def position(dsn: str, key: int) -> tuple[str, str]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT current_step, status FROM jobs_variants WHERE job_variants_id = %s", (key,)
        ).fetchone()
    assert row is not None
    return row[0], row[1]


def overlay_runs(dsn: str, key: int) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT state FROM pgstagechain.runs WHERE row_key = %s AND stage = 'overlay'"
            " ORDER BY id",
            (str(key),),
        ).fetchall()
    return [r[0] for r in rows]


def open_page(browser: Any, url: str, stage: str = "vlm_analyze") -> tuple[Any, list[str]]:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector(f'#graph g.node[data-stage="{stage}"]')
    return page, errors


def stage_field(page: Any, stage: str, field: str) -> str:
    return str(
        page.text_content(f'#graph g.node[data-stage="{stage}"] [data-field="{field}"]') or ""
    )


def wait_text(page: Any, stage: str, field: str, wanted: str) -> None:
    wait_for(lambda: stage_field(page, stage, field) == wanted, f"{stage} {field} = {wanted}")


def test_live_counts_failure_and_retry_with_writes_on(
    browser: Any, seeded: str, worker_process: Any
) -> None:
    app = dashboard_app(pipeline, seeded, writes=True, token=TOKEN, cache_seconds=0)
    with uvicorn_serving(app) as (url, _):
        page, errors = open_page(browser, f"{url}/#token={TOKEN}")
        wait_text(page, "vlm_analyze", "waiting", "6")
        assert stage_field(page, "overlay", "failed") == "0"

        worker_process()
        wait_text(page, "vlm_analyze", "waiting", "0")
        wait_text(page, "overlay", "failed", "1")
        row = page.wait_for_selector(f'#failures tbody tr[data-key="{BAD_KEY}"]')
        assert "unreadable image" in (row.text_content() or "")
        # the hostile asset name in the error is text, not markup
        assert 'onerror="window.__pwned=3"' in (row.text_content() or "")
        assert page.query_selector("#failures img") is None
        assert page.evaluate("window.__pwned") is None

        # fix the image and retry from the page: the row runs overlay again and goes on
        with psycopg.connect(seeded, autocommit=True) as conn:
            conn.execute(
                "UPDATE jobs_variants SET img_asset_id = 'fixed' WHERE job_variants_id = %s",
                (BAD_KEY,),
            )
        row.query_selector('button[data-action="retry"]').click()
        wait_for(lambda: position(seeded, BAD_KEY) == ("iou_eval", "done"), "the retried row")
        assert overlay_runs(seeded, BAD_KEY)[-1] == "succeeded"
        wait_text(page, "overlay", "failed", "0")
        assert errors == []


def test_retry_is_refused_when_writes_are_off_or_the_token_is_missing(
    browser: Any, seeded: str, worker_process: Any
) -> None:
    worker_process()
    wait_for(lambda: position(seeded, BAD_KEY) == ("overlay", "failed"), "the failure")
    runs_before = overlay_runs(seeded, BAD_KEY)

    read_only = dashboard_app(pipeline, seeded, cache_seconds=0)
    with uvicorn_serving(read_only) as (url, _):
        page, errors = open_page(browser, url)
        row = page.wait_for_selector(f'#failures tbody tr[data-key="{BAD_KEY}"]')
        assert not row.query_selector('button[data-action="retry"]').is_visible()
        status = page.evaluate(
            """async ([header, key]) => (await fetch("api/retry", {method: "POST",
                headers: {"Content-Type": "application/json", [header]: "1"},
                body: JSON.stringify({key})})).status""",
            [WRITE_HEADER, str(BAD_KEY)],
        )
        assert status == 403
        assert httpx.get(f"{url}/api/retry").status_code == 405  # GET never writes
        assert [e for e in errors if "status of 403" not in e] == []  # only the refusal

    writable = dashboard_app(pipeline, seeded, writes=True, token=TOKEN, cache_seconds=0)
    with uvicorn_serving(writable) as (url, _):
        page, errors = open_page(browser, url)  # no token given to the page
        row = page.wait_for_selector(f'#failures tbody tr[data-key="{BAD_KEY}"]')
        with page.expect_response(lambda r: r.url.endswith("/api/retry")) as answer:
            row.query_selector('button[data-action="retry"]').click()
        assert answer.value.status == 401
        page.wait_for_selector("#toast.show.bad")
        body = {"key": str(BAD_KEY)}
        good = {WRITE_HEADER: "1", "Authorization": f"Bearer {TOKEN}"}
        # cross-site: another origin, a form post, no custom header
        assert (
            httpx.post(
                f"{url}/api/retry", json=body, headers={**good, "Origin": "http://evil.example"}
            ).status_code
            == 403
        )
        assert httpx.post(f"{url}/api/retry", data=body, headers=good).status_code == 415
        assert (
            httpx.post(
                f"{url}/api/retry", json=body, headers={"Authorization": good["Authorization"]}
            ).status_code
            == 403
        )
        assert (
            httpx.post(
                f"{url}/api/retry",
                json=body,
                headers={WRITE_HEADER: "1", "Authorization": "Bearer wrong-token-wrong-token"},
            ).status_code
            == 401
        )
        assert [e for e in errors if "status of 401" not in e] == []  # only the refusal

    assert position(seeded, BAD_KEY) == ("overlay", "failed")
    assert overlay_runs(seeded, BAD_KEY) == runs_before


def test_hostile_keys_render_as_text(
    browser: Any, pgstagechain_dsn: str, worker_process: Any
) -> None:
    hostile_app.create_table(pgstagechain_dsn)
    install(pgstagechain_dsn, "tests.apps.hostile_app:pipeline")
    with psycopg.connect(pgstagechain_dsn, autocommit=True) as conn:
        for key in HOSTILE_KEYS:
            conn.execute("INSERT INTO notes (name) VALUES (%s)", (key,))
    worker_process("tests.apps.hostile_app:pipeline")
    app = dashboard_app(hostile_app.pipeline, pgstagechain_dsn, cache_seconds=0)
    with uvicorn_serving(app) as (url, _):
        page, errors = open_page(browser, url, "read_note")
        wait_for(lambda: len(page.query_selector_all("#failures tbody tr")) == 2, "both failures")
        keys = [c.text_content() for c in page.query_selector_all("#failures td.key")]
        assert sorted(keys) == sorted(HOSTILE_KEYS)
        errors_shown = [c.text_content() for c in page.query_selector_all("#failures td.error")]
        assert all(any(f"cannot read {k}" in e for e in errors_shown) for k in HOSTILE_KEYS)
        page.fill("#history-key", HOSTILE_KEYS[1])
        page.click("#history-form button")
        page.wait_for_selector("#history .position")
        assert HOSTILE_KEYS[1] in (page.text_content("#history .position") or "")
        assert page.query_selector("#failures img, #history img, body > script:not([src])") is None
        assert page.evaluate("window.__pwned") is None
        assert errors == []


def test_mounted_in_fastapi_behind_the_apps_own_auth(seeded: str, worker_process: Any) -> None:
    from fastapi import Depends, FastAPI

    from pgstagechain.contrib.fastapi import dashboard_router
    from tests.apps.web_app import TOKEN as ADMIN_TOKEN
    from tests.apps.web_app import require_admin

    worker_process()
    wait_for(lambda: position(seeded, BAD_KEY) == ("overlay", "failed"), "the failure")
    runs_before = len(overlay_runs(seeded, BAD_KEY))
    app = FastAPI()
    app.include_router(
        dashboard_router(
            pipeline,
            seeded,
            dependencies=[Depends(require_admin)],
            writes=True,
            write_dependencies=[Depends(require_admin)],
        ),
        prefix="/ops/dashboard",
    )
    admin_auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with uvicorn_serving(app) as (url, _):
        base = f"{url}/ops/dashboard"
        assert httpx.get(f"{base}/").status_code == 401
        page = httpx.get(f"{base}/", headers=admin_auth)
        assert page.status_code == 200 and "static/dashboard.js" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        snapshot = httpx.get(f"{base}/api/snapshot", headers=admin_auth).json()
        assert {s["name"]: s["failed"] for s in snapshot["stages"]}["overlay"] == 1
        write = {**admin_auth, WRITE_HEADER: "1"}
        cross = httpx.post(
            f"{base}/api/retry",
            json={"key": BAD_KEY},
            headers={**write, "Origin": "http://evil.example"},
        )
        assert cross.status_code == 403
        assert position(seeded, BAD_KEY) == ("overlay", "failed")
        done = httpx.post(f"{base}/api/retry", json={"key": BAD_KEY}, headers=write)
        assert done.status_code == 200 and done.json()["keys"] == [str(BAD_KEY)]
    # the image is still bad: overlay runs once more and fails again
    wait_for(lambda: len(overlay_runs(seeded, BAD_KEY)) > runs_before, "the retried run")


def test_included_in_a_django_project(seeded: str, worker_process: Any) -> None:
    pytest.importorskip("django")

    worker_process()
    wait_for(lambda: position(seeded, BAD_KEY) == ("overlay", "failed"), "the failure")
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "tests.apps.django_dashboard:application",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env={
            **os.environ,
            "PGSTAGECHAIN_DSN": seeded,
            "DJANGO_SETTINGS_MODULE": "tests.apps.django_dashboard",
            "PGSTAGECHAIN_DASHBOARD_TOKEN": TOKEN,
        },
    )
    base = f"http://127.0.0.1:{port}/ops/dashboard"
    try:
        wait_for(lambda: _answers(f"{base}/"), "the Django server")
        page = httpx.get(f"{base}/")
        assert page.status_code == 200 and "static/dashboard.js" in page.text
        assert (
            httpx.get(f"{base}/static/dashboard.js")
            .headers["content-type"]
            .startswith("text/javascript")
        )
        snapshot = httpx.get(f"{base}/api/snapshot").json()
        assert {s["name"]: s["failed"] for s in snapshot["stages"]}["overlay"] == 1
        assert any(f["key"] == str(BAD_KEY) for f in snapshot["failures"])
        body = {"key": BAD_KEY}
        no_token = httpx.post(f"{base}/api/retry", json=body, headers={WRITE_HEADER: "1"})
        assert no_token.status_code == 401
        assert position(seeded, BAD_KEY) == ("overlay", "failed")
        good = {WRITE_HEADER: "1", "Authorization": f"Bearer {TOKEN}"}
        done = httpx.post(f"{base}/api/retry", json=body, headers=good)
        assert done.status_code == 200 and done.json()["keys"] == [str(BAD_KEY)]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url).status_code < 500
    except httpx.TransportError:
        return False


def test_the_dashboard_command_serves_the_page(seeded: str) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PGSTAGECHAIN_DASHBOARD_TOKEN"}
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "pgstagechain",
            "dashboard",
            "tests.apps.cli_app:pipeline",
            "--dsn",
            seeded,
            "--writes",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2
    assert "PGSTAGECHAIN_DASHBOARD_TOKEN" in refused.stderr
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pgstagechain",
            "dashboard",
            "tests.apps.cli_app:pipeline",
            "--dsn",
            seeded,
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert f"http://127.0.0.1:{port}/" in server.stdout.readline()
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/"), "the dashboard command")
        config = httpx.get(f"http://127.0.0.1:{port}/api/config").json()
        assert config["writes"] is False
        assert [s["name"] for s in config["stages"]][:2] == ["vlm_analyze", "yolo_detect"]
        snapshot = httpx.get(f"http://127.0.0.1:{port}/api/snapshot").json()
        assert {s["name"]: s["waiting"] for s in snapshot["stages"]}["vlm_analyze"] == 6
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        if server.stdout is not None:
            server.stdout.close()


def test_the_refresh_benchmark_runs_at_a_tiny_size() -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/dashboard_refresh.py", "--rows", "5000", "--times", "2"],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    assert "refresh (one round, " in done.stdout
    assert "runs_finished" in done.stdout  # the plans are printed, the ledger by its index
