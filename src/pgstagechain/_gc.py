"""Garbage-collector settings for a process whose main job is running a worker."""

from __future__ import annotations

import gc

#: Net allocations between collections of the youngest generation. Python's default of
#: 700 makes a busy worker walk the objects of its hundreds of in-flight runs again and
#: again; those runs end within milliseconds and free their objects by reference counting.
YOUNG_THRESHOLD = 20_000


def tune_gc(young: int = YOUNG_THRESHOLD) -> None:
    """Freeze what start-up allocated (modules, loaded models: never scanned again) and
    collect the youngest generation less often.

    Meant for a process that mostly runs a worker; ``pgstagechain worker`` calls it. It
    changes the whole process's collector, so an application that embeds a worker decides
    for itself. Unreachable cycles then wait a little longer to be freed (at most
    ``young`` objects' worth).
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, old)
