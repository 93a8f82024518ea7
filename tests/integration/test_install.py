"""Installing the database side: idempotent, exact to undo, quoted names, honest trigger."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from pgstagechain import (
    NotInstalledError,
    Pipeline,
    SchemaMismatchError,
    Worker,
    migrate,
    uninstall,
)
from pgstagechain._connect import connect
from pgstagechain._migrations import LATEST, applied_version
from tests.apps.seed import create_tables, seed_pipeline
from tests.helpers import listen_to_all

pytestmark = pytest.mark.anyio

CATALOG = """
SELECT 'trigger:' || tgname FROM pg_trigger WHERE NOT tgisinternal
UNION ALL SELECT 'function:' || p.oid::regprocedure::text FROM pg_proc p
    JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
UNION ALL SELECT 'index:' || indexrelid::regclass::text FROM pg_index i
    JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'public'
ORDER BY 1
"""


def catalog(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        return {name for (name,) in conn.execute(CATALOG).fetchall()}


async def noop(ctx: Any) -> None:
    return None


async def test_install_is_idempotent_and_uninstall_removes_exactly_what_it_added(
    pgstagechain_dsn: str,
) -> None:
    create_tables(pgstagechain_dsn)
    before = catalog(pgstagechain_dsn)
    pipeline = seed_pipeline(noop)
    assert await migrate(pgstagechain_dsn, pipeline) == []  # the template already has the schema
    once = catalog(pgstagechain_dsn)
    await migrate(pgstagechain_dsn, pipeline)
    assert catalog(pgstagechain_dsn) == once
    added = once - before
    assert "trigger:pgstagechain_feedly" in added
    assert "function:pgstagechain.notify_feedly()" in added
    async with await connect(pgstagechain_dsn, autocommit=True) as conn:
        await uninstall(conn, pipeline)
        assert await applied_version(conn) == LATEST
    assert catalog(pgstagechain_dsn) == before


async def test_existing_index_is_reused_not_duplicated(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    with psycopg.connect(pgstagechain_dsn, autocommit=True) as conn:
        conn.execute("CREATE INDEX my_state ON jobs_variants (current_step, status)")
    before = catalog(pgstagechain_dsn)
    await migrate(pgstagechain_dsn, seed_pipeline(noop))
    added = {name for name in catalog(pgstagechain_dsn) - before if name.startswith("index:")}
    assert added == {"index:pgstagechain_feedly_group"}


async def test_fresh_schema_from_nothing(pgstagechain_server: Any) -> None:
    name = pgstagechain_server.create_database("fresh")
    dsn = pgstagechain_server.dsn_for(name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP SCHEMA pgstagechain CASCADE")
        assert await migrate(dsn) == list(range(1, LATEST + 1))
        assert await migrate(dsn) == []
    finally:
        pgstagechain_server.drop_database(name)


async def test_missing_table_and_column_are_named(pgstagechain_dsn: str) -> None:
    pipeline = seed_pipeline(noop)
    with pytest.raises(SchemaMismatchError, match=r"public\.jobs_variants does not exist"):
        await migrate(pgstagechain_dsn, pipeline)
    create_tables(pgstagechain_dsn)
    wrong = Pipeline(
        "wrong",
        table="jobs_variants",
        key="job_variants_id",
        start="img_gen",
        extra_columns=["tenant", "img_asset_id"],
    )
    wrong.stage(after="img_gen", name="a")(noop)
    with pytest.raises(SchemaMismatchError, match=r"no column.*'tenant'"):
        await migrate(pgstagechain_dsn, wrong)


async def test_worker_refuses_a_changed_or_missing_install(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    pipeline = seed_pipeline(noop)
    with pytest.raises(NotInstalledError, match="not installed"):
        await Worker(pipeline, pgstagechain_dsn).run_until_idle()
    await migrate(pgstagechain_dsn, pipeline)
    changed = seed_pipeline(noop)
    changed.stage(after="instagram_feed_gen", name="publish", group=True)(noop)
    with pytest.raises(NotInstalledError, match="changed since it was installed"):
        await Worker(changed, pgstagechain_dsn).run_until_idle()


async def test_quoted_names_work_end_to_end(pgstagechain_dsn: str) -> None:
    with psycopg.connect(pgstagechain_dsn, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA "My Schema"')
        conn.execute(
            'CREATE TABLE "My Schema"."Odd Table" ("the key" uuid PRIMARY KEY DEFAULT gen_random_uuid(),'
            ' "Step" text, "state; drop" text, "group" int)'
        )
        conn.execute(
            'INSERT INTO "My Schema"."Odd Table" ("Step", "state; drop", "group")'
            " SELECT 'start', 'done', g FROM generate_series(1, 3) g, generate_series(1, 2)"
        )
    pipeline = Pipeline(
        "odd",
        schema="My Schema",
        table="Odd Table",
        key="the key",
        step_column="Step",
        status_column="state; drop",
        group_column="group",
        start="start",
    )
    pipeline.stage(after="start", name="first")(noop)
    pipeline.stage(after="first", name="together", group=True)(noop)
    await migrate(pgstagechain_dsn, pipeline)
    await Worker(pipeline, pgstagechain_dsn, scan_interval=1).run_until_idle()
    with psycopg.connect(pgstagechain_dsn) as conn:
        rows = conn.execute(
            'SELECT "Step", "state; drop", count(*) FROM "My Schema"."Odd Table" GROUP BY 1, 2'
        ).fetchall()
        groups = conn.execute(
            "SELECT step, status, count(*) FROM pgstagechain.groups GROUP BY 1, 2"
        ).fetchall()
    assert rows == [("first", "done", 6)]
    assert groups == [("together", "done", 3)]


async def test_trigger_notifies_only_real_changes_to_done(pgstagechain_dsn: str) -> None:
    create_tables(pgstagechain_dsn)
    pipeline = seed_pipeline(noop)
    await migrate(pgstagechain_dsn, pipeline)
    with (
        psycopg.connect(pgstagechain_dsn, autocommit=True) as listen,
        psycopg.connect(pgstagechain_dsn, autocommit=True) as conn,
    ):
        listen.execute(listen_to_all(pipeline))
        conn.execute("INSERT INTO jobs VALUES (1, 't', 'img_gen', 'running')")
        conn.execute(
            "INSERT INTO jobs_variants (job_variants_id, job_id, img_asset_id, tenant_id, current_step, status)"
            " VALUES (101, 1, 'a', 't', 'img_gen', 'running')"
        )
        conn.execute("UPDATE jobs_variants SET status = 'done' WHERE job_variants_id = 101")
        conn.execute(
            "UPDATE jobs_variants SET status = 'done' WHERE job_variants_id = 101"
        )  # no change
        conn.execute("UPDATE jobs_variants SET img_asset_id = 'b' WHERE job_variants_id = 101")
        conn.execute("UPDATE jobs_variants SET current_step = 'vlm_analyze', status = 'running'")
        notes = list(listen.notifies(timeout=0.5))
        (partition,) = conn.execute("SELECT hashtext('101') & 63").fetchone() or ()
    assert [json.loads(n.payload) for n in notes] == [["r", "img_gen", "101", "1"]]
    # on the channel of the key's partition, the one its owner listens to
    assert [n.channel for n in notes] == [f"pgstagechain_feedly.{partition}"]
    assert all(len(n.payload.encode()) < 200 for n in notes)
