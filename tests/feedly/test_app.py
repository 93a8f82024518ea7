"""The Feedly showcase app end to end: ``python -m examples.feedly`` as a real subprocess
against the test server, real worker processes, then its outputs checked file by file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from PIL import Image

from pgstagechain.testing.plugin import TestServer as PgServer
from tests.apps.seed import ROW_STAGES

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture
def app_dsn(pgstagechain_server: PgServer) -> Iterator[str]:
    name = pgstagechain_server.create_database("feedly_app")
    try:
        yield pgstagechain_server.dsn_for(name)
    finally:
        pgstagechain_server.drop_database(name)


def run_app(
    dsn: str, out: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FEEDLY_") and k not in ("PGSTAGECHAIN_DSN", "OPENAI_API_KEY")
    }
    return subprocess.run(
        [sys.executable, "-m", "examples.feedly", "--dsn", dsn, "--out", str(out), *args],
        cwd=ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=900,  # a hang guard only
    )


def opens(path: str | Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.load()
        return im.size


def pgstagechain_sessions(dsn: str) -> int:
    """Sessions of pgstagechain workers still open on the database, once closed ones are
    gone (a backend exits just after its client hung up: allow it a moment)."""
    count = -1
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(50):
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name LIKE 'pgstagechain%'"
            ).fetchone()
            assert row is not None
            count = int(row[0])
            if count == 0:
                break
            time.sleep(0.2)
    return count


@pytest.mark.parametrize(
    ("workers", "jobs", "variants"),
    [(2, 2, 2), (1, 1, 3)],
    ids=["two-worker-processes", "in-process-worker"],
)
def test_app_posts_every_job(
    app_dsn: str, tmp_path: Path, workers: int, jobs: int, variants: int
) -> None:
    out = tmp_path / "out"
    done = run_app(
        app_dsn,
        out,
        "--jobs",
        str(jobs),
        "--variants",
        str(variants),
        "--workers",
        str(workers),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"posts: {jobs}/{jobs}" in done.stdout
    for stage in (*ROW_STAGES, "ad_copy_gen_kor", "instagram_feed_gen"):
        assert stage in done.stdout  # the timing table

    summary = json.loads((out / "run.json").read_text(encoding="utf-8"))
    job_ids: list[int] = summary["jobs"]
    assert len(job_ids) == jobs
    assert summary["posted"] == sorted(job_ids)
    assert summary["failures"] == []
    by_stage = {s["stage"]: s for s in summary["stages"]}
    for stage in ROW_STAGES:
        assert by_stage[stage]["runs"] == jobs * variants, stage
    for stage in ("ad_copy_gen_kor", "instagram_feed_gen"):
        assert by_stage[stage]["runs"] == jobs, stage
    expected_workers = {f"feedly-w{i + 1}" for i in range(workers)}
    for s in summary["stages"]:
        assert set(s["workers"]) <= expected_workers

    with psycopg.connect(app_dsn) as conn:
        posts: dict[int, tuple[Any, ...]] = {}
        for row in conn.execute(
            "SELECT job_id, count(*) OVER (PARTITION BY job_id), chosen_variant_id, feed_image,"
            " caption_ko, hashtags, record FROM posts"
        ).fetchall():
            assert row[1] == 1, f"job {row[0]} has {row[1]} posts"
            posts[row[0]] = row
        assert sorted(posts) == sorted(job_ids)
        variants_of: dict[int, set[int]] = {}
        for job_id, key, step, status in conn.execute(
            "SELECT job_id, job_variants_id, current_step, status FROM jobs_variants"
        ).fetchall():
            assert (step, status) == ("iou_eval", "done")
            variants_of.setdefault(job_id, set()).add(key)
        assert all(len(keys) == variants for keys in variants_of.values())
        job_steps = conn.execute("SELECT current_step, status FROM jobs").fetchall()
        assert set(job_steps) == {("instagram_feed_gen", "done")}
        groups = conn.execute(
            "SELECT step, status FROM pgstagechain.groups WHERE pipeline = 'feedly'"
        ).fetchall()
        assert sorted(groups) == [("instagram_feed_gen", "done")] * jobs

    page = (out / "index.html").read_text(encoding="utf-8")
    for job_id in job_ids:
        _, _, chosen, feed_image, caption_ko, hashtags, record = posts[job_id]
        assert f"id='job-{job_id}'" in page
        assert caption_ko and caption_ko in page
        assert hashtags and all(t.startswith("#") for t in hashtags)
        assert opens(feed_image) == (1080, 1350)
        assert Path(feed_image).parent == out / str(job_id)

        on_disk = json.loads((out / str(job_id) / "post.json").read_text(encoding="utf-8"))
        assert on_disk == record
        assert int(record["chosen_variant_id"]) == chosen
        assert chosen in variants_of[job_id]
        opens(record["chosen_overlay"])
        assert (
            (out / str(job_id) / "caption.txt").read_text(encoding="utf-8").startswith(caption_ko)
        )

        scored = record["variants"]
        assert {int(v["variant_id"]) for v in scored} == variants_of[job_id]
        for v in scored:
            assert 0.0 <= v["vlm_score"] <= 1.0
            assert 0.0 <= v["ocr_similarity"] <= 1.0
            assert 1.0 <= v["contrast_ratio"] <= 21.0
            assert 0.0 <= v["overlap_fraction"] <= 1.0
            assert 0.0 <= v["total"] <= 1.0
            opens(v["overlay_image"])
        assert record["chosen_variant_id"] == max(scored, key=lambda v: v["total"])["variant_id"]
        shots = sorted((out / str(job_id) / "img_gen").iterdir())
        assert len(shots) == variants
        for shot in shots:
            opens(shot)

    # Worker processes (or the in-process worker) are gone: no sessions left behind.
    assert pgstagechain_sessions(app_dsn) == 0


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_app_reports_failures_and_exits_nonzero(app_dsn: str, tmp_path: Path) -> None:
    """A model server that is down: vlm_analyze retries, then fails; the app says so."""
    out = tmp_path / "out"
    done = run_app(
        app_dsn,
        out,
        "--jobs",
        "2",
        "--variants",
        "2",
        "--workers",
        "1",
        env={
            "FEEDLY_VLM": "openai",
            "FEEDLY_OPENAI_BASE_URL": f"http://127.0.0.1:{closed_port()}/v1",
            "FEEDLY_OPENAI_MODEL": "llava-test",
        },
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "posts: 0/2" in done.stdout
    assert "job(s) without a post" in done.stdout
    assert "ConnectError" in done.stdout

    summary = json.loads((out / "run.json").read_text(encoding="utf-8"))
    failed = {(f["level"], f["key"], f["stage"]) for f in summary["failures"]}
    with psycopg.connect(app_dsn) as conn:
        rows = conn.execute(
            "SELECT job_variants_id::text, current_step, status FROM jobs_variants"
        ).fetchall()
        assert conn.execute("SELECT count(*) FROM posts").fetchone() == (0,)
        attempts = conn.execute(
            "SELECT row_key, count(*) FROM pgstagechain.runs WHERE stage = 'vlm_analyze'"
            " GROUP BY row_key"
        ).fetchall()
    assert len(rows) == 4
    assert {(s, st) for _, s, st in rows} == {("vlm_analyze", "failed")}
    # every variant of each job failed, so each job fails too (FanIn.SETTLED), saying why
    jobs = {f["job_id"] for f in summary["failures"]}
    assert failed == {("variant", key, "vlm_analyze") for key, _, _ in rows} | {
        ("job", str(job), "ad_copy_gen_kor") for job in jobs
    }
    assert all(
        "every member failed" in f["error"] for f in summary["failures"] if f["level"] == "job"
    )
    for key, _, _ in rows:
        assert key in done.stdout
    # every variant used its three attempts (the stage's Retry policy) before failing
    assert sorted(n for _, n in attempts) == [3, 3, 3, 3]


def run_embedded(out: Path, pgdata: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The app with no database URL: it starts its own embedded server in ``pgdata``."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FEEDLY_") and k not in ("PGSTAGECHAIN_DSN", "OPENAI_API_KEY")
    }
    return subprocess.run(
        [
            *(sys.executable, "-m", "examples.feedly", "--out", str(out)),
            *("--pgdata", str(pgdata), "--jobs", "1", "--variants", "1", "--workers", "1"),
            *args,
        ],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_each_run_shows_only_its_own_result_unless_kept(tmp_path: Path) -> None:
    pytest.importorskip("pgserver")
    out, pgdata = tmp_path / "out", tmp_path / "pgdata"
    first = run_embedded(out, pgdata)
    assert first.returncode == 0, first.stdout + first.stderr
    (out / "1" / "left-over.txt").write_text("from the first run")

    again = run_embedded(out, pgdata)
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads((out / "run.json").read_text())["jobs"] == [1]  # a fresh database
    assert not (out / "1" / "left-over.txt").exists()  # a fresh output folder

    kept = run_embedded(out, pgdata, "--keep")
    assert kept.returncode == 0, kept.stdout + kept.stderr
    # a new job beside the kept one (its id need not be 2: a sequence may skip values
    # when the embedded server was not shut down cleanly)
    (job,) = json.loads((out / "run.json").read_text())["jobs"]
    assert job > 1
    assert (out / "1" / "feed.png").is_file() and (out / str(job) / "feed.png").is_file()
    page = (out / "index.html").read_text(encoding="utf-8")
    assert f"id='job-{job}'" in page and "id='job-1'" not in page  # the gallery is this run's


def test_a_foreign_output_folder_is_refused_not_emptied(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    done = run_embedded(out, tmp_path / "pgdata")
    assert done.returncode != 0
    assert "is not empty and holds no earlier Feedly run" in done.stderr
    assert (out / "thesis.tex").read_text() == "do not delete"


@pytest.mark.anyio
async def test_a_job_with_one_failed_variant_gets_its_post_and_the_gallery_says_why(
    app_dsn: str, tmp_path: Path
) -> None:
    """One variant's image is gone before the pipeline starts: it fails for good at its first
    stage, and the job still gets its Korean copy and its post from the other two
    (``FanIn.SETTLED``); the post's record and the gallery name the variant left out."""
    from examples.feedly import app
    from examples.feedly.pipeline import pipeline
    from pgstagechain import Worker

    out = tmp_path / "out"
    await app.prepare(app_dsn)
    async with await psycopg.AsyncConnection.connect(app_dsn, autocommit=True) as conn:
        images = app.product_images(app.DEFAULT_DIR)
        ((job, keys),) = await app.create_jobs(conn, images[:1], 1, 3, out)
        cur = await conn.execute(
            "SELECT a.path FROM img_assets a JOIN jobs_variants v USING (img_asset_id)"
            " WHERE v.job_variants_id = %s",
            (keys[1],),
        )
        (path,) = await cur.fetchone() or ("",)
        await anyio.Path(path).unlink()
        await app.release(conn, job)
        await Worker(pipeline, app_dsn, scan_interval=1).run_until_idle()
        cur = await conn.execute("SELECT record FROM posts WHERE job_id = %s", (job,))
        (record,) = await cur.fetchone() or (None,)
        page = await app.gallery(conn, [job], out)
    assert record is not None, "the job got no post"
    assert sorted(v["variant_id"] for v in record["variants"]) == sorted(
        str(k) for k in (keys[0], keys[2])
    )
    (failed,) = record["failed_variants"]
    assert failed["variant_id"] == str(keys[1]) and failed["stage"] == "vlm_analyze"
    assert "is missing" in failed["error"]
    text = page.read_text(encoding="utf-8")
    assert f"Variant {keys[1]} was left out: it failed at vlm_analyze (" in text
