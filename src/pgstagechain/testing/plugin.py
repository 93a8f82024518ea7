"""pytest fixtures: a real PostgreSQL server for the session, a fresh database per test."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import LiteralString

import attrs
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .._sql import Statements
from ._cluster import TemporaryCluster

ENV_DSN = "PGSTAGECHAIN_TEST_DSN"
TEMPLATE = "pgstagechain_template"


@attrs.define
class TestServer:
    """The session's server. ``cluster`` is None when it came from ``PGSTAGECHAIN_TEST_DSN``
    (then tests that must restart the server are skipped)."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    dsn: str
    cluster: TemporaryCluster | None
    counter: Iterator[int] = attrs.field(factory=lambda: itertools.count(1))

    def dsn_for(self, dbname: str) -> str:
        return make_conninfo(self.dsn, dbname=dbname)

    def create_database(self, prefix: str = "test") -> str:
        name = f"{prefix}_{os.getpid()}_{next(self.counter)}"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(_database("drop_database", name))
            conn.execute(_database("create_database_from_template", name))
        return name

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(_database("drop_database", name))


def _database(statement: str, name: str) -> LiteralString:
    """A statement of ``testing.sql`` for database ``name`` (cloned from the template)."""
    names: dict[str, sql.Composable] = {
        "database": sql.Identifier(name),
        "template": sql.Identifier(TEMPLATE),
    }
    return Statements(names).text(statement)


def _prepare_template(dsn: str) -> None:
    import anyio

    from .._install import migrate

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(_database("drop_database", TEMPLATE))
        conn.execute(_database("create_database", TEMPLATE))
    anyio.run(migrate, make_conninfo(dsn, dbname=TEMPLATE))


@pytest.fixture(scope="session")
def pgstagechain_server() -> Iterator[TestServer]:
    given = os.environ.get(ENV_DSN)
    if given:
        conninfo_to_dict(given)  # fail early on a bad value
        _prepare_template(given)
        yield TestServer(dsn=given, cluster=None)
        return
    cluster = TemporaryCluster()  # under /tmp: the server's own user must reach it
    cluster.start()
    try:
        _prepare_template(cluster.dsn())
        yield TestServer(dsn=cluster.dsn(), cluster=cluster)
    finally:
        cluster.remove()


@pytest.fixture
def pgstagechain_dsn(pgstagechain_server: TestServer) -> Iterator[str]:
    name = pgstagechain_server.create_database()
    try:
        yield pgstagechain_server.dsn_for(name)
    finally:
        pgstagechain_server.drop_database(name)
