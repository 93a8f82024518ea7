"""The house keeps its floors: no module imports one from a higher floor, and no import
goes round in a circle (docs/architecture.md draws the same floors)."""

from __future__ import annotations

import ast
from pathlib import Path

import pgstagechain

SRC = Path(pgstagechain.__file__).parent
#: each module's floor; a module may import from its own floor and the ones below
FLOORS = {
    "errors": 1,
    "_context": 1,
    "_events": 1,
    "_connect": 1,
    "_gc": 1,
    "_logging": 1,
    "_stage": 2,
    "_pipeline": 2,
    "_runs": 2,
    "_retention": 2,
    "_sql": 3,
    "_catalog": 3,
    "_migrations": 3,
    "_install": 3,
    "_graph_change": 3,
    "_migration_plan": 3,
    "_limits": 3,
    "_claim": 4,
    "_by_hand": 4,
    "_listener": 5,
    "_links": 5,
    "_hints": 5,
    "_dispatch": 5,
    "_batcher": 5,
    "_leases": 5,
    "_execute": 5,
    "_recovery": 5,
    "_startup": 5,
    "_membership": 5,
    "_joining": 5,
    "_history": 5,
    "_repair": 5,
    "_rerun": 5,
    "_rerun_plan": 5,
    "_activity": 5,
    "_prune": 5,
    "_worker": 6,
    "admin": 6,
}
TOP = 7  # the package itself, cli, metrics, http, contrib, testing


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def floor(module: str) -> int:
    return FLOORS.get(module, TOP)


def imports() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports."""
    found: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        name = module_name(path)
        package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
                for alias in node.names:
                    candidate = f"{target}.{alias.name}".strip(".")
                    known = (SRC / candidate.replace(".", "/")).with_suffix(".py").exists()
                    targets.add(candidate if known else target)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "pgstagechain"
            ):
                targets.add(
                    node.module.removeprefix("pgstagechain").strip(".") if node.module else ""
                )
        found[name] = {t for t in targets if t != name}
    return found


def test_no_module_imports_from_a_higher_floor() -> None:
    wrong = [
        f"{module} (floor {floor(module)}) imports {target} (floor {floor(target)})"
        for module, targets in imports().items()
        for target in targets
        if floor(target) > floor(module)
    ]
    assert wrong == []


def test_no_import_circle() -> None:
    graph = imports()
    circles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in graph.get(module, ()):
            if state.get(target) == 1:
                circles.append([*path[path.index(target) :], target])
            elif target in graph and not state.get(target):
                visit(target, [*path, target])
        state[module] = 2

    for module in graph:
        if not state.get(module):
            visit(module, [module])
    # a package's __init__ re-exporting its own submodules is not a circle
    assert [c for c in circles if not all(m.startswith(c[0]) for m in c)] == []


def test_every_private_module_has_a_floor() -> None:
    private = {m for m in imports() if m.startswith("_") and "." not in m}
    assert private - {"__main__"} <= set(FLOORS)
