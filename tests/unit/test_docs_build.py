"""The documentation site builds with ``mkdocs build --strict`` and covers every command."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pgstagechain.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_site_builds_strict(tmp_path: Path) -> None:
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            pytest.skip(f"{module} is not installed (pip install 'pgstagechain[docs]')")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    reference = (tmp_path / "reference" / "index.html").read_text(encoding="utf-8")
    import pgstagechain

    for name in pgstagechain.__all__:
        assert f'id="pgstagechain.{name}"' in reference, f"{name} missing from the API reference"


def test_every_command_is_documented() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    headings = set(re.findall(r"^## (\w+)", (ROOT / "docs" / "cli.md").read_text(), re.M))
    assert set(sub.choices) <= headings, set(sub.choices) - headings


def test_every_docs_page_is_in_the_nav() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    in_nav = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", config, re.M))
    assert pages == in_nav, {"not in nav": pages - in_nav, "missing file": in_nav - pages}
