"""Settings of the Django app, read when used (never at import time).

* ``PGSTAGECHAIN_PIPELINES``: ``["module.path:attribute", ...]``, each a
  :class:`~pgstagechain.Pipeline` or a function returning one.
* ``PGSTAGECHAIN_DATABASE``: the ``DATABASES`` alias to use (default ``"default"``).
* ``PGSTAGECHAIN_WORKER``: keyword arguments for every :class:`~pgstagechain.Worker`
  (``{"concurrency": 20, "shutdown_timeout": 60}``); command-line options win.
* ``PGSTAGECHAIN_MIGRATE_ON_MIGRATE``: install on ``manage.py migrate`` (default True).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from django.conf import settings  # type: ignore[import-untyped]
from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]
from psycopg.conninfo import make_conninfo

from ... import Pipeline

#: Django's own keys in ``OPTIONS`` of the PostgreSQL backend; every other key is passed
#: to libpq as is (``sslmode``, ``sslrootcert``, ``connect_timeout``, ``service``, ...).
DJANGO_OPTIONS = frozenset(
    {"isolation_level", "server_side_binding", "pool", "assume_role", "cursor_factory"}
)
SETTINGS_KEYS = {
    "NAME": "dbname",
    "USER": "user",
    "PASSWORD": "password",
    "HOST": "host",
    "PORT": "port",
}


def database_alias() -> str:
    return str(getattr(settings, "PGSTAGECHAIN_DATABASE", "default"))


def conninfo(alias: str | None = None) -> str:
    """A libpq connection string for the Django database ``alias``.

    ``NAME``, ``USER``, ``PASSWORD``, ``HOST`` and ``PORT`` map to their libpq keys;
    ``OPTIONS`` are passed on except Django's own. Empty values are left out, so
    libpq's defaults (``PGHOST``, ``~/.pgpass``, ...) apply as they do for Django.
    """
    alias = alias or database_alias()
    try:
        database: Mapping[str, Any] = settings.DATABASES[alias]
    except KeyError:
        raise ImproperlyConfigured(
            f"PGSTAGECHAIN_DATABASE: no database {alias!r} in DATABASES"
        ) from None
    engine = str(database.get("ENGINE", ""))
    if "postgresql" not in engine and "postgis" not in engine:
        raise ImproperlyConfigured(f"database {alias!r} is not PostgreSQL (ENGINE {engine!r})")
    params: dict[str, Any] = {}
    for key, libpq in SETTINGS_KEYS.items():
        value = database.get(key)
        if value not in (None, ""):
            params[libpq] = str(value)
    for key, value in (database.get("OPTIONS") or {}).items():
        if (
            key not in DJANGO_OPTIONS
            and isinstance(value, str | int | float)
            and not isinstance(value, bool)
        ):
            params[key] = str(value)
    return make_conninfo("", **params)


def load(spec: str) -> Pipeline:
    """Import ``module:attribute`` and return the pipeline it names."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ImproperlyConfigured(
            f"PGSTAGECHAIN_PIPELINES: expected 'module:attribute', got {spec!r}"
        )
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ImproperlyConfigured(f"PGSTAGECHAIN_PIPELINES: cannot load {spec!r}: {exc}") from exc
    if callable(found) and not isinstance(found, Pipeline):
        found = found()
    if not isinstance(found, Pipeline):
        raise ImproperlyConfigured(
            f"PGSTAGECHAIN_PIPELINES: {spec} is a {type(found).__name__}, not a Pipeline"
        )
    return found


def pipelines(names: list[str] | None = None) -> list[Pipeline]:
    """The configured pipelines, or those of them called ``names``."""
    specs = getattr(settings, "PGSTAGECHAIN_PIPELINES", [])
    if isinstance(specs, str):
        raise ImproperlyConfigured("PGSTAGECHAIN_PIPELINES must be a list of 'module:attribute'")
    found = [load(spec) for spec in specs]
    if names:
        by_name = {p.name: p for p in found}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ImproperlyConfigured(
                f"no configured pipeline named {', '.join(missing)} (have: {', '.join(by_name) or 'none'})"
            )
        found = [by_name[n] for n in names]
    return found


def worker_options() -> dict[str, Any]:
    """``PGSTAGECHAIN_WORKER`` as a dict of :class:`~pgstagechain.Worker` keyword arguments."""
    options = getattr(settings, "PGSTAGECHAIN_WORKER", {}) or {}
    if not isinstance(options, Mapping):
        raise ImproperlyConfigured("PGSTAGECHAIN_WORKER must be a dict of Worker options")
    return dict(options)


def migrate_on_migrate() -> bool:
    return bool(getattr(settings, "PGSTAGECHAIN_MIGRATE_ON_MIGRATE", True))
