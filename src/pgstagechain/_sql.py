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
from typing import TYPE_CHECKING, Any, LiteralString

import attrs
from psycopg import sql

from ._stage import FanIn

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


def object_names(pipeline: Pipeline) -> dict[str, str]:
    """The database objects a pipeline owns on the user's side, by role."""
    return {
        "function": f"notify_{pipeline.name}",
        "trigger": f"pgstagechain_{pipeline.name}",
        "state_index": f"pgstagechain_{pipeline.name}_state",
        "group_index": f"pgstagechain_{pipeline.name}_group",
    }


def owned_names(schema: str, objects: dict[str, str]) -> dict[str, sql.Composable]:
    """``objects`` (as :func:`object_names` gives them, or as install recorded them) as SQL."""
    names: dict[str, sql.Composable] = {}
    if "function" in objects:
        names["function"] = sql.Identifier("pgstagechain", objects["function"])
    if "trigger" in objects:
        names["trigger"] = sql.Identifier(objects["trigger"])
    for index in ("state_index", "group_index"):
        if index in objects:  # created beside its table, dropped by its qualified name
            names[index] = sql.Identifier(objects[index])
            names[f"{index}_in_schema"] = sql.Identifier(schema, objects[index])
    return names


def _text_array(values: list[str]) -> sql.Composable:
    return sql.SQL("ARRAY[{}]::text[]").format(sql.SQL(", ").join(map(sql.Literal, values)))


def configured_names(
    pipeline: Pipeline, key_type: str = "text", group_type: str | None = None
) -> dict[str, sql.Composable]:
    """The pipeline's names as SQL, for the templates' ``{word}`` placeholders; the types of
    its key and group columns as the catalog spells them. Values the trigger function
    holds as constants (the done status, the channel, the steps it announces) come as
    literals."""
    spec = pipeline.table
    members = pipeline.fan_in_of()
    names: dict[str, sql.Composable] = {
        **owned_names(spec.schema, object_names(pipeline)),
        "done": sql.Literal(spec.statuses.done),
        "channel": sql.Literal(pipeline.channel),
        "pipeline_name": sql.Literal(pipeline.name),
        "row_steps": _text_array(
            [s.after for s in pipeline if not s.group and not pipeline.is_group_step(s.after)]
        ),
        "fan_in_steps": _text_array(list(pipeline.fan_in_steps())),
        "failed": sql.Literal(spec.statuses.failed),
        "wake_statuses": _text_array(
            [spec.statuses.done]
            + (
                [spec.statuses.failed]
                if any(s.fan_in is not FanIn.ALL_DONE for s in pipeline)
                else []
            )
        ),
        # each row step whose chain leads to a group stage: that stage, the step it follows
        # and its fan-in policy, side by side
        "member_steps": _text_array(list(members)),
        "member_fan_ins": _text_array([s.after for s in members.values()]),
        "member_group_stages": _text_array([s.name for s in members.values()]),
        "member_policies": _text_array([s.fan_in.value for s in members.values()]),
        "group_stage_names": _text_array([s.name for s in pipeline if s.group]),
        "expected_size": sql.SQL("NULL::bigint"),
        "new_group": sql.SQL("NULL::text"),
        # index builds: CONCURRENTLY outside a transaction (see Statements.with_names)
        "concurrently": sql.SQL(""),
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
        names["new_group"] = sql.SQL("NEW.{}::text").format(names["group"])
    if spec.group_size_column:
        # the size the members declare for their group (`m`: the members), the largest
        names["expected_size"] = sql.SQL("max(m.{})::bigint").format(
            sql.Identifier(spec.group_size_column)
        )
    return names


def pipeline_params(pipeline: Pipeline) -> dict[str, Any]:
    """The parameters every statement of a pipeline may use: its name, channel, statuses."""
    statuses = pipeline.table.statuses
    return {
        "pipeline": pipeline.name,
        "channel": pipeline.channel,
        "done": statuses.done,
        "running": statuses.running,
        "failed": statuses.failed,
    }


class Statements:
    """The templates rendered with one set of configured names, each on first use."""

    def __init__(self, names: dict[str, sql.Composable]) -> None:
        self.names = names
        self._composed: dict[str, sql.Composable] = {}
        self._text: dict[str, LiteralString] = {}

    def with_names(self, **more: sql.Composable) -> Statements:
        """The same templates with some names added or replaced."""
        return Statements({**self.names, **more})

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
