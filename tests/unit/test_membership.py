"""Rendezvous hashing over the live workers: every key has one owner in every view of the
same members, the keys spread evenly, and a member leaving moves only its own keys."""

from __future__ import annotations

from pgstagechain._membership import Membership, lock_number

KEYS = [str(k) for k in range(3000)]


def view(me: int, members: tuple[int, ...], stages: tuple[str, ...] = ("a", "b")) -> Membership:
    member = Membership("p", stages)
    member.joined(me)
    member.update({str(lock_number(f"p:{s}")): list(members) for s in stages})
    return member


def owners(members: tuple[int, ...], stage: str = "a") -> dict[str, int]:
    views = {pid: view(pid, members) for pid in members}
    found: dict[str, int] = {}
    for key in KEYS:
        claimants = [pid for pid, v in views.items() if v.mine(stage, key)]
        assert len(claimants) == 1, (key, claimants)
        found[key] = claimants[0]
    return found


def test_every_key_has_one_owner_and_the_keys_spread_evenly() -> None:
    found = owners((101, 202, 303))
    for pid in (101, 202, 303):
        assert 800 < sum(1 for owner in found.values() if owner == pid) < 1200


def test_a_member_leaving_moves_only_its_own_keys() -> None:
    before = owners((101, 202, 303))
    after = owners((101, 303))
    for key in KEYS:
        if before[key] != 202:
            assert after[key] == before[key]


def test_a_worker_alone_or_not_yet_listed_claims_everything() -> None:
    unjoined = Membership("p", ["a"])
    assert all(unjoined.mine("a", key) for key in KEYS[:50])
    alone = view(101, (101,))
    assert all(alone.mine("a", key) for key in KEYS[:50])
    not_listed = view(101, (202, 303))  # our locks not seen yet (a reconnect)
    assert all(not_listed.mine("a", key) for key in KEYS[:50])
    unknown_stage = view(101, (101, 202), stages=("a",))
    assert all(unknown_stage.mine("z", key) for key in KEYS[:50])


def test_a_forged_leaving_notice_never_drops_ourselves() -> None:
    member = view(101, (101, 202))
    member.drop(101)
    assert member.members["a"] == (101, 202)
    member.drop(202)
    assert member.members["a"] == (101,)
    assert all(member.mine("a", key) for key in KEYS[:50])


def test_stages_are_told_apart_by_their_lock_numbers() -> None:
    member = Membership("p", ["a", "b"])
    member.joined(101)
    member.update({str(lock_number("p:a")): [101, 202], str(lock_number("other:a")): [303]})
    assert member.members == {"a": (101, 202)}
