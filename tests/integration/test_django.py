"""The Django app: settings, management commands run for real, a worker process, and
a row released inside ``transaction.atomic()`` that the worker hears of at commit."""

from __future__ import annotations

import io
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

pytest.importorskip("django")

from django.core.exceptions import ImproperlyConfigured

from tests.helpers import listen_to_all, wait_for

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "django_app"
DEADLINE = 60.0  # a bound for a test that hangs, never a speed assertion


def django_database(dsn: str) -> dict[str, Any]:
    params = conninfo_to_dict(dsn)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": params["dbname"],
        "USER": params.get("user", ""),
        "PASSWORD": params.get("password", ""),
        "HOST": params.get("host", ""),
        "PORT": params.get("port", ""),
    }


@pytest.fixture(scope="module")
def django_dsn(pgstagechain_server: Any) -> Iterator[str]:
    """A database of its own, Django configured for it once (settings are per process)."""
    import django
    from django.conf import settings

    name = pgstagechain_server.create_database("django")
    dsn = pgstagechain_server.dsn_for(name)
    sys.path.insert(0, str(EXAMPLE))
    if settings.configured:
        pytest.skip("Django was configured elsewhere in this process")
    settings.configure(
        DATABASES={
            "default": django_database(dsn),
            "replica": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": "shop",
                "USER": "app",
                "PASSWORD": "s3cret word",
                "HOST": "db.internal",
                "PORT": 6432,
                "OPTIONS": {
                    "sslmode": "require",
                    "isolation_level": 1,
                    "server_side_binding": True,
                },
            },
        },
        INSTALLED_APPS=["pgstagechain.contrib.django", "ads"],
        PGSTAGECHAIN_PIPELINES=["ads.pipeline:pipeline"],
        USE_TZ=True,
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    django.setup()
    try:
        yield dsn
    finally:
        from django.db import connections

        connections.close_all()
        sys.path.remove(str(EXAMPLE))
        pgstagechain_server.drop_database(name)


@pytest.fixture(scope="module")
def migrated(django_dsn: str) -> str:
    from django.core.management import call_command

    out = io.StringIO()
    call_command("migrate", stdout=out, verbosity=1)
    assert "pgstagechain: schema up to date, pipelines installed: ads" in out.getvalue()
    return django_dsn


def test_conninfo_from_django_settings(django_dsn: str) -> None:
    from pgstagechain.contrib.django import conninfo, pipelines, worker_options

    assert conninfo_to_dict(conninfo("replica")) == {
        "dbname": "shop",
        "user": "app",
        "password": "s3cret word",
        "host": "db.internal",
        "port": "6432",
        "sslmode": "require",  # libpq options pass; Django's own do not
    }
    assert conninfo_to_dict(conninfo())["dbname"] == conninfo_to_dict(django_dsn)["dbname"]
    with pytest.raises(ImproperlyConfigured, match="no database 'nope'"):
        conninfo("nope")
    assert [p.name for p in pipelines()] == ["ads"]
    with pytest.raises(ImproperlyConfigured, match="no configured pipeline named other"):
        pipelines(["other"])
    assert worker_options() == {}


def test_migrate_installs_the_pipeline(migrated: str) -> None:
    from django.core.management import call_command

    with psycopg.connect(migrated) as conn:
        assert conn.execute("SELECT name, table_name FROM pgstagechain.pipelines").fetchall() == [
            ("ads", "jobs_variants")
        ]
        assert conn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'jobs_variants'::regclass"
            " AND NOT tgisinternal"
        ).fetchall() == [("pgstagechain_ads",)]
    out = io.StringIO()
    call_command("pgstagechain_migrate", stdout=out)
    assert out.getvalue().splitlines() == [
        "schema: up to date",
        "pipeline ads: trigger installed on public.jobs_variants",
    ]


class WorkerProcess:
    """``manage.py pgstagechain_worker`` of the example project, as a real process."""

    def __init__(self, dsn: str) -> None:
        params = conninfo_to_dict(dsn)
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "mysite.settings"}
        for key, var in [
            ("host", "PGHOST"),
            ("port", "PGPORT"),
            ("user", "PGUSER"),
            ("password", "PGPASSWORD"),
            ("dbname", "PGDATABASE"),
        ]:
            if key in params:
                env[var] = str(params[key])
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "pgstagechain_worker", "--scan-interval", "1"],
            cwd=EXAMPLE,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, text: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {text!r} in {self.output}"
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.output.append(line)
            if text in line:
                return

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.reader.join(timeout=DEADLINE)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def test_worker_command_runs_what_a_transaction_commits(migrated: str) -> None:
    from ads.models import Job, Variant
    from ads.pipeline import pipeline
    from django.db import transaction

    worker = WorkerProcess(migrated)
    try:
        worker.wait_for("pgstagechain worker running: ads")
        with psycopg.connect(migrated, autocommit=True) as listen:
            listen.execute(listen_to_all(pipeline))

            # Rolled back: the trigger fired, but its notification dies with the transaction.
            with pytest.raises(RuntimeError), transaction.atomic():
                job = Job.objects.create(job_id=9, tenant_id="t")
                Variant.objects.create(job_variants_id=901, job=job, tenant_id="t", status="done")
                raise RuntimeError("changed my mind")

            with transaction.atomic():
                job = Job.objects.create(job_id=1, tenant_id="t")
                for n in (1, 2, 3):
                    Variant.objects.create(job_variants_id=100 + n, job=job, tenant_id="t")
                Variant.objects.filter(job=job).update(status="done")  # (img_gen, done)
                # Not committed: nothing was announced, so nothing can have run.
                assert list(listen.notifies(timeout=0.2, stop_after=1)) == []
                with psycopg.connect(migrated) as other:
                    assert other.execute("SELECT count(*) FROM pgstagechain.runs").fetchone() == (
                        0,
                    )
            # Committed: the worker hears of it and the chain runs to the job-level stage.
            heard = list(listen.notifies(timeout=DEADLINE, stop_after=1))
            assert heard and heard[0].payload.startswith('["r", "img_gen", "10')

        job = wait_for(lambda: Job.objects.filter(job_id=1, feed__isnull=False).first())
        variants = list(
            Variant.objects.order_by("pk").values_list("pk", "current_step", "status", "score")
        )
        assert [v[:3] for v in variants] == [
            (101, "judge", "done"),
            (102, "judge", "done"),
            (103, "judge", "done"),
        ]
        kept = [str(pk) for pk, *_, score in variants if score < 0.5]
        assert job.feed == ",".join(kept)
        assert not Job.objects.filter(job_id=9).exists()

        worker.proc.send_signal(signal.SIGTERM)
        worker.wait_for("pgstagechain worker stopped")
        # the library's records, formatted by the project's LOGGING
        assert any(" INFO pgstagechain.listener: listening on " in line for line in worker.output)
        assert worker.proc.wait(timeout=DEADLINE) == 0
    finally:
        worker.kill()
    with psycopg.connect(migrated) as conn:
        assert conn.execute(
            "SELECT stage, state, count(*) FROM pgstagechain.runs GROUP BY 1, 2 ORDER BY 1"
        ).fetchall() == [
            ("analyze", "succeeded", 3),
            ("compose_feed", "succeeded", 1),
            ("judge", "succeeded", 3),
        ]


def example_env(dsn: str) -> dict[str, str]:
    params = conninfo_to_dict(dsn)
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "mysite.settings"}
    for key, var in [("host", "PGHOST"), ("port", "PGPORT"), ("user", "PGUSER")]:
        if key in params:
            env[var] = str(params[key])
    env["PGDATABASE"] = str(params["dbname"])
    return env


def test_manage_py_test_passes_with_an_async_orm_stage(pgstagechain_server: Any) -> None:
    """The example's own tests, in Django's runner: its test database can be dropped at the
    end, so no connection of the async ORM stage was left open."""
    name = pgstagechain_server.create_database("djtest")
    try:
        done = subprocess.run(
            [sys.executable, "manage.py", "test", "ads", "--noinput", "-v", "2"],
            cwd=EXAMPLE,
            env=example_env(pgstagechain_server.dsn_for(name)),
            capture_output=True,
            text=True,
            timeout=DEADLINE * 2,
        )
    finally:
        pgstagechain_server.drop_database(name)
        pgstagechain_server.drop_database(f"test_{name}")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "test_a_job_runs_to_its_feed" in output and "OK" in output
    assert "being accessed by other users" not in output


def test_worker_command_says_to_run_manage_py_migrate(migrated: str) -> None:
    with psycopg.connect(migrated, autocommit=True) as conn:
        # as if a stage had been added since `migrate` ran
        conn.execute(
            "UPDATE pgstagechain.pipelines SET config = jsonb_set(config, '{digest}', '\"old\"')"
        )
    try:
        done = subprocess.run(
            [sys.executable, "manage.py", "pgstagechain_worker"],
            cwd=EXAMPLE,
            env=example_env(migrated),
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
    finally:
        from django.core.management import call_command

        call_command("pgstagechain_migrate", stdout=io.StringIO())
    assert done.returncode == 1
    assert done.stderr.startswith("CommandError: pipeline 'ads' changed since it was installed")
    assert "python manage.py migrate" in done.stderr
    assert "APP:PIPELINE" not in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_migrate_plans_then_maps_a_renamed_stage(migrated: str) -> None:
    """``pgstagechain_migrate --plan`` says what a rename does and changes nothing; without
    ``--map`` the rename is refused with the plan; with it, the rows at the old step move."""
    from django.core.management import call_command
    from django.core.management.base import CommandError
    from django.test import override_settings

    with psycopg.connect(migrated, autocommit=True) as conn:
        conn.execute("INSERT INTO jobs (job_id, tenant_id) VALUES (9100, 't')")
        conn.execute(
            "INSERT INTO jobs_variants (job_variants_id, job_id, tenant_id, current_step, status)"
            " VALUES (9101, 9100, 't', 'judge', 'done'), (9102, 9100, 't', 'judge', 'failed')"
        )

    def steps() -> list[tuple[Any, ...]]:
        with psycopg.connect(migrated) as conn:
            return conn.execute(
                "SELECT job_variants_id, current_step, status FROM jobs_variants"
                " WHERE job_id = 9100 ORDER BY 1"
            ).fetchall()

    def command(*args: str) -> str:
        out = io.StringIO()
        call_command("pgstagechain_migrate", *args, stdout=out)
        return out.getvalue()

    with override_settings(PGSTAGECHAIN_PIPELINES=["tests.apps.ads_renamed:pipeline"]):
        planned = command("--plan", "--map", "judge=assess")
        assert planned.startswith("schema: up to date")
        assert "judge" in planned and "assess" in planned
        assert steps() == [(9101, "judge", "done"), (9102, "judge", "failed")]  # unchanged
        with pytest.raises(CommandError, match="judge"):
            command()  # rows sit at a step the new graph does not have
        with pytest.raises(CommandError, match="--map takes OLD=NEW"):
            command("--map", "judge")
        assert command("--map", "judge=assess").splitlines()[-1] == (
            "pipeline ads: trigger installed on public.jobs_variants"
        )
        assert steps() == [(9101, "assess", "done"), (9102, "assess", "failed")]
    # back to the example's graph, for whatever runs after
    command("--map", "assess=judge")
    assert steps() == [(9101, "judge", "done"), (9102, "judge", "failed")]
    with psycopg.connect(migrated, autocommit=True) as conn:
        conn.execute("DELETE FROM jobs_variants WHERE job_id = 9100")
        conn.execute("DELETE FROM jobs WHERE job_id = 9100")
