"""Repo root on sys.path (``examples.feedly`` is a namespace package there) and a tiny real
OpenAI-compatible chat-completions server on 127.0.0.1 for the HTTP backend tests."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.helpers import http_server  # noqa: E402  (the repository root is on the path now)

Reply = Callable[[dict[str, Any]], str]


@contextmanager
def chat_server(reply: Reply) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Serve POST /v1/chat/completions; yields (base_url, received request records)."""
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append(
                {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
            )
            if self.path != "/v1/chat/completions":
                self.send_response(404)
                self.end_headers()
                return
            try:
                content = reply(body)
            except Exception as exc:  # surface assertion failures in the reply as HTTP 500
                received[-1]["error"] = repr(exc)
                self.send_response(500)
                self.end_headers()
                return
            payload = json.dumps(
                {
                    "id": "x",
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    with http_server(Handler) as base:
        yield base + "/v1", received


@pytest.fixture
def openai_server() -> Callable[[Reply], Any]:
    """Factory fixture: ``with openai_server(reply) as (base_url, received): ...``."""
    return chat_server
