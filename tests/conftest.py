"""The test suite, by kind:

* ``tests/unit``: no database, no server; the library's pieces on their own.
* ``tests/integration``: against a real PostgreSQL (the ``pgstagechain_dsn`` fixture gives
  each test its own database, cloned from a migrated template).
* ``tests/chaos``: processes killed, the server crashed and restarted, connections cut.
* ``tests/feedly``: the showcase app.

``tests/apps`` holds the small pipelines tests run in worker processes, and
``tests/helpers.py`` what many tests share.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
