"""Helpers for testing code that uses pgstagechain against a real PostgreSQL.

The pytest plugin (loaded automatically when pgstagechain is installed) provides:

* ``pgstagechain_server``: a session-wide server: the one named by the
  ``PGSTAGECHAIN_TEST_DSN`` environment variable, or a throwaway cluster;
* ``pgstagechain_dsn``: a fresh, empty database on it for each test, with the
  pgstagechain schema installed, dropped afterwards.
"""

from __future__ import annotations

from ._cluster import TemporaryCluster as TemporaryCluster
from ._cluster import find_bindir as find_bindir
from ._cluster import free_port as free_port

__all__ = ["TemporaryCluster", "find_bindir", "free_port"]
