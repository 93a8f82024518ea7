"""The SQL files: every template parses, renders for awkward names, and names its parts
clearly when it cannot. No database needed."""

from __future__ import annotations

import re
import string
from typing import Any

import pytest
from psycopg import sql

from pgstagechain import Pipeline
from pgstagechain._sql import Statements, configured_names, parse, plain, templates

AWKWARD = {
    "schema": 'My "Schema"',
    "table": "order items",
    "key": 'Key"Col',
    "step_column": "current step",
    "status_column": "Status",
    "group_column": "group",  # a reserved word
    "extra_columns": ["tenant id"],
}


def awkward_pipeline(*, group: bool = True) -> Pipeline:
    options: dict[str, Any] = dict(AWKWARD)
    if not group:
        del options["group_column"]
    pipeline = Pipeline("odd", start="new", **options)

    @pipeline.stage(after="new")
    async def first(ctx: Any) -> None:
        return None

    if group:

        @pipeline.stage(after="first", group=True)
        async def together(ctx: Any) -> None:
            return None

    return pipeline


#: names given where a statement is used rather than by the pipeline
USE_NAMES = {
    "database": sql.Identifier("test db"),
    "template": sql.Identifier("a template"),
    "channel_name": sql.Identifier("pgstagechain_odd"),
}


def statements(*, group: bool = True) -> Statements:
    return Statements(
        configured_names(awkward_pipeline(group=group), "bigint", "text" if group else None)
    ).with_names(**USE_NAMES)


STATEMENTS = sorted(name for name, t in templates().items() if not t.fragment)


def test_every_file_has_statements_with_unique_names() -> None:
    files = {t.file for t in templates().values()}
    assert {"claim.sql", "complete.sql", "leases.sql", "recovery.sql", "admin.sql"} <= files
    assert {"claim_rows_by_key", "complete_rows", "expire_leases", "pending"} <= set(STATEMENTS)


@pytest.mark.parametrize("name", STATEMENTS)
def test_each_statement_renders_for_awkward_names(name: str) -> None:
    text = statements().text(name)
    # nothing left unfilled, no comments sent to the server
    assert not [f for _, f, _, _ in string.Formatter().parse(text) if f]
    assert not re.search(r"^\s*--", text, re.MULTILINE)
    template = templates()[name]
    if "{table}" in template.text:
        assert '"My ""Schema"""."order items"' in text
    if "{key}" in template.text:
        assert '"Key""Col"' in text
    # every parameter is a plain %(word)s (a lone % would break the statement)
    assert re.fullmatch(r"([^%]|%%|%\(\w+\)s)*", text, re.DOTALL)


def test_statements_of_a_pipeline_without_groups_render_but_group_ones_say_why() -> None:
    rows_only = statements(group=False)
    assert "NULL::text" in rows_only.text("claim_rows_ready")
    with pytest.raises(KeyError, match=r"'members' \(in 'claim_groups_ready', .*\) uses \{group\}"):
        rows_only.text("claim_groups_ready")


def test_plain_statements_need_no_configuration() -> None:
    assert plain("schema_version").startswith("SELECT")
    with pytest.raises(KeyError, match=r"row_counts.* uses \{step\}"):
        plain("row_counts")


def test_parse_reads_headers_and_drops_whole_line_comments() -> None:
    found = parse(
        "-- a preamble\n-- name: one\n-- why it is so\nSELECT 1\n-- fragment: two\nWHERE x\n",
        "x.sql",
    )
    assert [(t.name, t.fragment, t.text) for t in found] == [
        ("one", False, "SELECT 1"),
        ("two", True, "WHERE x"),
    ]


def test_parse_refuses_an_empty_template() -> None:
    with pytest.raises(ValueError, match="'one' is empty"):
        parse("-- name: one\n-- only a comment\n-- name: two\nSELECT 2\n", "x.sql")


def test_an_unknown_statement_is_named() -> None:
    with pytest.raises(KeyError, match="no SQL template named 'nope'"):
        statements().text("nope")
