"""HTTP stages: a stage that POSTs the row to a service and stores the JSON it answers.

This is the seed system's way of running a stage (each model behind its own endpoint),
with the gaps closed: the worker claims the row atomically before the call, failures
of the network or the server are retried under the stage's :class:`~pgstagechain.Retry`
policy (by default :data:`DEFAULT_RETRY`: 5 attempts), and a request the server refuses
fails the row at once::

    pipeline.add(HttpStage(
        name="vlm_analyze", after="img_gen", url="http://vlm:8000/analyze",
        key_field="job_variants_id", group_field="job_id",
        retry=Retry(max_attempts=5, base_delay=2.0),
    ))

What happens with the answer:

* 2xx: the JSON body becomes the stage's result (``pgstagechain.runs.result``, and
  ``ctx.results[stage]`` for later stages); an empty body gives ``None``.
* 5xx, 408, 429, and any transport error (refused connection, reset, timeout):
  :class:`HttpRetryableError`; the stage is retried while its retry policy allows.
* 3xx (redirects are not followed: point the stage at the final URL), any other 4xx,
  or a 2xx whose body is not JSON: :class:`HttpPermanentError` (a
  :class:`~pgstagechain.PermanentError`), the row fails without further attempts.

Execution is at least once: a worker that dies or hits its shutdown deadline mid-request
leaves the row to be tried again. Every request therefore carries an ``Idempotency-Key``
header (:attr:`~pgstagechain.StageContext.idempotency_key`), the same for every attempt
of this stage for this row and never used for another: a service that records the keys
it has acted on can answer a repeat with its first answer instead of acting twice.

All HTTP stages of a process share one :class:`httpx.AsyncClient` per event loop, made
on first use and closed when the loop shuts down (or by :func:`aclose_client`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any, Final

import anyio.lowlevel
import httpx

from ._context import StageContext
from ._stage import Retry, Stage
from .errors import PermanentError, PgStageChainError, StageDeclarationError

__all__ = [
    "DEFAULT_RETRY",
    "DEFAULT_TIMEOUT",
    "IDEMPOTENCY_HEADER",
    "HttpPermanentError",
    "HttpRetryableError",
    "HttpStage",
    "aclose_client",
    "http_stage",
    "shared_client",
]

logger = logging.getLogger("pgstagechain.http")

#: The seed's 300 s for a model to answer, but a dead host is noticed within 10 s.
DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
#: Statuses worth asking again: the server is overloaded, restarting or rate limiting.
RETRYABLE_STATUSES = frozenset({408, 429})
#: Without ``retry=``, a flaky service gets this many chances before the row fails.
DEFAULT_RETRY = Retry(max_attempts=5, base_delay=2.0, max_delay=60.0)
#: The header that carries ``ctx.idempotency_key``.
IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_BODY_IN_ERROR = 500

PayloadFunc = Callable[[StageContext[Any]], Mapping[str, Any]]


class _Unset:
    pass


_UNSET: Final = _Unset()


class HttpRetryableError(PgStageChainError):
    """The service could not be reached or failed (5xx, 408, 429): worth another attempt."""

    def __init__(self, message: str, *, url: str, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class HttpPermanentError(PermanentError):
    """The service refused the request (4xx) or answered something that is not JSON."""

    def __init__(self, message: str, *, url: str, status: int) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


# -- the shared client ---------------------------------------------------------------------

_clients: dict[object, tuple[httpx.AsyncClient, AsyncGenerator[None, None]]] = {}


async def shared_client() -> httpx.AsyncClient:
    """The process's client for the running event loop, created on first use.

    An :class:`httpx.AsyncClient` belongs to the event loop it was first used on, so each
    loop gets its own; it is closed when that loop shuts down (``asyncio.run`` finalises
    it), or earlier by :func:`aclose_client`.
    """
    token = anyio.lowlevel.current_token()
    found = _clients.get(token)
    if found is not None and not found[0].is_closed:
        return found[0]
    client = httpx.AsyncClient(timeout=DEFAULT_TIMEOUT, follow_redirects=False)
    closer = _close_at_loop_end(token, client)
    await closer.__anext__()  # parked at its yield until the loop finalises it
    _clients[token] = (client, closer)
    return client


async def _close_at_loop_end(
    token: object, client: httpx.AsyncClient
) -> AsyncGenerator[None, None]:
    # An asynchronous generator that the event loop closes when it shuts down
    # (asyncio.run calls loop.shutdown_asyncgens()): its finally closes the client there,
    # on the loop the client's connections belong to.
    try:
        yield
    finally:
        if _clients.get(token, (None,))[0] is client:
            del _clients[token]
        await client.aclose()


async def aclose_client() -> None:
    """Close the running loop's shared client now (a later HTTP stage makes a new one)."""
    found = _clients.pop(anyio.lowlevel.current_token(), None)
    if found is not None:
        client, closer = found
        await client.aclose()
        await closer.aclose()


# -- the stage -----------------------------------------------------------------------------


class HttpStage(Stage):
    """POST the row to ``url`` and keep the JSON answer as the stage's result.

    The request body is ``{key_field: ctx.key, group_field: ctx.group_key, **ctx.row}``
    (``ctx.row`` holds the pipeline's ``extra_columns``, such as the seed's
    ``tenant_id``), updated with ``payload(ctx)`` when given, e.g. the seed's
    ``overlay_id`` taken from an earlier stage's result. ``group_field`` is sent only
    when the row has a group. A group stage sends the group key under ``group_field``.
    Override :meth:`build_payload` for anything else.

    Failures are retried under ``retry`` (default :data:`DEFAULT_RETRY`); every attempt
    sends the same ``Idempotency-Key`` header.

    :param request_timeout: seconds (or an :class:`httpx.Timeout`) for one request; the
        stage's own ``timeout`` bounds the whole run.
    :param headers: sent with every request (authentication, tracing).
    """

    connection = False
    url: str = ""
    method: str = "POST"
    key_field: str = "key"
    group_field: str | None = "group"
    headers: Mapping[str, str] = {}
    request_timeout: float | httpx.Timeout = DEFAULT_TIMEOUT
    retry: Retry = DEFAULT_RETRY

    def __init__(
        self,
        *,
        url: str | None = None,
        payload: PayloadFunc | None = None,
        key_field: str | None = None,
        group_field: str | _Unset | None = _UNSET,
        method: str | None = None,
        headers: Mapping[str, str] | None = None,
        request_timeout: float | httpx.Timeout | None = None,
        **stage_options: Any,
    ) -> None:
        super().__init__(**stage_options)
        self.url = url or self.url
        if not self.url.startswith(("http://", "https://")):
            raise StageDeclarationError(self.name, f"needs an http(s) url, got {self.url!r}")
        self.payload = payload
        if key_field is not None:
            self.key_field = key_field
        if not isinstance(group_field, _Unset):
            self.group_field = group_field
        if method is not None:
            self.method = method.upper()
        if headers is not None:
            self.headers = dict(headers)
        if request_timeout is not None:
            self.request_timeout = request_timeout

    def build_payload(self, ctx: StageContext[Any]) -> dict[str, Any]:
        """The JSON body for one run."""
        body: dict[str, Any] = {}
        if not self.group:
            body[self.key_field] = ctx.key
        if self.group_field is not None and ctx.group_key is not None:
            body[self.group_field] = ctx.group_key
        body.update(ctx.row)
        if self.payload is not None:
            body.update(self.payload(ctx))
        return body

    async def run(self, ctx: StageContext[Any]) -> Any:
        client = await shared_client()
        # default=str: dates, decimals and UUIDs of extra columns travel as text.
        body = json.dumps(self.build_payload(ctx), default=str)
        try:
            response = await client.request(
                self.method,
                self.url,
                content=body,
                headers={
                    "Content-Type": "application/json",
                    "Accept": "application/json",
                    "X-Pgstagechain-Stage": ctx.stage,
                    "X-Pgstagechain-Attempt": str(ctx.attempt),
                    IDEMPOTENCY_HEADER: ctx.idempotency_key,
                    **self.headers,
                },
                timeout=self.request_timeout,
            )
        except httpx.TransportError as exc:
            raise HttpRetryableError(
                f"{self.method} {self.url} failed: {_transport_problem(exc, self.request_timeout)}",
                url=self.url,
            ) from exc
        return _interpret(self.method, self.url, response)

    def __repr__(self) -> str:
        return f"<HttpStage {self.name!r} after {self.after!r}: {self.method} {self.url}>"


TIMEOUTS = {
    httpx.ConnectTimeout: ("connect", "could not connect"),
    httpx.ReadTimeout: ("read", "no answer"),
    httpx.WriteTimeout: ("write", "could not send the request"),
    httpx.PoolTimeout: ("pool", "no free connection"),
}


def _transport_problem(exc: httpx.TransportError, timeout: float | httpx.Timeout) -> str:
    """What went wrong, in words: httpx's timeouts often carry no message at all."""
    for kind, (phase, what) in TIMEOUTS.items():
        if isinstance(exc, kind):
            limits = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
            seconds = getattr(limits, phase)
            bound = f"within {seconds:g}s" if seconds is not None else "(no time limit set)"
            return f"timed out: {what} {bound} ({type(exc).__name__})"
    detail = str(exc).strip()
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _interpret(method: str, url: str, response: httpx.Response) -> Any:
    status = response.status_code
    excerpt = response.text[:MAX_BODY_IN_ERROR]
    if status >= 500 or status in RETRYABLE_STATUSES:
        raise HttpRetryableError(
            f"{method} {url} answered {status}: {excerpt}", url=url, status=status
        )
    if 300 <= status < 400:
        target = response.headers.get("location", "no Location header")
        raise HttpPermanentError(
            f"{method} {url} answered {status}, a redirect to {target}: redirects are not "
            "followed, so this fails without a retry; point the stage at the final URL",
            url=url,
            status=status,
        )
    if status >= 300:
        raise HttpPermanentError(
            f"{method} {url} answered {status}: {excerpt}", url=url, status=status
        )
    if not response.content.strip():
        return None
    try:
        return json.loads(response.content)
    except ValueError:
        raise HttpPermanentError(
            f"{method} {url} answered {status} with a body that is not JSON: {excerpt}",
            url=url,
            status=status,
        ) from None


def http_stage(
    *,
    after: str,
    url: str,
    name: str,
    payload: PayloadFunc | None = None,
    key_field: str = "key",
    group_field: str | None = "group",
    **options: Any,
) -> HttpStage:
    """An :class:`HttpStage` from keyword arguments (every ``Stage`` option is accepted)."""
    return HttpStage(
        name=name,
        after=after,
        url=url,
        payload=payload,
        key_field=key_field,
        group_field=group_field,
        **options,
    )
