"""Every statement the library runs, read from the ``.sql`` files beside this module.

A file holds statements, each under a ``-- name: NAME`` header, and fragments shared by
several statements, under ``-- fragment: NAME``. In a template, ``{word}`` is either a
fragment or one of the pipeline's configured names, and ``%(word)s`` a parameter. This
module is the one place where configuration becomes SQL: names go through
:class:`psycopg.sql.Identifier`, and the only other pieces are type names as the catalog
spells them (``format_type``, already quoted by PostgreSQL).

Whole-line ``--`` comments are for readers of the files and are not sent to the server.
"""

from __future__ import annotations

import functools
import re
import string
from importlib import resources
from typing import TYPE_CHECKING, LiteralString

import attrs
from psycopg import sql

if TYPE_CHECKING:
    from ._pipeline import Pipeline

HEADER = re.compile(r"^-- (name|fragment): (\w+)\s*$")


@attrs.frozen
class Template:
    """One statement or fragment as written in its file, comments dropped."""

    name: str
    fragment: bool
    text: str
    file: str

    @property
    def fields(self) -> list[str]:
        """The ``{word}`` placeholders, in order of appearance."""
        return [f for _, f, _, _ in string.Formatter().parse(self.text) if f]


def parse(text: str, file: str) -> list[Template]:
    """The templates of one file, in order; text before the first header is a preamble."""
    found: list[Template] = []
    current: tuple[str, bool] | None = None
    lines: list[str] = []

    def close() -> None:
        if current is not None:
            body = "\n".join(lines).strip()
            if not body:
                raise ValueError(f"{file}: {current[0]!r} is empty")
            found.append(Template(current[0], current[1], body, file))

    for line in text.splitlines():
        header = HEADER.match(line)
        if header:
            close()
            current, lines = (header[2], header[1] == "fragment"), []
        elif current is not None and not line.lstrip().startswith("--"):
            lines.append(line)
    close()
    return found


@functools.cache
def templates() -> dict[str, Template]:
    """Every template of the package, by name (names are unique across files)."""
    found: dict[str, Template] = {}
    folder = resources.files("pgstagechain").joinpath("sql")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        for each in parse(entry.read_text(encoding="utf-8"), entry.name):
            if each.name in found:
                raise ValueError(
                    f"{each.file}: {each.name!r} is already defined in {found[each.name].file}"
                )
            found[each.name] = each
    return found


@functools.cache
def plain(name: str) -> LiteralString:
    """A statement that names nothing from configuration, as text."""
    return Statements({}).text(name)


def configured_names(
    pipeline: Pipeline, key_type: str, group_type: str | None = None
) -> dict[str, sql.Composable]:
    """The pipeline's names as SQL, for the templates' ``{word}`` placeholders; the types of
    its key and group columns as the catalog spells them."""
    spec = pipeline.table
    names: dict[str, sql.Composable] = {
        "table": sql.Identifier(spec.schema, spec.table),
        "key": sql.Identifier(spec.key),
        "step": sql.Identifier(spec.step_column),
        "status": sql.Identifier(spec.status_column),
        "key_type": sql.SQL(key_type),
        "key_array": sql.SQL(key_type + "[]"),
        # the pipeline's extra columns, as `x_<column>` in a claim's result
        "extras": sql.SQL("").join(
            sql.SQL(", t.{} AS {}").format(sql.Identifier(c), sql.Identifier("x_" + c))
            for c in spec.extra_columns
        ),
        "group_expr": sql.SQL("NULL::text"),
    }
    if spec.group_column:
        names["group"] = sql.Identifier(spec.group_column)
        names["group_type"] = sql.SQL(group_type or "text")
        names["group_expr"] = sql.SQL("t.{}::text").format(names["group"])
    return names


class Statements:
    """The templates rendered with one set of configured names, each on first use."""

    def __init__(self, names: dict[str, sql.Composable]) -> None:
        self.names = names
        self._composed: dict[str, sql.Composable] = {}
        self._text: dict[str, LiteralString] = {}

    def composed(self, name: str, within: tuple[str, ...] = ()) -> sql.Composable:
        """Template ``name`` with its fragments and names filled in (``within``: the
        templates that use it, for error messages)."""
        found = self._composed.get(name)
        if found is None:
            template = templates().get(name)
            if template is None:
                raise KeyError(f"no SQL template named {name!r}")
            parts: dict[str, sql.Composable] = {}
            for field in template.fields:
                if field in self.names:
                    parts[field] = self.names[field]
                elif field in templates():
                    parts[field] = self.composed(field, (*within, name))
                else:
                    used_in = f" (in {', '.join(map(repr, within))})" if within else ""
                    raise KeyError(
                        f"{template.file}: {name!r}{used_in} uses {{{field}}}, which is neither"
                        " a template nor a name this pipeline configures"
                    )
            found = sql.SQL(template.text).format(**parts)
            self._composed[name] = found
        return found

    def text(self, name: str) -> LiteralString:
        """Statement ``name`` as the string sent to the server."""
        found = self._text.get(name)
        if found is None:
            found = self.composed(name).as_string(None)
            self._text[name] = found
        return found
