"""Rendezvous hashing with bounded loads over the live workers: every partition (so every
key) has one owner in every view of the same members, each member holds an even share, a
member leaving moves its own partitions and few others, and a worker listens to the
partitions it owns."""

from __future__ import annotations

from pgstagechain._membership import Membership, listened_channels, lock_number
from pgstagechain._pipeline import PARTITIONS, Pipeline

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


def partition_owners(members: tuple[int, ...], stage: str = "a") -> dict[int, int]:
    views = {pid: view(pid, members) for pid in members}
    found: dict[int, int] = {}
    for partition in range(PARTITIONS):
        claimants = [pid for pid, v in views.items() if v.mine(stage, "any", partition)]
        assert len(claimants) == 1, (partition, claimants)
        found[partition] = claimants[0]
    return found


def test_each_member_holds_an_even_share_of_the_partitions() -> None:
    for members in [(101, 202), (101, 202, 303), tuple(range(1000, 1008)), tuple(range(7, 90, 9))]:
        held = list(partition_owners(members).values())
        shares = {held.count(pid) for pid in members}
        assert shares <= {PARTITIONS // len(members), -(-PARTITIONS // len(members))}, shares


def test_a_member_leaving_moves_its_partitions_and_few_others() -> None:
    for members, gone in [((101, 202, 303), 202), (tuple(range(1000, 1008)), 1003)]:
        before = partition_owners(members)
        after = partition_owners(tuple(m for m in members if m != gone))
        theirs = [p for p, owner in before.items() if owner != gone]
        moved = [p for p in theirs if after[p] != before[p]]
        assert all(after[p] != gone for p in after)
        assert len(moved) <= len(theirs) // 4, (len(moved), len(theirs))


def test_a_worker_listens_to_the_partitions_it_owns_for_some_stage() -> None:
    told: list[frozenset[int] | None] = []
    member = Membership("p", ["a", "b"])
    member.on_partitions = told.append
    member.joined(101)
    assert member.partitions is None and told == []  # alone: it hears every partition
    member.update({str(lock_number(f"p:{s}")): [101, 202] for s in ("a", "b")})
    ours = frozenset(p for p, owner in partition_owners((101, 202)).items() if owner == 101)
    assert member.partitions == ours and told == [ours]
    # a stage nobody else serves: every partition again
    member.update({str(lock_number("p:a")): [101, 202], str(lock_number("p:b")): [101]})
    assert member.partitions is None and told == [ours, None]
    member.drop(202)
    assert member.partitions is None and told == [ours, None]
    pipeline = Pipeline("p", table="t", start="new")
    assert listened_channels(pipeline, [3, 1]) == [
        "pgstagechain_p",
        "pgstagechain_p.1",
        "pgstagechain_p.3",
    ]
    assert len(listened_channels(pipeline, None)) == PARTITIONS + 1


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


def test_the_schema_hashes_keys_into_as_many_partitions_as_workers_listen_to() -> None:
    """The SQL function that names a key's channel masks with PARTITIONS - 1."""
    from importlib import resources

    text = (
        resources.files("pgstagechain")
        .joinpath("sql", "migrations", "0007_partition_channels.sql")
        .read_text()
    )
    assert f"hashtext(key) & {PARTITIONS - 1})::text" in text
    assert PARTITIONS & (PARTITIONS - 1) == 0  # a power of two, so the mask is a modulo
