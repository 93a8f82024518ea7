"""An app whose import takes a while, so that a test can stop a worker while it starts.

Importing it creates the file named by ``PGSC_TEST_STARTING`` and then waits up to 30 s
for that file to be removed (or for the process to be stopped).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from tests.apps.seed import seed_pipeline

_marker = Path(os.environ["PGSC_TEST_STARTING"])
_marker.touch()
_deadline = time.monotonic() + 30
while _marker.exists() and time.monotonic() < _deadline:
    time.sleep(0.02)


async def noop(ctx: Any) -> None:
    return None


pipeline = seed_pipeline(noop)
