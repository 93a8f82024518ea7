"""The dashboard without a web framework: its pages and JSON, its reads and its writes.

:class:`Dashboard` answers a :class:`Request` with a :class:`Response`; the ASGI app
(:func:`pgstagechain.dashboard.dashboard_app`), the FastAPI router and the Django view
are thin adapters around :meth:`Dashboard.handle`. Everything it reads or changes goes
through :mod:`pgstagechain.admin`.

Reads use a small pool of their own and are cached for a moment, one refresh at a time:
a burst of browsers costs one query round, and at most ``pool_size`` connections. Write
actions (retry, cancel, rerun) are off unless ``writes`` is set; then a request must be a POST
of JSON, carry the custom header :data:`WRITE_HEADER` (a browser never sends one cross-site
without a preflight this app does not answer), come from this origin when it names one,
and be authenticated: the host application vouched for it, or it carries the token.
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import anyio
import attrs
import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout, TooManyRequests

from .. import ConfigurationError, Pipeline, admin, graph
from .._connect import ReadPool
from .._sql import plain

logger = logging.getLogger("pgstagechain.dashboard")

#: environment variable the ``pgstagechain dashboard`` command reads its write token from
ENV_TOKEN = "PGSTAGECHAIN_DASHBOARD_TOKEN"
#: the header every write must carry (its value is not checked: its presence is the point)
WRITE_HEADER = "x-pgstagechain-dashboard"
ASSETS = {
    "": ("index.html", "text/html; charset=utf-8"),
    "static/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "static/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
#: the write actions, each a POST to ``api/<action>``
WRITES = ("api/retry", "api/cancel", "api/rerun")
#: keys a re-run's answer lists at most per list (the counts are whole)
SHOWN_KEYS = 50
#: keys a re-run request may name
MAX_KEYS = 100_000
SECURITY_HEADERS = (
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
)


@attrs.frozen(kw_only=True)
class Request:
    """What the dashboard needs of an HTTP request. ``path`` is relative to where the
    dashboard is mounted, without a leading slash; header names are lower case.
    ``authorized``: the host application authenticated the caller (its own auth)."""

    method: str
    path: str
    query: Mapping[str, str] = attrs.field(factory=dict)
    headers: Mapping[str, str] = attrs.field(factory=dict)
    body: bytes = b""
    authorized: bool = False


@attrs.frozen(kw_only=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


class Refused(Exception):
    """A request the dashboard answers with an error status and a message."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.status = status
        self.headers = headers


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    return value


def _record(instance: Any) -> dict[str, Any]:
    """An attrs record as JSON-able data, every field it has (added ones included)."""
    return attrs.asdict(instance, value_serializer=lambda _i, _a, v: _json_value(v))


def _asset(name: str) -> bytes:
    return (resources.files(__package__ or "pgstagechain.dashboard") / "assets" / name).read_bytes()


class Dashboard:
    """One pipeline's dashboard: see the module docstring.

    :param writes: enable retry, cancel and rerun (off by default).
    :param token: the secret a write request must carry as ``Authorization: Bearer
        TOKEN``, unless the host application authorized the request itself.
    :param window: seconds over which each stage's throughput is counted.
    :param minutes: how many minutes the charts show.
    :param pool_size: connections the dashboard uses at most.
    :param cache_seconds: how long one refresh is reused.
    :param wait: seconds a request waits for a connection before a 503.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        dsn: str | None = None,
        *,
        writes: bool = False,
        token: str | None = None,
        window: float = 300.0,
        minutes: int = 15,
        pool_size: int = 2,
        cache_seconds: float = 1.0,
        wait: float = 5.0,
    ) -> None:
        if pool_size < 1 or wait <= 0 or cache_seconds < 0 or window <= 0:
            raise ConfigurationError(
                "pool_size, wait and window must be positive, cache_seconds >= 0"
            )
        if token is not None and len(token) < 16:
            raise ConfigurationError("the dashboard token must be at least 16 characters")
        self.pipeline = pipeline
        self.dsn = dsn
        self.writes = writes
        self.token = token
        self.window = window
        self.minutes = minutes
        self.pool_size = pool_size
        self.cache_seconds = cache_seconds
        self.wait = wait
        self._reads = ReadPool(dsn, size=pool_size, wait=wait, name="pgstagechain-dashboard")
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lock = anyio.Lock()
        self._svg = graph.to_svg(pipeline, {s.name: graph.Live() for s in pipeline}, inline=True)

    # -- connections -----------------------------------------------------------------------------

    async def pool(self) -> AsyncConnectionPool[AsyncConnection[Any]]:
        return await self._reads.get()

    async def close(self) -> None:
        await self._reads.close()

    # -- reads -----------------------------------------------------------------------------------

    async def read(self, conn: AsyncConnection[Any], stage: str | None) -> dict[str, Any]:
        """One refresh: a fixed round of statements, whatever the number of rows or stages."""
        status = await admin.live(conn, self.pipeline, window=self.window)
        minutes = await admin.throughput(conn, self.pipeline, minutes=self.minutes)
        failed = await admin.failures(conn, self.pipeline, stage=stage, limit=50)
        present = await admin.workers(conn, self.pipeline)
        now = await (await conn.execute(plain("now"))).fetchone()
        assert now is not None
        live = graph.live_counts(status)
        stages = []
        for each in status.stages:
            shown = each.to_json()
            shown["per_minute"] = live[each.stage].per_minute
            shown["backlog"] = graph.backlog_level(live[each.stage])
            stages.append(shown)
        start = now[0].replace(second=0, microsecond=0) - dt.timedelta(minutes=self.minutes)
        labels = [start + dt.timedelta(minutes=i) for i in range(self.minutes + 1)]
        index = {m: i for i, m in enumerate(labels)}
        series = {
            s.name: {"succeeded": [0] * len(labels), "failed": [0] * len(labels)}
            for s in self.pipeline
        }
        for row in minutes:
            at = index.get(row.minute)
            if at is not None and row.stage in series:
                series[row.stage]["succeeded"][at] = row.succeeded
                series[row.stage]["failed"][at] = row.failed
        return {
            "now": now[0].isoformat(),
            "window_seconds": self.window,
            "stages": stages,
            "charts": {"minutes": [m.isoformat() for m in labels], "stages": series},
            "failures": [_record(f) for f in failed],
            "failures_stage": stage,
            "workers": [_record(w) for w in present],
        }

    async def snapshot(self, stage: str | None = None) -> dict[str, Any]:
        """The latest refresh, at most ``cache_seconds`` old; 503 when none can be had
        within ``wait`` seconds."""
        if stage is not None and stage not in self.pipeline:
            raise Refused(404, f"pipeline {self.pipeline.name!r} has no stage {stage!r}")
        cache_key = stage or ""
        try:
            with anyio.fail_after(self.wait):
                async with self._lock:
                    hit = self._cache.get(cache_key)
                    if hit is not None and hit[0] > time.monotonic():
                        return hit[1]
                    async with (await self.pool()).connection() as conn:
                        found = await self.read(conn, stage)
                    self._cache[cache_key] = (time.monotonic() + self.cache_seconds, found)
                    return found
        except (TimeoutError, PoolTimeout, TooManyRequests, psycopg.OperationalError) as exc:
            logger.warning("dashboard refresh of %s unavailable: %s", self.pipeline.name, exc)
            raise Refused(
                503, "the database is busy or unavailable, trying again", (("retry-after", "1"),)
            ) from None

    async def history(self, key: str, group: bool) -> dict[str, Any]:
        if not key or len(key) > 1000 or "\x00" in key:
            raise Refused(400, "name a key of 1 to 1000 characters")
        async with self._connection() as conn:
            try:
                found = await admin.history(conn, self.pipeline, key, group=group)
            except ConfigurationError as exc:
                raise Refused(404, str(exc)) from None
        return _record(found)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        """A connection from the dashboard's pool for one request, waiting ``wait`` at most."""
        async with (await self.pool()).connection(timeout=self.wait) as conn:
            yield conn

    # -- writes ----------------------------------------------------------------------------------

    def check_write(self, request: Request) -> None:
        """Refuse a write that is off, cross-site, not JSON or not authenticated."""
        if not self.writes:
            raise Refused(403, "write actions are off for this dashboard")
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise Refused(415, "send the body as application/json")
        if WRITE_HEADER not in request.headers:
            raise Refused(403, f"a write needs the {WRITE_HEADER} header")
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host", ""):
            raise Refused(403, "cross-site write refused")
        if request.authorized:
            return
        given = request.headers.get("authorization", "")
        scheme, _, secret = given.partition(" ")
        if (
            self.token is None
            or scheme.lower() != "bearer"
            or not hmac.compare_digest(secret.strip().encode(), self.token.encode())
        ):
            raise Refused(
                401, "a write needs the dashboard token", (("www-authenticate", "Bearer"),)
            )

    async def act(self, action: str, body: bytes) -> dict[str, Any]:
        asked = _object(body)
        if action == "rerun":
            return await self.rerun(asked)
        chosen = {k: asked.get(k) for k in ("key", "group", "stage") if asked.get(k) is not None}
        if len(chosen) != 1 or not all(isinstance(v, str | int) for v in chosen.values()):
            raise Refused(400, "name exactly one of key, group or stage")
        target = {k: str(v) for k, v in chosen.items()}
        async with self._connection() as conn:
            try:
                if action == "retry":
                    keys = await admin.retry(conn, self.pipeline, **target)
                    found: dict[str, Any] = {"action": "retry", "keys": keys}
                else:
                    report = await admin.cancel(conn, self.pipeline, **target)
                    found = {"action": "cancel", **_record(report)}
            except ConfigurationError as exc:
                raise Refused(400, str(exc)) from None
        self._cache.clear()
        logger.info("dashboard %s of %s: %s", action, target, found)
        return found

    async def rerun(self, asked: dict[str, Any]) -> dict[str, Any]:
        """Re-run a stage for a selection (``admin.rerun``); with ``dry_run`` only count.
        The report's key lists are cut to :data:`SHOWN_KEYS` (their counts are whole)."""
        stage = asked.get("stage")
        if not isinstance(stage, str) or not stage:
            raise Refused(400, "name the stage to re-run from")
        options: dict[str, Any] = {
            "stage": stage,
            "keys": _strings(asked.get("keys"), "keys"),
            "groups": _strings(asked.get("groups"), "groups"),
            "status": _optional_text(asked.get("status"), "status"),
            "all_rows": asked.get("all") is True,
            "in_flight": "skip" if asked.get("skip_in_flight") is True else "cancel",
            "dry_run": asked.get("dry_run") is True,
        }
        for name in ("since", "until"):
            text = _optional_text(asked.get(name), name)
            if text is not None:
                try:
                    options[name] = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
                except ValueError:
                    raise Refused(400, f"{name} is not an ISO 8601 time: {text!r}") from None
        async with self._connection() as conn:
            try:
                report = await admin.rerun(conn, self.pipeline, **options)
            except ConfigurationError as exc:
                raise Refused(400, str(exc)) from None
        found = report.to_json()
        for name in ("keys", "in_flight", "groups", "groups_stopped"):
            found[f"{name}_count"] = len(found[name])
            found[name] = found[name][:SHOWN_KEYS]
        found["skipped"] = {
            reason: {
                "count": len(keys),
                "keys": keys[:SHOWN_KEYS],
                "why": admin.SKIP_REASONS[reason],
            }
            for reason, keys in found["skipped"].items()
        }
        if not report.dry_run:
            self._cache.clear()
            logger.info(
                "dashboard rerun of %s from %s: %d re-run, %d skipped",
                self.pipeline.name,
                stage,
                len(report.keys),
                report.skipped_count,
            )
        return {"action": "rerun", **found}

    # -- routing ---------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline.name,
            "writes": self.writes,
            "window_seconds": self.window,
            "minutes": self.minutes,
            "group_column": self.pipeline.table.group_column,
            "stages": [
                {"name": s.name, "after": s.after, "level": "group" if s.group else "row"}
                for s in admin.stage_order(self.pipeline)
            ],
        }

    async def handle(self, request: Request) -> Response:
        """Answer one request; never raises for a request's own faults."""
        try:
            return await self._route(request)
        except Refused as exc:
            return _json(exc.status, {"error": str(exc)}, exc.headers)
        except (PoolTimeout, TooManyRequests, psycopg.OperationalError) as exc:
            logger.warning("dashboard request failed: %s", exc)
            return _json(503, {"error": "database unavailable, try again"}, (("retry-after", "1"),))

    async def _route(self, request: Request) -> Response:
        path = request.path.strip("/")
        if request.method in ("GET", "HEAD"):
            if path in ASSETS:
                name, content_type = ASSETS[path]
                return Response(status=200, body=_asset(name), content_type=content_type)
            if path == "api/config":
                return _json(200, self.config())
            if path == "api/graph.svg":
                return Response(status=200, body=self._svg.encode(), content_type="image/svg+xml")
            if path == "api/snapshot":
                return _json(200, await self.snapshot(request.query.get("stage") or None))
            if path == "api/history":
                group = request.query.get("group", "") in ("1", "true", "yes")
                return _json(200, await self.history(request.query.get("key", ""), group))
            if path in WRITES:
                raise Refused(405, "use POST", (("allow", "POST"),))
            raise Refused(404, "not found")
        if request.method == "POST" and path in WRITES:
            self.check_write(request)
            return _json(200, await self.act(path.removeprefix("api/"), request.body))
        raise Refused(405, "method not allowed", (("allow", "GET"),))


def _object(body: bytes) -> dict[str, Any]:
    try:
        asked = json.loads(body or b"{}")
    except ValueError:
        raise Refused(400, "the body is not JSON") from None
    if not isinstance(asked, dict):
        raise Refused(400, "the body must be a JSON object")
    return asked


def _optional_text(value: Any, name: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 1000:
        raise Refused(400, f"{name} must be a string")
    return value


def _strings(value: Any, name: str) -> list[str] | None:
    """A list of keys, given as a JSON list or as one string separated by commas, spaces
    or new lines."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    if (
        not isinstance(value, list)
        or len(value) > MAX_KEYS
        or not all(isinstance(v, str | int) and len(str(v)) <= 1000 for v in value)
    ):
        raise Refused(400, f"{name} must be a list of at most {MAX_KEYS} keys")
    return [str(v) for v in value]


def _json(status: int, data: Any, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status=status, body=json.dumps(data).encode(), headers=headers)
