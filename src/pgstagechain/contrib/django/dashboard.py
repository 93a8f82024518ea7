"""The web dashboard in a Django project: ``include`` this URLconf::

    #: the dashboard's one view; it checks writes itself (see the module docstring)
dashboard_view = csrf_exempt(_dashboard_view)

urlpatterns = [path("pipelines/dashboard/", include("pgstagechain.contrib.django.dashboard"))]

Settings, in ``PGSTAGECHAIN_DASHBOARD`` (a dict): ``pipeline`` (a name from
``PGSTAGECHAIN_PIPELINES``; default the first), ``writes`` (default False), ``token``,
``staff_only`` (default True: reading needs a logged-in staff user too), and any option of
:class:`pgstagechain.dashboard.Dashboard`. A write is authorised for a staff user of the
site or a request carrying the token; it is refused cross-site either way (the dashboard
checks JSON, its own header and the Origin instead of Django's CSRF cookie). Serve the
project under ASGI: the view is async and its pool lives in the server's event loop.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings  # type: ignore[import-untyped]
from django.http import HttpRequest, HttpResponse  # type: ignore[import-untyped]
from django.urls import re_path  # type: ignore[import-untyped]
from django.views.decorators.csrf import csrf_exempt  # type: ignore[import-untyped]

from ...dashboard import SECURITY_HEADERS, Dashboard, Request
from .conf import conninfo, pipelines

_boards: dict[str, Dashboard] = {}


def _settings() -> dict[str, Any]:
    return dict(getattr(settings, "PGSTAGECHAIN_DASHBOARD", {}) or {})


def board() -> Dashboard:
    """This process's dashboard, made on first use from the settings."""
    options = _settings()
    name = options.pop("pipeline", None)
    options.pop("staff_only", None)
    key = name or ""
    if key not in _boards:
        chosen = pipelines([name] if name else None)[0]
        _boards[key] = Dashboard(chosen, conninfo(), **options)
    return _boards[key]


def _is_staff(request: HttpRequest) -> bool:
    user = getattr(request, "user", None)
    return bool(user is not None and user.is_authenticated and user.is_staff)


async def _dashboard_view(request: HttpRequest, path: str) -> HttpResponse:
    staff = await sync_to_async(_is_staff)(request)
    if _settings().get("staff_only", True) and not staff:
        return HttpResponse(b'{"error": "staff only"}', status=403, content_type="application/json")
    found = await board().handle(
        Request(
            method=request.method or "GET",
            path=path,
            query={k: v for k, v in request.GET.items()},
            headers={k.lower(): v for k, v in request.headers.items()},
            body=request.body if request.method == "POST" else b"",
            authorized=staff,
        )
    )
    response = HttpResponse(found.body, status=found.status, content_type=found.content_type)
    for name, value in (*SECURITY_HEADERS, *found.headers):
        response[name] = value
    return response


#: the dashboard's one view; it checks writes itself (see the module docstring)
dashboard_view = csrf_exempt(_dashboard_view)

urlpatterns = [re_path(r"^(?P<path>.*)$", dashboard_view, name="pgstagechain-dashboard")]
