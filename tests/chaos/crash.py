"""Crashing the test server at the worst moment: with asynchronous commits not yet written.

A crash (``pg_ctl stop -m immediate``, a power cut, an OOM kill) loses the asynchronous
commits the WAL writer had not written yet, normally those of the last ~0.2 s. Holding
the WAL writer (SIGSTOP) makes that window as long as needed, so a test can crash the
server right after the statements it wants lost. Synchronous commits are not affected:
a backend flushes its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

from pgstagechain.testing._cluster import TemporaryCluster


def wal_writer_pid(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        [(pid,)] = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'"
        ).fetchall()
    return int(pid)


def _quit_pending(pid: int) -> bool:
    """True once the process was told to quit (or is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    pending = 0
    for line in status.splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")):
            pending |= int(line.split()[1], 16)
    return bool(pending & (1 << (signal.SIGQUIT - 1)))


@contextlib.contextmanager
def wal_writer_held(dsn: str) -> Iterator[int]:
    """Stop the WAL writer for the block; it is resumed if the block did not crash it."""
    pid = wal_writer_pid(dsn)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def crash(cluster: TemporaryCluster, held: int | None = None) -> None:
    """``pg_ctl restart -m immediate``. A held WAL writer is resumed only once the
    postmaster told it to quit, so it exits before writing anything (without that, the
    postmaster would wait a few seconds and then kill it)."""
    if held is None:
        cluster.restart("immediate")
        return
    stopping = threading.Thread(target=cluster.stop, args=("immediate",))
    stopping.start()
    deadline = time.monotonic() + 10
    while not _quit_pending(held) and time.monotonic() < deadline:
        time.sleep(0.001)
    with contextlib.suppress(ProcessLookupError):
        os.kill(held, signal.SIGCONT)
    stopping.join()
    cluster.start()
