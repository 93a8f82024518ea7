"""Notification payloads are untrusted (anyone who may NOTIFY on the channel can send
one): the parser either returns an event that is safe to send to the database, or raises
MalformedNotification. Nothing else, whatever the text."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pgstagechain._events import KINDS, MAX_PAYLOAD, Event, MalformedNotification, parse_event

#: every code point, lone surrogates included (a JSON escape such as "\ud800" makes one)
any_char = st.characters(exclude_categories=())
any_text = st.text(any_char)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | any_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(any_text, inner, max_size=5),
    max_leaves=20,
)
#: shapes close to a real event, so that the fuzzing reaches every check of the parser
near_events = st.tuples(
    st.sampled_from(["r", "g", "t", "s", "w"]) | json_values,
    st.sampled_from(["img_gen", "vlm_analyze", "a", ""]) | json_values,
    st.text(st.sampled_from("0123456789"), min_size=1, max_size=6) | st.just("slot") | json_values,
    st.none() | st.sampled_from(["1", "42"]) | json_values,
).map(list)
deep_nesting = st.builds(
    lambda n, opener: opener * n,
    st.integers(min_value=1, max_value=MAX_PAYLOAD),
    st.sampled_from(["[", '{"a":', '["r","img_gen",', "[[", " ["]),
)
#: numbers JSON allows but Python may not hold (over 4,300 digits, exponents past float)
huge_numbers = st.builds(
    lambda literal, where: where.format(literal),
    st.integers(min_value=1, max_value=7000).map(lambda n: "9" * n)
    | st.integers(min_value=300, max_value=99999).map(lambda e: f"1e{e}")
    | st.integers(min_value=300, max_value=99999).map(lambda e: f"-1.5E-{e}"),
    st.sampled_from(['["r","img_gen",{},null]', '["r","img_gen","101",{}]', '["r",{},"1",null]']),
)

NAMED = [
    "[" * 7999,  # SELECT pg_notify(channel, repeat('[', 7999))
    "[" * 7999 + "]" * 1,
    '["r","img_gen","\\ud800",null]',  # a lone surrogate, escaped
    '["r","img_gen","101","\\udfff"]',
    '["r","\\ud800","101",null]',
    '["r","img_gen",{"a":{"b":[1,2,{"c":null}]}},null]',  # an object as the key
    '["r","img_gen",[[["101"]]],null]',
    '["r","img_gen","10\\u00001",null]',  # a NUL in the key
    '["r","img_gen","101","\\u0000"]',
    '["r","img_\\u0000gen","101",null]',
    '["r","img_gen",' + "9" * 5000 + ",null]",  # a huge number
    '["r","img_gen","101",1e999]',
    '["r","img_gen",1e999,null]',
    '["r","img_gen","' + "9" * 1000 + '",null]',  # a key that fits no integer column
    '["r","img_gen","NaN",NaN]',
    '["r","img_gen","101",null,"extra"]',
    '["s","overlay",null,null]',  # a slot freed, without its key
    '["s","overlay","slot",{}]',
    '["x","overlay","slot",null]',  # an unknown kind
    "",
    "\x00",
    "\ud800",
]


def check(payload: str) -> None:
    """The property: a safe Event or MalformedNotification, never another exception."""
    try:
        event = parse_event(payload)
    except MalformedNotification:
        return
    assert isinstance(event, Event)
    assert event.kind in KINDS
    for name, field in (("step", event.step), ("key", event.key), ("group", event.group)):
        if field is None and name == "group":
            continue
        assert isinstance(field, str), f"{name} is {type(field).__name__}: {field!r}"
        field.encode("utf-8")  # UnicodeEncodeError: psycopg could not send it
        assert "\x00" not in field, f"{name} holds a NUL, which no text column accepts"
    assert event.step and event.key


@pytest.mark.parametrize("payload", NAMED, ids=range(len(NAMED)))
def test_named_hostile_payloads(payload: str) -> None:
    check(payload)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_text)
@example("[" * 7999)
@example('["r","img_gen","\\ud800",null]')
def test_any_text(payload: str) -> None:
    check(payload)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values | near_events, st.booleans())
@example(["r", "img_gen", "\ud800", None], True)
@example(["r", "img_gen", "10\x001", None], False)
@example(["r", "img_gen", {"a": {"b": [1, {"c": None}]}}, None], True)
def test_any_json(value: Any, ascii_only: bool) -> None:
    # ensure_ascii escapes lone surrogates as \udxxx; without it they stay raw in the text
    check(json.dumps(value, ensure_ascii=ascii_only))


@settings(max_examples=100, deadline=None)
@given(deep_nesting | huge_numbers)
def test_deep_nesting_and_huge_numbers(payload: str) -> None:
    check(payload)


def test_a_freed_slot_parses_as_the_statements_send_it() -> None:
    # json_build_array('s', stage, 'slot', NULL)::text, as release_slots sends it
    assert parse_event('["s", "overlay", "slot", null]') == Event("s", "overlay", "slot", None)
