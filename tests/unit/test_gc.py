"""The collector settings a worker process gets from `pgstagechain worker`."""

from __future__ import annotations

import gc

from pgstagechain import tune_gc


def test_tune_gc_freezes_start_up_objects_and_collects_the_young_less_often() -> None:
    before = gc.get_threshold()
    try:
        tune_gc(12_345)
        assert gc.get_threshold() == (12_345, *before[1:])
        assert gc.get_freeze_count() > 1000  # the modules imported so far
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
