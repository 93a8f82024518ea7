"""contrib/ and examples/ are built on the public API, so that what they do, a user can do.

The rule, read from the source:

* examples/ import only public modules of ``pgstagechain`` (no ``_private`` part in a
  module path, no ``_private`` name) and never read the library's own tables
  (``pgstagechain.runs``, ``.groups``, ...) or match its connections' names: they ask
  :mod:`pgstagechain.admin`.
* contrib/ is part of the package: it may import its own modules, the public ones, and
  only these internals: ``_connect`` (connecting, the ``PGSTAGECHAIN_DSN`` default, which
  errors are the connection's), ``_execute`` (the worker's handler call and retry policy,
  so a stage run by hand fails the way a worker's does) and ``_sql`` (statements from
  the ``.sql`` files). Nothing of the worker's machinery (claimers, batchers, links).
  Neither does contrib read the library's tables with SQL of its own.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONTRIB = ROOT / "src" / "pgstagechain" / "contrib"
EXAMPLES = ROOT / "examples"

CONTRIB_INTERNALS = {
    "pgstagechain._connect",
    "pgstagechain._execute",
    "pgstagechain._sql",
    # the command line's own: what `migrate --plan` prints, `--map OLD=NEW` read
    "pgstagechain._install",
    "pgstagechain._migration_plan",
}
LIBRARY_TABLES = re.compile(r"\bpgstagechain\.(runs|groups|pipelines|migrations)\b")
LIBRARY_CONNECTIONS = re.compile(r"pgstagechain-(listener|control|finisher|handler)")


def sources(folder: Path) -> Iterator[Path]:
    yield from sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def module_of(path: Path) -> str:
    """The dotted name of a module under src/ (contrib) or the repository (examples)."""
    base = ROOT / "src" if path.is_relative_to(ROOT / "src") else ROOT
    parts = list(path.relative_to(base).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(line, absolute module, names imported from it) for every import of a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                here = module_of(path)
                package = here if path.name == "__init__.py" else here.rpartition(".")[0]
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            yield node.lineno, module, [a.name for a in node.names]


def code_strings(path: Path) -> Iterator[tuple[int, str]]:
    """String constants of a file that are not docstrings."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    for node in ast.walk(tree):
        is_text = isinstance(node, ast.Constant) and isinstance(node.value, str)
        if is_text and id(node) not in docstrings:
            yield node.lineno, node.value


def private(module: str) -> bool:
    return module.split(".")[0] == "pgstagechain" and any(
        part.startswith("_") for part in module.split(".")[1:]
    )


def test_examples_use_only_the_public_api() -> None:
    found = []
    for path in sources(EXAMPLES):
        where = path.relative_to(ROOT)
        for line, module, names in imports(path):
            if private(module) or (
                module.startswith("pgstagechain") and any(n.startswith("_") for n in names)
            ):
                found.append(f"{where}:{line} imports {module} {names}")
        for line, text in code_strings(path):
            if LIBRARY_TABLES.search(text) or LIBRARY_CONNECTIONS.search(text):
                found.append(f"{where}:{line} reads the library's own tables: {text[:60]!r}")
    assert not found, "\n".join(found)


def test_contrib_uses_the_public_api_and_the_named_internals_only() -> None:
    found = []
    for path in sources(CONTRIB):
        where = path.relative_to(ROOT)
        for line, module, names in imports(path):
            own = module.startswith("pgstagechain.contrib")
            if private(module) and not own and module not in CONTRIB_INTERNALS:
                found.append(f"{where}:{line} imports {module}")
            if module == "pgstagechain" and any(n.startswith("_") for n in names):
                found.append(f"{where}:{line} imports private {names} from pgstagechain")
        for line, text in code_strings(path):
            if LIBRARY_TABLES.search(text):
                found.append(f"{where}:{line} reads the library's own tables: {text[:60]!r}")
    assert not found, "\n".join(found)


def test_the_rule_sees_what_it_forbids(tmp_path: Path) -> None:
    """The scanners themselves: a private import and a query of a library table are caught."""
    sample = tmp_path / "probe.py"
    sample.write_text(
        "from pgstagechain._claim import claimer_for\n"
        "import pgstagechain._admin\n"
        "Q = 'SELECT * FROM pgstagechain.runs'\n",
        encoding="utf-8",
    )
    modules = [m for _, m, _ in imports(sample)]
    assert modules == ["pgstagechain._claim", "pgstagechain._admin"]
    assert all(private(m) for m in modules)
    assert any(LIBRARY_TABLES.search(t) for _, t in code_strings(sample))
    assert not private("pgstagechain.admin") and not private("pgstagechain.contrib.fastapi")
