"""``pgstagechain graph`` run for real (live figures from a real database), and the admin
reads the dashboard is built on: ``live``, ``throughput``, ``failures(stage=...)``."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, ClassVar

import psycopg
import pydot
import pytest
from psycopg import sql

from pgstagechain import ConfigurationError, Worker, admin, claim, fail, migrate
from pgstagechain.dashboard import Dashboard
from tests.apps.cli_app import pipeline
from tests.apps.seed import GROUP_STAGES, ROW_STAGES, add_jobs, create_tables

pytestmark = [pytest.mark.anyio, pytest.mark.filterwarnings("ignore:.*deprecated - use")]

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.apps.cli_app:pipeline"
BAD = 101


def graph_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgstagechain", "graph", APP, *args],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "PGSTAGECHAIN_DSN"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def run_chain(dsn: str) -> None:
    """Three jobs of two variants through the seed; variant 101 fails at overlay."""
    create_tables(dsn)
    await migrate(dsn, pipeline)
    add_jobs(dsn, jobs=3, variants=2, release=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE jobs_variants SET img_asset_id = 'bad' WHERE job_variants_id = %s", (BAD,)
        )
        conn.execute("UPDATE jobs_variants SET status = 'done'")
    await Worker(pipeline, dsn, scan_interval=1).run_until_idle()


def test_graph_without_a_database_in_every_format(tmp_path: Path) -> None:
    mermaid = graph_command()
    assert mermaid.returncode == 0, mermaid.stderr
    assert mermaid.stdout.startswith("flowchart LR")
    assert mermaid.stdout.count(":::group") == len(GROUP_STAGES)
    (parsed,) = pydot.graph_from_dot_data(graph_command("--format", "dot").stdout)
    assert len([n for n in parsed.get_nodes() if n.get_name() != "node"]) == 11
    target = tmp_path / "pipeline.svg"
    done = graph_command("--format", "svg", "-o", str(target))
    assert done.returncode == 0, done.stderr
    root = ET.parse(target).getroot()
    assert len(root.findall("{http://www.w3.org/2000/svg}g")) == 11


async def test_graph_live_shows_the_counts_of_the_database(pgstagechain_dsn: str) -> None:
    await run_chain(pgstagechain_dsn)
    done = graph_command("--format", "dot", "--live", "--dsn", pgstagechain_dsn)
    assert done.returncode == 0, done.stderr
    (parsed,) = pydot.graph_from_dot_data(done.stdout)
    labels = {n.get_name().strip('"'): n.get("label") for n in parsed.get_nodes()}
    assert "waiting 0 · running 0 · failed 1" in labels["overlay"]
    assert "waiting 0 · running 0 · failed 0" in labels["vlm_analyze"]
    assert "/min" in labels["vlm_analyze"]
    svg = graph_command("--format", "svg", "--live", "--dsn", pgstagechain_dsn)
    root = ET.fromstring(svg.stdout)
    overlay = next(
        g for g in root.iter("{http://www.w3.org/2000/svg}g") if g.get("data-stage") == "overlay"
    )
    failed = next(t for t in overlay.iter() if t.get("data-field") == "failed")
    assert failed.text == "1"


async def test_graph_live_without_a_reachable_database_is_one_line() -> None:
    done = graph_command("--live", "--dsn", "host=/nonexistent dbname=x connect_timeout=2")
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1


async def test_live_agrees_with_status_and_throughput_with_the_ledger(
    pgstagechain_dsn: str,
) -> None:
    await run_chain(pgstagechain_dsn)
    # a backlog: two rows waiting at vlm_analyze, one of them held with a retry pending
    add_jobs(pgstagechain_dsn, jobs=1, variants=2, first_job=9)
    async with await psycopg.AsyncConnection.connect(pgstagechain_dsn, autocommit=True) as conn:
        held = await claim(conn, pipeline, "vlm_analyze", 901)
        assert held is not None
        await fail(conn, pipeline, held, "model busy", retry_in=600)
        full = await admin.status(conn, pipeline)
        live = await admin.live(conn, pipeline)
        assert [s.stage for s in live.stages] == ROW_STAGES + GROUP_STAGES
        for each in full.stages:
            seen = live[each.stage]
            assert (seen.waiting, seen.running, seen.retrying, seen.failed) == (
                each.waiting,
                each.running,
                each.retrying,
                each.failed,
            ), each.stage
            assert seen.oldest_waiting is None or each.oldest_waiting is not None
            assert seen.runs == each.runs
        assert live["vlm_analyze"].waiting == 1 and live["vlm_analyze"].running == 1
        assert live["overlay"].failed == 1

        minutes = await admin.throughput(conn, pipeline, minutes=5)
        by_stage: dict[str, tuple[int, int]] = {}
        for m in minutes:
            ok, bad = by_stage.get(m.stage, (0, 0))
            by_stage[m.stage] = (ok + m.succeeded, bad + m.failed)
        assert by_stage["vlm_analyze"] == (6, 1)  # six through, one failed attempt held
        assert by_stage["overlay"] == (5, 1)
        assert by_stage["instagram_feed_gen"] == (2, 0)
        with pytest.raises(ConfigurationError, match="minutes"):
            await admin.throughput(conn, pipeline, minutes=0)

        (failure,) = await admin.failures(conn, pipeline, stage="overlay")
        assert (failure.key, failure.attempt) == (str(BAD), 1)
        assert "unreadable image" in (failure.error or "")
        assert await admin.failures(conn, pipeline, stage="planner") == []
        with pytest.raises(ConfigurationError, match="no stage 'nope'"):
            await admin.failures(conn, pipeline, stage="nope")


class Recording(psycopg.AsyncCursor[Any]):
    """A cursor that notes every statement it runs, with its parameters."""

    seen: ClassVar[list[tuple[Any, Any]]] = []

    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        Recording.seen.append((query, params))
        return await super().execute(query, params, **kwargs)


def _scans(node: dict[str, Any]) -> list[dict[str, Any]]:
    found = [node] if "Relation Name" in node or "Index Name" in node else []
    for child in node.get("Plans", []):
        found += _scans(child)
    return found


async def test_every_statement_of_a_refresh_has_an_index_path(pgstagechain_dsn: str) -> None:
    """With sequential scans priced out (as on a big table), no statement of a refresh
    reads the user's table or the groups whole; the time-bounded ones reach the run ledger
    by its block-range index on finished_at, and the live workers through their rows."""
    await run_chain(pgstagechain_dsn)
    board = Dashboard(pipeline, pgstagechain_dsn)
    async with await psycopg.AsyncConnection.connect(pgstagechain_dsn, autocommit=True) as conn:
        conn.cursor_factory = Recording
        Recording.seen.clear()
        await board.read(conn, None)
        await board.read(conn, "overlay")
        conn.cursor_factory = psycopg.AsyncCursor
        await conn.execute("SET enable_seqscan = off")
        wide, timed, workers = [], [], []
        for query, params in Recording.seen:
            text = " ".join(
                (query.as_string(conn) if isinstance(query, sql.Composable) else str(query)).split()
            )
            scans = await _plan_scans(conn, text, params)
            wide += [
                f"{s['Relation Name']}: {text[:80]}"
                for s in scans
                if s["Node Type"] == "Seq Scan"
                and s.get("Relation Name") in ("groups", "jobs_variants")
            ]
            if "finished_at >" in text:
                # without the history index (led by the pipeline: it would read every run)
                async with conn.transaction(force_rollback=True):
                    await conn.execute("DROP INDEX pgstagechain.runs_row")
                    scans = await _plan_scans(conn, text, params)
                # the index bounds the time (not merely finished_at IS NOT NULL)
                timed.append(
                    {
                        f"{s.get('Index Name') or s['Node Type']} {'bounded' if 'finished_at >' in s.get('Index Cond', '') else ''}".strip()
                        for s in scans
                        if s.get("Relation Name") != "migrations"
                    }
                )
            if "worker_id" in text and "array_agg" in text:  # admin.workers
                workers.append({s.get("Index Name") for s in scans})
    assert wide == []
    assert len(timed) == 4 and all(
        found == {"runs_finished bounded", "Bitmap Heap Scan"} for found in timed
    ), timed
    assert workers and all(
        {"pgstagechain_feedly_state", "groups_state"} <= found for found in workers
    ), workers


async def _plan_scans(conn: Any, text: str, params: Any) -> list[dict[str, Any]]:
    cur = await conn.execute("EXPLAIN (FORMAT JSON) " + text, params)
    (plan,) = (await cur.fetchone())[0]
    return _scans(plan["Plan"])
