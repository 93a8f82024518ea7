"""What every command shares: exit statuses, naming a pipeline, the database to use."""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .. import ConfigurationError, Pipeline, Worker
from .._connect import default_dsn

#: Everything asked for was done.
EXIT_OK = 0
#: ``retry`` or ``cancel`` named a row or group that was not failed / in progress;
#: ``rerun`` found nothing to re-run.
EXIT_NOTHING_MATCHED = 1
#: Bad usage, a pipeline that cannot be loaded, a configuration or database error.
EXIT_ERROR = 2
#: An unexpected exception (a bug, or one raised while importing the pipeline's module),
#: printed with its traceback: kept apart from 1 so scripts never mistake it for "nothing matched".
EXIT_INTERNAL = 70
#: Stopped by Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130

Command = Callable[[argparse.Namespace], int]


class UsageError(ConfigurationError):
    """The command line names something that cannot be used (exit status 2)."""


def load_pipeline(spec: str) -> Pipeline:
    """Import ``module:attribute`` and return the pipeline it names.

    Raises :class:`UsageError` (a :class:`~pgstagechain.errors.ConfigurationError`) when
    the name is malformed, the module cannot be imported or the attribute is not a pipeline.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"expected MODULE:PIPELINE (like myapp.pipelines:pipeline), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from None
    try:
        found = getattr(module, attribute)
    except AttributeError:
        raise UsageError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if callable(found) and not isinstance(found, Pipeline):
        found = found()
    if not isinstance(found, Pipeline):
        raise UsageError(f"{spec} is a {type(found).__name__}, not a pgstagechain Pipeline")
    return found


def dsn(args: argparse.Namespace) -> str:
    """``--dsn``, else ``$PGSTAGECHAIN_DSN``, else empty (libpq's defaults)."""
    return default_dsn(args.dsn)


def worker_default(option: str) -> Any:
    """The :class:`~pgstagechain.Worker`'s own default for ``option``: the CLI repeats none."""
    return inspect.signature(Worker).parameters[option].default


def shown_keys(keys: Sequence[str], limit: int = 20) -> str:
    """The first ``limit`` keys, for a line a person reads."""
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
