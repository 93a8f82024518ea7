"""Prometheus metrics and OpenTelemetry spans for workers; both libraries are optional.

Two ways to feed the metrics, usable together:

* **sampling**: :meth:`Metrics.watch` copies a worker's :class:`~pgstagechain.WorkerStats`
  (and its listener's reconnects) into Prometheus counters every few seconds. It needs
  nothing from the worker but the counters it already keeps.
* **per run**: a worker given the :class:`Metrics` as its ``observer`` calls
  :meth:`Metrics.span` around every stage run and :meth:`Metrics.observe_run` when the run
  ends, which feeds the per-stage outcome counter and duration histogram and, when
  ``opentelemetry-api`` is installed, one span per run.

::

    metrics = Metrics(pipeline)
    metrics.serve(9464)                         # GET http://host:9464/metrics
    async with anyio.create_task_group() as tg:
        tg.start_soon(metrics.watch, worker)
        await worker.run()

Install with ``pip install 'pgstagechain[metrics]'`` (and ``[otel]`` for spans).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import anyio

from ._execute import OUTCOMES as OUTCOMES
from ._execute import RunObserver as RunObserver
from ._pipeline import Pipeline
from .errors import ConfigurationError

if TYPE_CHECKING:
    from ._context import Claim
    from ._worker import Worker

try:
    import prometheus_client
except ImportError:  # pragma: no cover - exercised only without the extra installed
    prometheus_client = None  # type: ignore[assignment]

try:
    from opentelemetry import trace as otel_trace
except ImportError:  # pragma: no cover - exercised only without the extra installed
    otel_trace = None  # type: ignore[assignment]

__all__ = ["OUTCOMES", "Metrics", "RunObserver", "serve"]

#: Run durations from 5 ms to 10 min: model calls and HTTP stages, not microbenchmarks.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

#: WorkerStats fields sampled into ``pgstagechain_worker_runs_total{outcome=...}``.
RUN_FIELDS = ("succeeded", "failed", "retried", "lease_lost")


class _Families:
    """The metric objects, created once per registry (a name registers only once)."""

    def __init__(self, registry: Any) -> None:
        assert prometheus_client is not None
        counter = prometheus_client.Counter
        p = ["pipeline"]
        self.runs = counter(
            "pgstagechain_stage_runs",
            "Stage runs finished, by stage and outcome",
            [*p, "stage", "outcome"],
            registry=registry,
        )
        self.duration = prometheus_client.Histogram(
            "pgstagechain_stage_run_duration_seconds",
            "Wall time of stage runs, claim to completion",
            [*p, "stage"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.worker_runs = counter(
            "pgstagechain_worker_runs",
            "Stage runs finished by the worker, by outcome (sampled from WorkerStats)",
            [*p, "outcome"],
            registry=registry,
        )
        self.claimed = counter(
            "pgstagechain_claims", "Rows and groups claimed", p, registry=registry
        )
        self.races_lost = counter(
            "pgstagechain_claim_races_lost",
            "Announced rows another worker claimed first",
            p,
            registry=registry,
        )
        self.claims_empty = counter(
            "pgstagechain_claims_empty",
            "Claim statements that found nothing to claim",
            p,
            registry=registry,
        )
        self.left_to_peers = counter(
            "pgstagechain_keys_left_to_peers",
            "Announced rows left to the live worker they hash to",
            p,
            registry=registry,
        )
        self.chained = counter(
            "pgstagechain_runs_chained",
            "Runs claimed by the completion of the stage before, on the same worker",
            p,
            registry=registry,
        )
        self.notifications = counter(
            "pgstagechain_notifications", "Notifications received", p, registry=registry
        )
        self.malformed = counter(
            "pgstagechain_notifications_malformed",
            "Notifications ignored because their payload was not understood",
            p,
            registry=registry,
        )
        self.reconnects = counter(
            "pgstagechain_listener_reconnects",
            "Times the LISTEN connection was lost and reopened",
            p,
            registry=registry,
        )
        self.rescued = counter(
            "pgstagechain_rows_rescued",
            "Runs whose lease expired and that the recovery scan re-drove",
            p,
            registry=registry,
        )
        self.timed_out = counter(
            "pgstagechain_runs_timed_out",
            "Stage runs stopped by their stage timeout (also counted as failed or retried)",
            p,
            registry=registry,
        )
        self.scans = counter(
            "pgstagechain_recovery_scans", "Recovery scans run", p, registry=registry
        )
        self.db_errors = counter(
            "pgstagechain_db_errors",
            "Database connection errors survived",
            p,
            registry=registry,
        )
        self.in_flight = prometheus_client.Gauge(
            "pgstagechain_runs_in_flight", "Stage runs in progress", p, registry=registry
        )


_families: weakref.WeakKeyDictionary[Any, _Families] = weakref.WeakKeyDictionary()

# WorkerStats field -> _Families attribute, for the counters sampled as they are.
_SAMPLED = {
    "claimed": "claimed",
    "races_lost": "races_lost",
    "claims_empty": "claims_empty",
    "left_to_peers": "left_to_peers",
    "chained": "chained",
    "notifications": "notifications",
    "malformed": "malformed",
    "rescued": "rescued",
    "timed_out": "timed_out",
    "scans": "scans",
    "db_errors": "db_errors",
}


def _registry(registry: Any) -> Any:
    if prometheus_client is None:
        raise ConfigurationError(
            "Prometheus metrics need prometheus-client: pip install 'pgstagechain[metrics]'"
        )
    return prometheus_client.REGISTRY if registry is None else registry


def serve(port: int, addr: str = "0.0.0.0", *, registry: Any = None) -> Any:
    """Expose ``registry`` (default: the global one) at ``http://addr:port/metrics``.

    Runs in a daemon thread; returns the HTTP server (``.server_port`` is the port
    bound, useful with ``port=0``; ``.shutdown()`` stops it).
    """
    registry = _registry(registry)
    try:
        started = prometheus_client.start_http_server(port, addr, registry=registry)
    except OSError as exc:
        raise ConfigurationError(f"cannot serve metrics on {addr}:{port}: {exc}") from None
    return started[0] if isinstance(started, tuple) else started


class Metrics:
    """Prometheus metrics (and OpenTelemetry spans) for the workers of one pipeline.

    :param pipeline: the pipeline (or its name), the ``pipeline`` label of every series.
    :param registry: a ``prometheus_client.CollectorRegistry``; default the global one.
    :param prometheus: False to record spans only (no prometheus-client needed).
    :param tracer: an OpenTelemetry tracer; default ``trace.get_tracer("pgstagechain")``
        when ``opentelemetry-api`` is installed, else no spans.
    """

    def __init__(
        self,
        pipeline: Pipeline | str,
        *,
        registry: Any = None,
        prometheus: bool = True,
        tracer: Any = None,
    ) -> None:
        self.pipeline = pipeline.name if isinstance(pipeline, Pipeline) else str(pipeline)
        self.registry: Any = None
        self._families: _Families | None = None
        if prometheus:
            self.registry = _registry(registry)
            found = _families.get(self.registry)
            if found is None:
                found = _families[self.registry] = _Families(self.registry)
            self._families = found
            # Series exist from the start (at 0), so rates and alerts need no special case.
            for name in ("reconnects", *_SAMPLED.values()):
                getattr(found, name).labels(self.pipeline)
            for outcome in RUN_FIELDS:
                found.worker_runs.labels(self.pipeline, outcome)
        if tracer is None and otel_trace is not None:
            tracer = otel_trace.get_tracer("pgstagechain")
        self.tracer = tracer
        self._seen: weakref.WeakKeyDictionary[Worker, dict[str, int]] = weakref.WeakKeyDictionary()

    # -- per run (called by a worker that has this object as its observer) -----------------

    @contextlib.contextmanager
    def span(self, stage: str, claim: Claim) -> Iterator[Any]:
        """A span around one stage run, current while the handler runs (None without OTel)."""
        if self.tracer is None:
            yield None
            return
        attributes: dict[str, Any] = {
            "pgstagechain.pipeline": self.pipeline,
            "pgstagechain.stage": stage,
            "pgstagechain.row_key": claim.row_key,
            "pgstagechain.attempt": claim.attempt,
            "pgstagechain.run_id": claim.run_id,
        }
        if claim.group_key is not None:
            attributes["pgstagechain.group_key"] = claim.group_key
        options: dict[str, Any] = {"attributes": attributes}
        if otel_trace is not None:
            options["kind"] = otel_trace.SpanKind.CONSUMER
        with self.tracer.start_as_current_span(f"pgstagechain {stage}", **options) as current:
            yield current

    def observe_run(self, stage: str, outcome: str, seconds: float) -> None:
        """Count one finished run of ``stage`` and record its duration.

        ``outcome`` is one of :data:`OUTCOMES`. Inside :meth:`span` it is also set on the
        span, which is marked as an error unless the run succeeded.
        """
        if self._families is not None:
            self._families.runs.labels(self.pipeline, stage, outcome).inc()
            self._families.duration.labels(self.pipeline, stage).observe(max(0.0, seconds))
        if otel_trace is not None and self.tracer is not None:
            current = otel_trace.get_current_span()
            if current.is_recording():
                current.set_attribute("pgstagechain.outcome", outcome)
                if outcome != "succeeded":
                    current.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR, outcome))

    # -- sampling ---------------------------------------------------------------------------

    def sample(self, worker: Worker) -> None:
        """Add what ``worker``'s counters gained since the last sample."""
        families = self._families
        if families is None:
            return
        seen = self._seen.setdefault(worker, {})
        now = {name: getattr(worker.stats, name) for name in (*RUN_FIELDS, *_SAMPLED)}
        listener = worker.listener
        now["reconnects"] = listener.stats.reconnects if listener is not None else 0
        for name, value in now.items():
            delta = value - seen.get(name, 0)
            if delta <= 0:
                continue
            seen[name] = value
            if name == "reconnects":
                families.reconnects.labels(self.pipeline).inc(delta)
            elif name in _SAMPLED:
                getattr(families, _SAMPLED[name]).labels(self.pipeline).inc(delta)
            if name in RUN_FIELDS:
                families.worker_runs.labels(self.pipeline, name).inc(delta)
        families.in_flight.labels(self.pipeline).set(worker.in_flight)

    async def watch(self, worker: Worker, interval: float = 5.0) -> None:
        """Sample ``worker`` every ``interval`` seconds until cancelled (then once more)."""
        try:
            while True:
                self.sample(worker)
                await anyio.sleep(interval)
        finally:
            self.sample(worker)

    def serve(self, port: int, addr: str = "0.0.0.0") -> Any:
        """Expose this object's registry over HTTP; see :func:`serve`."""
        if self.registry is None:
            raise ConfigurationError("these metrics were created with prometheus=False")
        return serve(port, addr, registry=self.registry)
