"""What an embedded worker costs in connections, and running it in one process of many."""

from __future__ import annotations

from typing import Any

import anyio
import psycopg
import pytest

from pgstagechain import DatabaseAccessError, Worker, migrate
from pgstagechain.contrib import run_elected_workers
from tests.apps import web_app

pytestmark = pytest.mark.anyio
HANG_GUARD = 60.0  # a bound for a test that hangs, never a speed assertion


def test_max_connections_states_the_budget() -> None:
    assert Worker(web_app.pipeline, concurrency=20).max_connections == 4 + 10 + 10
    assert Worker(web_app.pipeline, pool_size=2).max_connections == 4 + 2 + 2
    assert Worker(web_app.pipeline, pool_size=2, listen=False).max_connections == 3 + 2 + 2


def backends(dsn: str) -> list[str]:
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [
            name
            for (name,) in conn.execute(
                "SELECT application_name FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (dbname,),
            ).fetchall()
        ]


async def wait_for(check: Any) -> Any:
    with anyio.fail_after(HANG_GUARD):
        while True:
            found = check()
            if found:
                return found
            await anyio.sleep(0.05)


async def test_a_worker_stays_within_its_budget(pgstagechain_dsn: str) -> None:
    web_app.create_table(pgstagechain_dsn)
    await migrate(pgstagechain_dsn, web_app.pipeline)
    with psycopg.connect(pgstagechain_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO orders (id) SELECT generate_series(1, 200)")
    worker = Worker(web_app.pipeline, pgstagechain_dsn, concurrency=20, pool_size=3)
    most = 0
    async with anyio.create_task_group() as tg:

        async def sample() -> None:
            nonlocal most
            while True:
                most = max(most, len(await anyio.to_thread.run_sync(backends, pgstagechain_dsn)))
                await anyio.sleep(0.01)

        tg.start_soon(sample)
        with anyio.fail_after(HANG_GUARD):
            await worker.run_until_idle()
        tg.cancel_scope.cancel()
    assert worker.stats.succeeded == 400
    assert 0 < most <= worker.max_connections == 4 + 3 + 3


async def test_one_process_of_many_runs_the_workers(pgstagechain_dsn: str) -> None:
    web_app.create_table(pgstagechain_dsn)
    await migrate(pgstagechain_dsn, web_app.pipeline)
    options = {"retry_interval": 0.2, "pool_size": 2}
    async with (
        run_elected_workers(web_app.pipeline, pgstagechain_dsn, **options) as first,
        run_elected_workers(web_app.pipeline, pgstagechain_dsn, **options) as second,
        run_elected_workers(web_app.pipeline, pgstagechain_dsn, **options) as third,
    ):
        assert len(first) == 1 and second == [] and third == []
        names = await anyio.to_thread.run_sync(backends, pgstagechain_dsn)
        assert names.count("pgstagechain-election") == 3
        assert len(names) <= 3 + first[0].max_connections
        with psycopg.connect(pgstagechain_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO orders (id) VALUES (1)")
        (worker,) = first
        await wait_for(lambda: worker.stats.succeeded == 2)


async def test_another_process_takes_over(pgstagechain_dsn: str) -> None:
    web_app.create_table(pgstagechain_dsn)
    await migrate(pgstagechain_dsn, web_app.pipeline)
    seen: dict[str, list[Worker]] = {}
    stop = {"leader": anyio.Event(), "follower": anyio.Event()}

    async def process(name: str, *, task_status: Any) -> None:
        options = {"retry_interval": 0.2, "pool_size": 2}
        async with run_elected_workers(web_app.pipeline, pgstagechain_dsn, **options) as workers:
            seen[name] = workers
            task_status.started()
            await stop[name].wait()

    async with anyio.create_task_group() as tg:
        await tg.start(process, "leader")
        await tg.start(process, "follower")
        assert len(seen["leader"]) == 1 and seen["follower"] == []
        stop["leader"].set()  # the leading process stops
        (worker,) = await wait_for(lambda: list(seen["follower"]))
        await wait_for(lambda: worker.listener and worker.listener.connected.is_set())
        with psycopg.connect(pgstagechain_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO orders (id) VALUES (1)")
        await wait_for(lambda: worker.stats.succeeded == 2)
        stop["follower"].set()


async def test_a_refused_login_fails_every_process(pgstagechain_dsn: str) -> None:
    dsn = psycopg.conninfo.make_conninfo(pgstagechain_dsn, user="nobody_here")
    with pytest.raises(DatabaseAccessError, match='role "nobody_here" does not exist'):
        async with run_elected_workers(web_app.pipeline, dsn):
            raise AssertionError("must not start")
