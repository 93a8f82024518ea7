"""What the hints make of notifications when workers share the keys out: keys owned by
another worker are left to it, and a burst is claimed as ready rows in full batches."""

from __future__ import annotations

import json
from typing import Any

from pgstagechain._hints import Hints
from pgstagechain._runs import WorkerStats
from tests.apps.seed import ROW_STAGES, seed_pipeline


async def noop(ctx: Any) -> None:
    return None


def hints(*, burst: int = 100) -> Hints:
    pipeline = seed_pipeline(noop)
    found = Hints(
        pipeline,
        [s.name for s in pipeline],
        WorkerStats(),
        lambda: None,
        max_pending=10_000,
        burst=dict.fromkeys((s.name for s in pipeline), burst),
    )
    for stage in found.needs_scan:  # the start-up scans are done
        found.needs_scan[stage] = False
        found.retry_due[stage] = False
    return found


def release(found: Hints, keys: range) -> None:
    for key in keys:
        found.on_notify("ch", json.dumps(["r", "img_gen", str(key), "1"]))


def test_keys_another_worker_owns_are_left_to_it() -> None:
    found = hints()
    found.owns = lambda stage, key, partition: int(key) % 3 == 0
    found.shared = lambda stage: True
    release(found, range(30))
    pick = found.pick(ROW_STAGES[0], 100)
    assert pick is not None and pick.mode == "keys"
    assert pick.keys == [str(k) for k in range(0, 30, 3)]
    assert found.stats.left_to_peers == 20


def test_a_burst_is_claimed_as_ready_rows_whoever_owns_the_keys() -> None:
    found = hints(burst=25)
    found.owns = lambda stage, key, partition: int(key) % 8 == 0  # one of eight workers
    found.shared = lambda stage: True
    release(found, range(40))  # 40 heard at once, 5 of them ours
    pick = found.pick(ROW_STAGES[0], 100)
    assert pick is not None and pick.mode == "ready"
    assert not found.pending[ROW_STAGES[0]]  # the ready claims cover them
    found.claimed(ROW_STAGES[0], pick, 100, 40)  # short: none left
    assert found.pick(ROW_STAGES[0], 100) is None


def test_a_worker_sharing_keys_claims_its_own_a_batch_at_a_time() -> None:
    found = hints(burst=10_000)
    found.owns = lambda stage, key, partition: int(key) % 2 == 0
    found.shared = lambda stage: True
    release(found, range(40))
    first = found.pick(ROW_STAGES[0], 5)  # 20 of ours, 5 free slots: no ready rows
    assert first is not None and first.mode == "keys" and first.keys == ["0", "2", "4", "6", "8"]
    assert len(found.pending[ROW_STAGES[0]]) == 15


def test_a_worker_hearing_a_share_of_the_partitions_judges_a_burst_on_them_all() -> None:
    """A worker that hears an eighth of the partitions counts each key it hears as eight:
    the workers estimate the same total, and switch to ready rows together."""
    for hearing, mode in [(1 / 8, "ready"), (1.0, "keys")]:
        found = hints(burst=80)
        found.hearing = hearing
        found.owns = lambda stage, key, partition: True
        found.shared = lambda stage: True
        release(found, range(11))  # 11 heard: 88 announced in all, for an eighth
        pick = found.pick(ROW_STAGES[0], 100)
        assert pick is not None and pick.mode == mode, hearing


def test_the_partition_of_a_channel_reaches_the_owner_check() -> None:
    found = hints()
    asked: list[int | None] = []
    found.owns = lambda stage, key, partition: asked.append(partition) or False
    pipeline = found.pipeline
    payload = json.dumps(["r", "img_gen", "7", "1"])
    found.on_notify(pipeline.partition_channel(5), payload)
    found.on_notify(pipeline.channel, payload)  # announced on the pipeline's own channel
    found.on_notify(pipeline.channel + ".99", payload)  # no such partition: treated the same
    assert asked == [5, None, None]
    assert found.stats.left_to_peers == 3
