"""Prometheus metrics scraped over real HTTP, from a worker process and in-process."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg
import pytest

pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry

from pgstagechain import Claim, Worker, migrate
from pgstagechain.metrics import Metrics
from tests.apps.cli_app import pipeline
from tests.apps.seed import add_jobs, create_tables

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def value(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in a Prometheus text exposition, or None if absent."""
    for line in text.splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not match or match[1] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match[2] or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match[3])
    return None


@contextlib.contextmanager
def serving(metrics: Metrics) -> Iterator[int]:
    server = metrics.serve(0, "127.0.0.1")
    try:
        yield int(server.server_port)
    finally:
        server.shutdown()
        server.server_close()


async def test_observed_runs_are_scraped_over_http() -> None:
    metrics = Metrics("feedly", registry=CollectorRegistry())
    metrics.observe_run("overlay", "succeeded", 0.2)
    metrics.observe_run("overlay", "succeeded", 3.0)
    metrics.observe_run("overlay", "failed", 0.01)
    with serving(metrics) as port:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200
    text = response.text
    runs = "pgstagechain_stage_runs_total"
    assert value(text, runs, pipeline="feedly", stage="overlay", outcome="succeeded") == 2
    assert value(text, runs, pipeline="feedly", stage="overlay", outcome="failed") == 1
    hist = "pgstagechain_stage_run_duration_seconds"
    assert value(text, hist + "_count", stage="overlay") == 3
    assert value(text, hist + "_bucket", stage="overlay", le="0.25") == 2
    assert value(text, hist + "_bucket", stage="overlay", le="2.5") == 2
    assert value(text, hist + "_bucket", stage="overlay", le="5.0") == 3


async def test_sampling_a_worker_counts_each_event_once(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    await migrate(pgstagechain_dsn, pipeline)
    add_jobs(pgstagechain_dsn, jobs=1, variants=2, release=False)
    with psycopg.connect(pgstagechain_dsn, autocommit=True) as conn:
        conn.execute("UPDATE jobs_variants SET img_asset_id = 'bad' WHERE job_variants_id = 102")
        conn.execute("UPDATE jobs_variants SET status = 'done'")
    registry = CollectorRegistry()
    metrics = Metrics(pipeline, registry=registry)
    worker = Worker(pipeline, pgstagechain_dsn, scan_interval=1)
    stats = await worker.run_until_idle()
    metrics.sample(worker)
    metrics.sample(worker)  # nothing new: nothing added

    def get(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"pipeline": "feedly", **labels})

    # 101 runs all 8 row stages, 102 four (fails at overlay); job 1 never fans in
    assert get("pgstagechain_worker_runs_total", outcome="succeeded") == 8 + 3
    assert get("pgstagechain_worker_runs_total", outcome="failed") == 1
    assert get("pgstagechain_claims_total") == stats.claimed == 12
    assert get("pgstagechain_notifications_total") == stats.notifications
    # how claims came about: straight on from the stage before, or found nothing
    assert stats.chained > 0
    assert get("pgstagechain_runs_chained_total") == stats.chained
    assert stats.claims_empty > 0  # the start-up scans of stages with nothing ready
    assert get("pgstagechain_claims_empty_total") == stats.claims_empty
    assert get("pgstagechain_keys_left_to_peers_total") == stats.left_to_peers == 0
    assert get("pgstagechain_runs_in_flight") == 0


def test_worker_command_serves_metrics_port(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    anyio.run(migrate, pgstagechain_dsn, pipeline)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PGSTAGECHAIN_DSN"}
    command = [sys.executable, "-m", "pgstagechain", "--dsn", pgstagechain_dsn, "worker"]
    command += ["tests.apps.cli_app:pipeline", "--metrics-port", str(port)]
    command += ["--metrics-addr", "127.0.0.1", "--metrics-interval", "0.1", "--scan-interval", "1"]
    with subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            text = ""
            with httpx.Client() as client:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and proc.poll() is None:
                    with contextlib.suppress(httpx.TransportError):
                        text = client.get(f"http://127.0.0.1:{port}/metrics").text
                        break
                    time.sleep(0.1)
                assert text, f"no metrics served: {proc.stderr.read() if proc.poll() else ''}"
                add_jobs(pgstagechain_dsn, jobs=1, variants=2)
                succeeded = "pgstagechain_worker_runs_total"
                while time.monotonic() < deadline:
                    text = client.get(f"http://127.0.0.1:{port}/metrics").text
                    if value(text, succeeded, outcome="succeeded") == 2 * 8 + 2:
                        break
                    time.sleep(0.1)
            assert value(text, succeeded, pipeline="feedly", outcome="succeeded") == 18, text
            assert value(text, "pgstagechain_claims_total", pipeline="feedly") == 18
            notified = value(text, "pgstagechain_notifications_total", pipeline="feedly")
            assert notified is not None and notified >= 1
            assert value(text, "pgstagechain_notifications_malformed_total") == 0
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_metrics_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                *(sys.executable, "-m", "pgstagechain", "worker", "tests.apps.cli_app:pipeline"),
                *("--metrics-port", str(port), "--metrics-addr", "127.0.0.1"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in done.stderr


# -- OpenTelemetry ---------------------------------------------------------------------------

try:
    from opentelemetry import trace as otel_trace
except ImportError:  # the OpenTelemetry test below is skipped
    otel_trace = None

if otel_trace is not None:

    class RecordedSpan(otel_trace.Span):  # type: ignore[misc]
        """A span that keeps what it was told, for assertions (the API ships no recorder)."""

        def __init__(self, name: str, attributes: Mapping[str, Any] | None) -> None:
            self.name = name
            self.attributes: dict[str, Any] = dict(attributes or {})
            self.status: Any = None
            self.ended = False

        def end(self, end_time: int | None = None) -> None:
            self.ended = True

        def get_span_context(self) -> Any:
            return otel_trace.INVALID_SPAN_CONTEXT

        def set_attributes(self, attributes: Mapping[str, Any]) -> None:
            self.attributes.update(attributes)

        def set_attribute(self, key: str, value: Any) -> None:
            self.attributes[key] = value

        def add_event(self, *args: Any, **kwargs: Any) -> None:
            pass

        def update_name(self, name: str) -> None:
            self.name = name

        def is_recording(self) -> bool:
            return not self.ended

        def set_status(self, status: Any, description: str | None = None) -> None:
            self.status = status

        def record_exception(self, *args: Any, **kwargs: Any) -> None:
            pass

    class RecordingTracer(otel_trace.Tracer):  # type: ignore[misc]
        def __init__(self) -> None:
            self.spans: list[RecordedSpan] = []

        def start_span(
            self, name: str, context: Any = None, kind: Any = None, attributes: Any = None, **_: Any
        ) -> RecordedSpan:
            span = RecordedSpan(name, attributes)
            self.spans.append(span)
            return span

        @contextlib.contextmanager
        def start_as_current_span(
            self, name: str, context: Any = None, kind: Any = None, attributes: Any = None, **_: Any
        ) -> Iterator[RecordedSpan]:
            span = self.start_span(name, context, kind, attributes)
            with otel_trace.use_span(span, end_on_exit=True):
                yield span

    def a_claim(stage: str, key: str, group: str | None) -> Claim:
        return Claim(
            pipeline="feedly",
            stage=stage,
            run_id=7,
            key=key,
            row_key=key,
            group_key=group,
            attempt=2,
            is_group=False,
        )


@pytest.mark.skipif(otel_trace is None, reason="opentelemetry-api is not installed")
def test_a_span_per_run_carries_the_run_and_its_outcome() -> None:
    tracer = RecordingTracer()
    metrics = Metrics("feedly", prometheus=False, tracer=tracer)
    with metrics.span("overlay", a_claim("overlay", "101", "1")):
        metrics.observe_run("overlay", "retried", 0.5)
    with metrics.span("planner", a_claim("planner", "102", None)):
        metrics.observe_run("planner", "succeeded", 0.1)
    failed, ok = tracer.spans
    assert failed.name == "pgstagechain overlay"
    assert failed.ended
    expected: Sequence[tuple[str, Any]] = [
        ("pgstagechain.pipeline", "feedly"),
        ("pgstagechain.stage", "overlay"),
        ("pgstagechain.row_key", "101"),
        ("pgstagechain.group_key", "1"),
        ("pgstagechain.attempt", 2),
        ("pgstagechain.run_id", 7),
        ("pgstagechain.outcome", "retried"),
    ]
    assert [(k, failed.attributes.get(k)) for k, _ in expected] == list(expected)
    assert failed.status.status_code == otel_trace.StatusCode.ERROR
    assert ok.status is None
    assert "pgstagechain.group_key" not in ok.attributes
    assert ok.attributes["pgstagechain.outcome"] == "succeeded"
