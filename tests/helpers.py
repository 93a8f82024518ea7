"""What many tests need: a few statements, waiting for a condition with a deadline, a
worker in the background, and a real HTTP server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import psycopg
import psycopg.sql

from pgstagechain import Pipeline, Worker
from pgstagechain._membership import listened_channels

if TYPE_CHECKING:
    import uvicorn

T = TypeVar("T")

#: how long a test waits for something that should happen before it fails
WAIT_SECONDS = 60.0


def listen_to_all(pipeline: Pipeline) -> psycopg.sql.Composed:
    """LISTEN to a pipeline's own channel and every partition channel: what a test that
    wants to hear everything the pipeline announces runs."""
    return psycopg.sql.SQL("; ").join(
        psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel))
        for channel in listened_channels(pipeline, None)
    )


async def query(dsn: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(statement, params)
        return await cur.fetchall() if cur.description else []


async def value(dsn: str, statement: str, params: Any = None) -> Any:
    return (await query(dsn, statement, params))[0][0]


async def query_when_up(dsn: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    """:func:`query`, waiting out a server restart."""
    while True:
        try:
            return await query(dsn, statement, params)
        except psycopg.OperationalError:
            await anyio.sleep(0.1)


async def wait_until(
    check: Callable[[], Awaitable[bool]], what: str, *, within: float = WAIT_SECONDS
) -> None:
    """Poll ``check`` until it holds; fail with ``what`` if it never does."""
    with anyio.move_on_after(within):
        while True:
            if await check():
                return
            await anyio.sleep(0.02)
    raise AssertionError(f"gave up waiting for: {what}")


def holds(predicate: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """``predicate`` as a check for :func:`wait_until`."""

    async def check() -> bool:
        return predicate()

    return check


def wait_for(
    check: Callable[[], T], what: str = "a condition", *, within: float = WAIT_SECONDS
) -> T:
    """Blocking :func:`wait_until`: poll ``check`` until it returns something true."""
    deadline = time.monotonic() + within
    while not (found := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for: {what}")
        time.sleep(0.05)
    return found


def wait_listening(dsn: str, workers: int) -> None:
    """Block until ``workers`` workers hold their listener connection: a worker stopped
    while Python is still importing it dies of the signal instead of draining."""

    def listening() -> bool:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = 'pgstagechain-listener'"
            ).fetchone()
        return row is not None and row[0] >= workers

    wait_for(listening, f"{workers} workers to listen")


@asynccontextmanager
async def serving(worker: Worker) -> AsyncIterator[Worker]:
    """Run ``worker`` in the background; stop it (and wait for its drain) on exit."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await worker.wait_started()
        try:
            yield worker
        finally:
            worker.stop()


@contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve ``handler`` on a free port until the block ends; yield ``http://127.0.0.1:PORT``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def uvicorn_serving(
    app: Any, sock: socket.socket | None = None
) -> Iterator[tuple[str, uvicorn.Server]]:
    """Run an ASGI ``app`` under uvicorn in a thread (lifespan on); stop it on exit."""
    import uvicorn

    if sock is None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), "the server to start")
        assert thread.is_alive(), "the server did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(timeout=WAIT_SECONDS)
        sock.close()
        assert not thread.is_alive()
