"""A live web dashboard of a pipeline: the drawn stages with their counts, throughput and
failures per stage, recent failures, a row's history, worker presence, and (when enabled)
retry, cancel and re-runs.

Serve it with ``pgstagechain dashboard MODULE:PIPELINE``, or mount it::

    from pgstagechain.dashboard import dashboard_app
    app.mount("/dashboard", dashboard_app(pipeline))          # Starlette / FastAPI

:func:`pgstagechain.contrib.fastapi.dashboard_router` puts your own auth dependency in front
of it, and ``pgstagechain.contrib.django.dashboard`` is a URLconf to ``include``. Its
pages, script and styles ship in this package: it works offline.
"""

from __future__ import annotations

from typing import Any

from .. import ConfigurationError, Pipeline
from ._asgi import DashboardApp
from ._core import ENV_TOKEN, SECURITY_HEADERS, WRITE_HEADER, Dashboard, Request, Response

__all__ = [
    "ENV_TOKEN",
    "SECURITY_HEADERS",
    "WRITE_HEADER",
    "Dashboard",
    "DashboardApp",
    "Request",
    "Response",
    "dashboard_app",
]


def dashboard_app(
    pipeline: Pipeline,
    dsn: str | None = None,
    *,
    writes: bool = False,
    token: str | None = None,
    **options: Any,
) -> DashboardApp:
    """An ASGI app serving the dashboard of ``pipeline`` (``options`` are those of
    :class:`Dashboard`: ``window``, ``minutes``, ``pool_size``, ``cache_seconds``, ``wait``).

    With ``writes=True`` a ``token`` is required: mounted bare, nothing else stands
    between a caller and retry or cancel."""
    if not isinstance(pipeline, Pipeline):
        raise ConfigurationError(f"expected a Pipeline, got {type(pipeline).__name__}")
    if writes and not token:
        raise ConfigurationError(
            "dashboard_app(writes=True) needs a token (or use dashboard_router behind "
            "your own auth dependency)"
        )
    return DashboardApp(Dashboard(pipeline, dsn, writes=writes, token=token, **options))
