"""What a peer's worker process records for the benchmark, and how it reports it.

Each handler notes when it started; each handler that enqueues the next stage's job notes
when it sent the enqueue and when the enqueue returned (its commit acknowledged), so the
benchmark can time every hand-over from that acknowledgement to the next handler's start.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

#: (stage, key, wall-clock start) of every handler call
STARTS: list[tuple[int, int, float]] = []
#: (stage, key, sent, acknowledged) of every job a handler enqueued for the next stage
ENQUEUED: list[tuple[int, int, float, float]] = []


def started(stage: int, key: int) -> None:
    STARTS.append((stage, key, time.time()))


def enqueued(stage: int, key: int, sent: float) -> None:
    ENQUEUED.append((stage, key, sent, time.time()))


def worker_arguments(description: str) -> argparse.Namespace:
    """The command line every peer worker takes (the settings peers.py keeps equal)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--stages", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=400, help="jobs in flight")
    parser.add_argument("--batch-size", type=int, default=200, help="where the peer batches")
    parser.add_argument("--pool-size", type=int, default=10, help="connections for handlers")
    parser.add_argument("--out", required=True, help="JSON file written on exit")
    return parser.parse_args()


def ready() -> None:
    print(f"READY {os.getpid()}", flush=True)


def write(out: str, **extra: object) -> None:
    Path(out).write_text(
        json.dumps({"pid": os.getpid(), "starts": STARTS, "enqueued": ENQUEUED, **extra})
    )
