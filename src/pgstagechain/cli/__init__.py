"""The ``pgstagechain`` command: install, run and repair pipelines from the shell.

A pipeline is named as ``module.path:attribute`` (the attribute is a
:class:`~pgstagechain.Pipeline` or a function returning one). The database comes from
``--dsn``, else the ``PGSTAGECHAIN_DSN`` environment variable, else libpq's defaults
(``PGHOST``, ``PGDATABASE``, ...).

Exit status (see :data:`EXIT_OK` and the others): 0 done; 1 a ``retry`` or ``cancel``
named a row or group that was not in a state to act on, or ``rerun`` found nothing to re-run; 2 a usage, configuration or
database error, printed as one line on stderr; 70 an unexpected failure, with its
traceback; 130 interrupted.

The commands live in :mod:`._run` (migrate, uninstall, recover, worker) and
:mod:`._operate` (status, inspect, retry, cancel), :mod:`._rerun` (rerun), :mod:`._prune`
(prune) and :mod:`._show` (graph, dashboard); this module parses the command line and turns
errors into exit statuses.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence

import psycopg

from .. import PgStageChainError
from .._connect import ENV_DSN, redact
from .._logging import JsonFormatter
from ..errors import found_in
from . import _operate, _prune, _rerun, _run, _show
from ._common import (
    EXIT_ERROR,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_NOTHING_MATCHED,
    EXIT_OK,
    UsageError,
    dsn,
    load_pipeline,
)

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_NOTHING_MATCHED",
    "EXIT_OK",
    "UsageError",
    "build_parser",
    "load_pipeline",
    "main",
]

DESCRIPTION = "Install, run and repair pgstagechain pipelines from the shell."
EPILOG = f"""\
MODULE:PIPELINE names a Pipeline like uvicorn names an app: myapp.pipelines:feedly
imports myapp.pipelines (the current directory is on the path) and takes its
attribute feedly, a Pipeline or a function returning one.

The database is --dsn, else ${ENV_DSN}, else libpq's defaults (PGHOST,
PGDATABASE, PGUSER, ~/.pgpass, ...).

exit status:
  {EXIT_OK}    done
  {EXIT_NOTHING_MATCHED}    retry or cancel named a row or group that was not failed / in progress;
       rerun found nothing to re-run
  {EXIT_ERROR}    usage, configuration or database error (one line on stderr)
  {EXIT_INTERNAL}   unexpected failure, printed with its traceback
  {EXIT_INTERRUPTED}  interrupted
"""

#: The libpq environment variables worth naming in an error (never PGPASSWORD).
LIBPQ_ENV = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgstagechain",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dsn", help=f"connection string (default: ${ENV_DSN} or libpq defaults)")
    parser.add_argument(
        "--log-level", default="INFO", help="DEBUG, INFO, WARNING, ... (default INFO)"
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="json: one JSON object a line, with the run's pipeline, stage, key and attempt",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _run.register(sub)
    _operate.register(sub)
    _rerun.register(sub)
    _prune.register(sub)
    _show.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; errors become one line on stderr and the exit status above."""
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if args.log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    try:
        return int(args.run(args) or EXIT_OK)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        cause = _known_error(exc)
        if cause is None:
            traceback.print_exc()
            return EXIT_INTERNAL
        message = _one_line(str(cause)) or type(cause).__name__
        if isinstance(cause, psycopg.Error):
            message += f" ({_where(args)})"
        print(f"error: {message}", file=sys.stderr)
        return EXIT_ERROR


def _one_line(text: str) -> str:
    """A multi-line message (libpq adds hints on lines of their own) as one line."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _where(args: argparse.Namespace) -> str:
    """Which database a connection error is about, never with its password."""
    given = dsn(args)
    if given:
        return f"database {redact(given)}"
    chosen = [f"{k}={os.environ[k]}" for k in LIBPQ_ENV if os.environ.get(k)]
    return f"no --dsn or {ENV_DSN} given; libpq defaults" + (
        f" with {' '.join(chosen)}" if chosen else ""
    )


def _known_error(exc: BaseException) -> BaseException | None:
    """The library or database error behind ``exc``, looking inside task-group wrappers."""
    return found_in(exc, (PgStageChainError, OSError, psycopg.Error))


if __name__ == "__main__":
    raise SystemExit(main())
