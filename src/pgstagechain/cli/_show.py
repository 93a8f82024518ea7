"""Commands that show a pipeline: ``graph`` (drawn from its registry, optionally with live
counts) and ``dashboard`` (the web dashboard, served by uvicorn)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import anyio

from .. import admin, graph
from .._connect import connect
from ._common import UsageError, dsn, load_pipeline

#: the window over which ``graph --live`` counts recent runs (its throughput figure)
LIVE_WINDOW = 300.0


def _graph(args: argparse.Namespace) -> int:
    pipeline = load_pipeline(args.pipeline)
    live = None
    if args.live:

        async def read() -> admin.PipelineLive:
            async with await connect(dsn(args), autocommit=True) as conn:
                return await admin.live(conn, pipeline, window=LIVE_WINDOW)

        live = graph.live_counts(anyio.run(read))
    drawing = graph.render(pipeline, args.format, live)
    if args.output:
        Path(args.output).write_text(drawing, encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(drawing)
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise UsageError(
            "the dashboard is served by uvicorn: pip install 'pgstagechain[dashboard]'"
        ) from None
    from ..dashboard import ENV_TOKEN, dashboard_app

    pipeline = load_pipeline(args.pipeline)
    token = os.environ.get(ENV_TOKEN) or None
    if args.writes and not token:
        raise UsageError(f"--writes needs a token in ${ENV_TOKEN} (the browser sends it)")
    app = dashboard_app(pipeline, dsn(args) or None, writes=args.writes, token=token)
    print(f"pgstagechain dashboard of {pipeline.name}: http://{args.host}:{args.port}/")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _dsn_option(parser: argparse.ArgumentParser) -> None:
    """``--dsn`` after the command as well as before it."""
    parser.add_argument("--dsn", default=argparse.SUPPRESS, help="connection string")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add graph and dashboard to the command line."""
    p = sub.add_parser("graph", help="draw the pipeline: Mermaid, Graphviz DOT or SVG")
    p.add_argument("pipeline", metavar="MODULE:PIPELINE")
    p.add_argument("--format", choices=graph.FORMATS, default="mermaid")
    p.add_argument(
        "--live",
        action="store_true",
        help=f"annotate each stage with its live counts and throughput (last {LIVE_WINDOW:.0f} s)",
    )
    _dsn_option(p)
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(run=_graph)

    p = sub.add_parser("dashboard", help="serve the web dashboard (needs uvicorn)")
    p.add_argument("pipeline", metavar="MODULE:PIPELINE")
    _dsn_option(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument(
        "--writes",
        action="store_true",
        help="enable retry, cancel and rerun; requests must carry the token in $PGSTAGECHAIN_DASHBOARD_TOKEN",
    )
    p.set_defaults(run=_dashboard)
