"""``manage.py pgstagechain_worker``: run the configured pipelines' workers until stopped.

SIGTERM or a first Ctrl-C stops claiming and lets runs in flight finish (within
``shutdown_timeout``); a second Ctrl-C stops at once.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import anyio
from anyio.abc import TaskStatus
from django.core.management.base import BaseCommand, CommandParser  # type: ignore[import-untyped]

from ..... import Worker
from ...._embed import run_workers
from ... import conf
from ...runner import close_orm_connections, command_error

logger = logging.getLogger("pgstagechain.contrib.django")


class Command(BaseCommand):  # type: ignore[misc]
    help = "Run pgstagechain workers for the configured pipelines until SIGTERM / Ctrl-C."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "pipelines", nargs="*", metavar="PIPELINE", help="pipeline names (default: all)"
        )
        parser.add_argument("--database", help="DATABASES alias (default: PGSTAGECHAIN_DATABASE)")
        parser.add_argument("--stages", help="comma-separated stages to serve (default: all)")
        parser.add_argument("--concurrency", type=int)
        parser.add_argument("--lease", type=float, help="seconds")
        parser.add_argument("--scan-interval", type=float, help="seconds")
        parser.add_argument("--shutdown-timeout", type=float, help="seconds")
        parser.add_argument("--poll", action="store_true", help="poll-only mode (no LISTEN)")
        parser.add_argument("--poll-interval", type=float, help="seconds")
        parser.add_argument("--worker-id")

    def handle(self, *args: Any, **options: Any) -> None:
        pipelines = conf.pipelines(options["pipelines"] or None)
        dsn = conf.conninfo(options["database"])
        worker_options = conf.worker_options()
        for key in (
            "concurrency",
            "lease",
            "scan_interval",
            "shutdown_timeout",
            "poll_interval",
            "worker_id",
        ):
            if options[key] is not None:
                worker_options[key] = options[key]
        if options["stages"]:
            worker_options["stages"] = options["stages"].split(",")
        if options["poll"]:
            worker_options["listen"] = False

        async def main() -> None:
            try:
                async with anyio.create_task_group() as outer:
                    async with run_workers(pipelines, dsn, **worker_options) as workers:
                        stopping = anyio.Event()
                        await outer.start(_signals, workers, stopping, outer.cancel_scope)
                        names = ", ".join(p.name for p in pipelines)
                        self.stdout.write(f"pgstagechain worker running: {names}")
                        self.stdout.flush()
                        await stopping.wait()
                    # Drained: every run in flight finished or was handed back.
                    outer.cancel_scope.cancel()
            finally:
                await close_orm_connections()
            self.stdout.write("pgstagechain worker stopped")
            for worker in workers:
                self.stdout.write(f"  {worker.pipeline.name}: {worker.stats}")

        try:
            anyio.run(main)
        except Exception as exc:
            # A database that refuses us or a pipeline to install: one clear line.
            error = command_error(exc)
            if error is None:
                raise
            raise error from None


async def _signals(
    workers: list[Worker],
    stopping: anyio.Event,
    scope: anyio.CancelScope,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """SIGTERM or a first SIGINT: stop claiming and drain; a second SIGINT: stop at once."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
        task_status.started()
        async for signum in received:
            if stopping.is_set():
                if signum == signal.SIGINT:
                    logger.warning("second interrupt: stopping now")
                    scope.cancel()
                    return
                continue
            logger.info("%s: finishing in-flight runs, then stopping", signal.Signals(signum).name)
            for worker in workers:
                worker.stop()
            stopping.set()
