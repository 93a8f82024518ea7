"""A worker held back by a stage's limits: it stops picking the stage, claims again when a
slot is freed (even one freed while its claim ran) or when the next token is due, and a
scan that finds ready rows releases it too."""

from __future__ import annotations

from typing import Any

from pgstagechain import Pipeline
from pgstagechain._claim import Held
from pgstagechain._hints import Hints
from pgstagechain._runs import WorkerStats
from tests.helpers import wait_for


async def handler(ctx: Any) -> None:
    return None


def hints() -> tuple[Hints, list[int]]:
    pipeline = Pipeline("p", table="t", start="new")
    pipeline.stage(after="new", name="work", max_running=1)(handler)
    woken: list[int] = []
    found = Hints(pipeline, ["work"], WorkerStats(), lambda: woken.append(1), max_pending=100)
    found.needs_scan["work"] = found.retry_due["work"] = False
    return found, woken


def test_a_stage_held_for_a_slot_is_not_picked_until_a_slot_is_freed() -> None:
    found, woken = hints()
    found.on_notify("ch", '["r", "new", "7", null]')
    assert found.pending["work"] == {"7": None}
    found.hold("work", False, Held(slots=True, next_token_in=None), found.slots_freed["work"])
    assert found.pick("work", 10) is None
    assert found.any()  # not idle: work waits for a slot
    found.on_notify("ch", '["s", "other_stage", "slot", null]')  # not ours
    assert found.pick("work", 10) is None
    before = len(woken)
    found.on_notify("ch", '["s", "work", "slot", null]')
    assert len(woken) == before + 1
    pick = found.pick("work", 10)
    assert pick is not None and pick.mode == "ready"  # any ready rows, not the stale keys
    assert found.pending["work"] == {}
    assert found.needs_scan["work"]


def test_a_slot_freed_while_the_claim_ran_is_not_missed() -> None:
    found, _ = hints()
    seen = found.slots_freed["work"]
    found.on_notify("ch", '["s", "work", "slot", null]')  # arrives before the claim returns
    found.hold("work", False, Held(slots=True, next_token_in=None), seen)
    assert "work" not in found.held
    assert found.pick("work", 10) is not None


def test_a_stage_held_for_tokens_is_released_when_the_next_one_is_due() -> None:
    found, _ = hints()
    found.hold("work", True, Held(slots=False, next_token_in=0.05), found.slots_freed["work"])
    wait = found.release_due()
    assert wait is not None and 0 < wait <= 0.05
    assert found.pick("work", 10) is None
    wait_for(lambda: found.release_due() is None, "the next token to fall due")
    assert found.retry_due["work"]  # it was a retry's claim that was held back
    assert found.pick("work", 10) is not None


def test_a_scan_that_finds_ready_rows_releases_a_held_stage() -> None:
    found, _ = hints()
    found.hold("work", False, Held(slots=True, next_token_in=None), found.slots_freed["work"])
    found.found_ready("work")
    assert "work" not in found.held
    assert found.pick("work", 10) is not None
