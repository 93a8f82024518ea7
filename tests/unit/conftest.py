"""Unit tests run without a database: a test here that asks for one is a mistake."""

from __future__ import annotations

import pytest

DATABASE_FIXTURES = {"pgstagechain_server", "pgstagechain_dsn"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        wanted = DATABASE_FIXTURES & set(getattr(item, "fixturenames", ()))
        if wanted and "/unit/" in str(item.path):
            raise pytest.UsageError(
                f"{item.nodeid} is a unit test but uses {', '.join(sorted(wanted))}:"
                " move it to tests/integration"
            )
