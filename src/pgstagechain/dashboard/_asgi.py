"""The dashboard as a plain ASGI application: no web framework needed to serve it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from ._core import SECURITY_HEADERS, Dashboard, Request, Response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: the largest request body read (a write names one key, group or stage)
MAX_BODY = 16 * 1024


def request_of(scope: Scope, body: bytes, *, authorized: bool = False) -> Request:
    """The dashboard's view of an ASGI request, its path relative to where it is mounted."""
    path: str = scope.get("path", "/")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
    return Request(
        method=scope["method"],
        path=path.lstrip("/"),
        query=query,
        headers=headers,
        body=body,
        authorized=authorized,
    )


async def send_response(send: Send, response: Response, *, head: bool = False) -> None:
    headers = [
        (b"content-type", response.content_type.encode()),
        (b"content-length", str(len(response.body)).encode()),
        *((k.encode(), v.encode()) for k, v in (*SECURITY_HEADERS, *response.headers)),
    ]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else response.body})


async def read_body(receive: Receive) -> bytes | None:
    """The request's body, or None when it is larger than :data:`MAX_BODY`."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class DashboardApp:
    """An ASGI app serving one :class:`Dashboard`; closes its pool on lifespan shutdown."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.dashboard.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope.get("path", "/") == scope.get("root_path", "") and scope["method"] == "GET":
            # mounted at /prefix and asked for /prefix: the page's relative links need the slash
            here = scope.get("root_path", "") + "/"
            await send_response(send, Response(status=307, body=b"", headers=(("location", here),)))
            return
        body = await read_body(receive)
        if body is None:
            await send_response(send, Response(status=413, body=b'{"error": "body too large"}'))
            return
        response = await self.dashboard.handle(request_of(scope, body))
        await send_response(send, response, head=scope["method"] == "HEAD")
