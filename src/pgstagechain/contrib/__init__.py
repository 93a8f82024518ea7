"""Integrations with web frameworks: :mod:`pgstagechain.contrib.fastapi` (any ASGI app)
and :mod:`pgstagechain.contrib.django` (an installable Django app).

Each is imported on its own, so the framework stays an optional dependency. What they
share needs no framework and is importable from here:

* :func:`run_workers`: run workers inside your own event loop for a block;
* :func:`run_elected_workers`: the same, in one process only of those sharing a database;
* :func:`pipeline_status`: :func:`pgstagechain.admin.status` as JSON-able data;
* :func:`run_stage`: claim one row for a stage, run its handler here, complete it.
"""

from __future__ import annotations

from ._embed import run_elected_workers as run_elected_workers
from ._embed import run_workers as run_workers
from ._status import ManualRun as ManualRun
from ._status import pipeline_status as pipeline_status
from ._status import run_stage as run_stage

__all__ = ["ManualRun", "pipeline_status", "run_elected_workers", "run_stage", "run_workers"]
