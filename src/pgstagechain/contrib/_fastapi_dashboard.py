"""The dashboard as a FastAPI router: its reads behind the app's auth, its writes behind
their own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Request, Response, params

from .. import ConfigurationError, Pipeline
from ..dashboard import SECURITY_HEADERS, Dashboard
from ..dashboard import Request as DashboardRequest


def dashboard_router(
    pipeline: Pipeline,
    dsn: str | None = None,
    *,
    dependencies: Sequence[params.Depends] | None = None,
    writes: bool = False,
    write_dependencies: Sequence[params.Depends] | None = None,
    token: str | None = None,
    **options: Any,
) -> APIRouter:
    """The web dashboard of ``pipeline`` as routes, mount with ``prefix="/dashboard"``.

    :param dependencies: run before every route (reads too): your authentication.
    :param writes: enable retry, cancel and rerun; a write then needs ``write_dependencies``
        (your own check that the caller may change things) or the ``token``, and is
        refused cross-site whatever the dependencies say.
    :param options: passed to :class:`pgstagechain.dashboard.Dashboard` (``window``,
        ``minutes``, ``pool_size``, ``cache_seconds``, ``wait``).
    """
    if writes and not (write_dependencies or token):
        raise ConfigurationError(
            "dashboard_router(writes=True) lets callers retry, cancel and re-run: pass "
            "write_dependencies=[Depends(...)] that authorises them, or a token"
        )
    board = Dashboard(pipeline, dsn, writes=writes, token=token, **options)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await board.close()

    router = APIRouter(
        tags=["pgstagechain"], dependencies=list(dependencies or []), lifespan=lifespan
    )

    async def answer(request: Request, path: str, *, authorized: bool) -> Response:
        found = await board.handle(
            DashboardRequest(
                method=request.method,
                path=path,
                query=dict(request.query_params),
                headers={k.lower(): v for k, v in request.headers.items()},
                body=await request.body() if request.method == "POST" else b"",
                authorized=authorized,
            )
        )
        return Response(
            found.body,
            status_code=found.status,
            media_type=found.content_type,
            headers=dict(_dashboard_headers(found.headers)),
        )

    @router.api_route("/{path:path}", methods=["GET", "HEAD"], include_in_schema=False)
    async def read(request: Request, path: str) -> Response:
        return await answer(request, path, authorized=False)

    @router.post(
        "/{path:path}", dependencies=list(write_dependencies or []), include_in_schema=False
    )
    async def write(request: Request, path: str) -> Response:
        return await answer(request, path, authorized=bool(write_dependencies))

    return router


def _dashboard_headers(extra: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    return [*SECURITY_HEADERS, *extra]
