"""What `python -m build` makes installs and runs on its own, as docs/getting-started.md says.

The wheel goes into a fresh virtual environment with no extras (its dependencies come from
the package index), away from this checkout: the command starts, ``migrate`` installs the
schema from the SQL files inside the wheel, and a worker runs a one-stage pipeline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = sorted(p.name for p in (ROOT / "src/pgstagechain/sql/migrations").glob("*.sql"))

APP = textwrap.dedent(
    """
    import anyio
    import pgstagechain
    from pgstagechain import Pipeline, Worker

    pipeline = Pipeline("packaged", table="items", key="id", extra_columns=["text"], start="new")

    @pipeline.stage(after="new")
    async def shout(ctx):
        return {"text": ctx.row["text"].upper()}

    if __name__ == "__main__":
        import sys
        print(pgstagechain.__file__)
        stats = anyio.run(Worker(pipeline, sys.argv[1]).run_until_idle)
        print("succeeded", stats.succeeded)
    """
)


def run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    # No PYTHONPATH: the installed wheel must stand on its own, not this checkout's src/.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PGSTAGECHAIN_DSN")}
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.slow
def test_built_wheel_installs_and_runs_in_a_fresh_venv(
    tmp_path: Path, pgstagechain_dsn: str
) -> None:
    pytest.importorskip("build")
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], tmp_path)
    [wheel] = dist.glob("pgstagechain-*.whl")
    [sdist] = dist.glob("pgstagechain-*.tar.gz")

    with zipfile.ZipFile(wheel) as archive:
        in_wheel = set(archive.namelist())
    assert MIGRATIONS, "no migrations found in the source tree"
    for name in MIGRATIONS:
        assert f"pgstagechain/sql/migrations/{name}" in in_wheel
    assert "pgstagechain/py.typed" in in_wheel
    for asset in ("index.html", "dashboard.js", "dashboard.css"):  # the dashboard works offline
        assert f"pgstagechain/dashboard/assets/{asset}" in in_wheel
    assert any(n.endswith("entry_points.txt") for n in in_wheel)
    with tarfile.open(sdist) as archive:
        in_sdist = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    for name in ("pyproject.toml", "README.md", "LICENSE", "src/pgstagechain/py.typed"):
        assert name in in_sdist
    for name in MIGRATIONS:
        assert f"src/pgstagechain/sql/migrations/{name}" in in_sdist

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    bin_dir = venv / "bin"
    run([str(bin_dir / "pip"), "install", "--quiet", str(wheel)], tmp_path)

    helped = run([str(bin_dir / "pgstagechain"), "--help"], tmp_path)
    assert "exit status" in helped.stdout

    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "app.py").write_text(APP, encoding="utf-8")
    with psycopg.connect(pgstagechain_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE items (id bigint PRIMARY KEY, text text NOT NULL,"
            " current_step text NOT NULL DEFAULT 'new', status text NOT NULL DEFAULT 'done')"
        )
        conn.execute("INSERT INTO items (id, text) VALUES (1, 'hello'), (2, 'world')")
        conn.execute("DROP SCHEMA pgstagechain CASCADE")  # the wheel's migrations install it

    migrated = run(
        [str(bin_dir / "pgstagechain"), "--dsn", pgstagechain_dsn, "migrate", "app:pipeline"],
        app_dir,
    )
    assert "pipeline packaged: trigger installed on public.items" in migrated.stdout
    ran = run([str(bin_dir / "python"), "app.py", pgstagechain_dsn], app_dir)
    location, result = ran.stdout.strip().splitlines()
    assert Path(location).is_relative_to(venv), location
    assert result == "succeeded 2"
    with psycopg.connect(pgstagechain_dsn) as conn:
        rows = conn.execute("SELECT id, current_step, status FROM items ORDER BY id").fetchall()
        texts = conn.execute(
            "SELECT result->>'text' FROM pgstagechain.runs WHERE pipeline = 'packaged' ORDER BY row_key"
        ).fetchall()
    assert rows == [(1, "shout", "done"), (2, "shout", "done")]
    assert texts == [("HELLO",), ("WORLD",)]


def dry_run(target: str, tmp_path: Path) -> str:
    """The commands ``make TARGET`` would run on a fresh machine (nothing installed yet)."""
    # Not the settings of a make that runs these tests (MAKEFLAGS carries its ARGS=...).
    outer = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "ARGS", "TORCH", "TORCH_INDEX", "VENV")
    env = {k: v for k, v in os.environ.items() if k not in outer}
    done = subprocess.run(
        ["make", "-n", target, f"VENV={tmp_path / 'venv'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_test_installs_no_torch_and_leaves_the_model_test_to_its_own_target(
    tmp_path: Path,
) -> None:
    if subprocess.run(["make", "--version"], capture_output=True, check=False).returncode:
        pytest.skip("make is not installed")
    plain = dry_run("test", tmp_path)
    assert "torch" not in plain and "llava" not in plain
    assert '-m "not model"' in plain
    llava = dry_run("test-llava", tmp_path)
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in llava  # the CPU build
    assert "FEEDLY_REQUIRE_MODELS=1" in llava and "-m model" in llava
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in ("make test", "make test-llava"):
        assert f"\n{command}\n" in ci, f"CI does not run {command}"
        assert command in readme


def test_model_tests_carry_the_model_marker() -> None:
    text = (ROOT / "tests" / "feedly" / "test_llava_tiny.py").read_text(encoding="utf-8")
    assert "pytestmark = pytest.mark.model" in text
