"""The README's program and the getting-started page's code run as printed.

The README's ``python`` block is one complete program; the getting-started page's blocks
of sections 1 to 4 make ``app.py`` and its last block is ``test_app.py``. Both read the
server from ``PGSTAGECHAIN_DSN`` (here the test's database) and fall back to an embedded
server, which the slow test exercises too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def python_blocks(page: str) -> list[str]:
    text = (ROOT / page).read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PGSTAGECHAIN_DSN", "PGSTAGECHAIN_TEST_DSN")
    }
    done = subprocess.run(
        args,
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_readme_has_one_complete_program(tmp_path: Path, pgstagechain_dsn: str) -> None:
    [program] = python_blocks("README.md")
    assert "..." not in program and "…" not in program  # no placeholders
    (tmp_path / "quickstart.py").write_text(program, encoding="utf-8")
    first = run([sys.executable, "quickstart.py"], tmp_path, PGSTAGECHAIN_DSN=pgstagechain_dsn)
    assert first.stdout.strip() == "job 1: best variant 3"  # as the README says
    again = run([sys.executable, "quickstart.py"], tmp_path, PGSTAGECHAIN_DSN=pgstagechain_dsn)
    assert again.stdout.strip().startswith("job 2: best variant")


def getting_started_files(directory: Path) -> None:
    blocks = python_blocks("docs/getting-started.md")
    assert len(blocks) >= 2
    (directory / "app.py").write_text("\n\n".join(blocks[:-1]), encoding="utf-8")
    (directory / "test_app.py").write_text(blocks[-1], encoding="utf-8")


def test_getting_started_program_runs(tmp_path: Path, pgstagechain_dsn: str) -> None:
    getting_started_files(tmp_path)
    done = run([sys.executable, "app.py"], tmp_path, PGSTAGECHAIN_DSN=pgstagechain_dsn)
    assert done.stdout.strip() == "job 1: best variant 3 (0 failed runs)"


def test_getting_started_tests_pass(tmp_path: Path, pgstagechain_server: object) -> None:
    getting_started_files(tmp_path)
    # The inner session uses this session's server; it re-creates the shared template
    # database from the same migrations, which leaves it as this session expects.
    server_dsn = pgstagechain_server.dsn  # type: ignore[attr-defined]
    done = run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_app.py"],
        tmp_path,
        PGSTAGECHAIN_TEST_DSN=server_dsn,
        PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    )
    assert "2 passed" in done.stdout


@pytest.mark.slow
def test_readme_program_starts_an_embedded_server_without_a_dsn(tmp_path: Path) -> None:
    pytest.importorskip("pgserver")
    [program] = python_blocks("README.md")
    (tmp_path / "quickstart.py").write_text(program, encoding="utf-8")
    done = run([sys.executable, "-W", "ignore", "quickstart.py"], tmp_path)
    assert done.stdout.strip() == "job 1: best variant 3"
    assert (tmp_path / "pgdata").is_dir()
