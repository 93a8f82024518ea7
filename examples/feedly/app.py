"""Feedly, end to end: product images in, Instagram posts out, driven by PostgreSQL.

``python -m examples.feedly [--dsn URL] [--jobs N] [--variants M] [--workers W]
[--images DIR] [--out DIR] [--dashboard]``

1. Without a database URL (``--dsn``, ``FEEDLY_DSN`` or ``PGSTAGECHAIN_DSN``) an embedded
   PostgreSQL starts from the ``pgserver`` wheel, with its data in ``./.pgdata/feedly``;
   it is stopped again at exit.
2. The example's tables are created (``schema.sql``) and the pipeline is installed with
   :func:`pgstagechain.migrate`.
3. Workers start: ``--workers 1`` runs a :class:`~pgstagechain.Worker` in this process;
   more start that many ``pgstagechain worker examples.feedly.pipeline:pipeline`` processes.
4. This program then plays the upstream image generator: for each job it writes M variant
   shots of a product image and sets each variant to ``('img_gen', 'done')``. Nothing else
   is called: the trigger, the workers and the fan-in carry every job to its post.
5. It watches the database until every job has its post (or cannot get one), stops the
   workers, and prints per-stage timings and the path of an HTML gallery.

The exit status is 0 when every job got its post, 1 otherwise (the failed rows and their
errors are listed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import psycopg
from PIL import Image, ImageEnhance, ImageOps
from psycopg import AsyncConnection
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from pgstagechain import Worker, admin, migrate, redact

from .pipeline import pipeline
from .vision.gallery import write_gallery
from .vision.sample_images import DEFAULT_DIR, IMAGE_SUFFIXES, load_image

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
SCHEMA = HERE / "schema.sql"
PIPELINE_SPEC = "examples.feedly.pipeline:pipeline"

COPIES = (
    "New arrival: Summer Sale, up to 30% off",
    "Limited edition. Free shipping, shop now!",
    "Best seller. Buy one get one free",
    "Flash sale: 20% off today only",
)
TENANTS = ("tenant-a", "tenant-b")
STAGES = [s.name for s in pipeline]
ROW_STAGES = [s.name for s in pipeline if not s.group]

log = logging.getLogger("feedly")


# -- the database ---------------------------------------------------------------------------------


@contextlib.contextmanager
def database(
    dsn: str | None, pgdata: Path, console: Console, *, keep: bool = False
) -> Iterator[str]:
    """Yield a connection string: the given one, or an embedded server's (stopped at exit).

    The embedded server's ``feedly`` database is the demo's own: unless ``keep``, it is
    made afresh so each run starts at job 1. A given server is never emptied."""
    if dsn:
        yield dsn
        return
    try:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            from pgserver.postgres_server import get_server
    except ImportError:
        raise SystemExit(
            "error: no --dsn given and the embedded server is not installed: "
            "pip install 'pgstagechain[feedly]' (or pass --dsn postgresql://...)"
        ) from None
    pgdata = pgdata.resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with console.status(f"starting embedded PostgreSQL in {pgdata} ..."):
        server = get_server(pgdata, cleanup_mode="stop")
    try:
        with psycopg.connect(server.get_uri(), autocommit=True) as conn:
            if not keep:
                conn.execute("DROP DATABASE IF EXISTS feedly WITH (FORCE)")
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'feedly'").fetchone():
                conn.execute("CREATE DATABASE feedly")
        yield str(server.get_uri("feedly"))
    finally:
        with console.status("stopping embedded PostgreSQL ..."):
            server.cleanup()


async def prepare(dsn: str) -> None:
    """Create the example's tables (idempotent) and install the pipeline."""
    async with await AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(SCHEMA.read_text(encoding="utf-8"))
        need = {
            "jobs": {"job_id", "tenant_id", "current_step", "status", "ad_copy", "out_dir"},
            "jobs_variants": {"job_variants_id", "job_id", "img_asset_id", "tenant_id"},
            "posts": {"job_id", "record"},
        }
        for table, columns in need.items():
            cur = await conn.execute(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND table_name = %s",
                (table,),
            )
            missing = columns - {c for (c,) in await cur.fetchall()}
            if missing:
                raise SystemExit(
                    f"error: table {table!r} already exists in this database without columns "
                    f"{sorted(missing)}; use another database for the example"
                )
    await migrate(dsn, pipeline)


def fresh_output(out: Path, keep: bool) -> None:
    """Make ``out`` ready for this run: emptied of an earlier run's files unless ``keep``.

    Only a folder that holds an earlier run (its ``run.json`` or ``feedly.log``) is emptied;
    any other non-empty folder is refused rather than deleted."""
    if out.exists() and not keep and any(out.iterdir()):
        if not any((out / marker).exists() for marker in ("run.json", "feedly.log")):
            raise SystemExit(
                f"error: --out {out} is not empty and holds no earlier Feedly run; "
                "choose an empty or new folder (or pass --keep to write into it)"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


# -- the upstream image generator (what sets variants to img_gen/done) ---------------------------


def reframe(src: Image.Image, k: int) -> Image.Image:
    """Variant ``k`` of a product shot: mirrored, zoomed or re-toned, so the variants of a
    job differ in where the free space for text is and in how it reads."""
    img = ImageOps.mirror(src) if k % 2 else src.copy()
    w, h = img.size
    zoom = (1.0, 1.0, 0.8, 0.8, 0.9, 0.9)[k % 6]
    if zoom < 1.0:
        cw, ch = round(w * zoom), round(h * zoom)
        x = 0 if (k // 2) % 2 else w - cw
        y = 0 if k % 3 else h - ch
        img = img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.LANCZOS)
    if k >= 4:
        img = ImageEnhance.Color(img).enhance(1.25 if k % 2 else 0.8)
    return img


def product_images(directory: Path) -> list[Path]:
    paths = sorted(
        p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not paths:
        raise SystemExit(f"error: no {'/'.join(IMAGE_SUFFIXES)} images in {directory}")
    return paths


def _save(img: Image.Image, path: Path) -> None:
    img.save(path, compress_level=1)


async def create_jobs(
    conn: AsyncConnection[Any], images: Sequence[Path], jobs: int, variants: int, out: Path
) -> list[tuple[int, list[int]]]:
    """Insert the jobs and their variants at ``('img_gen', 'running')``; write the shots."""
    made: list[tuple[int, list[int]]] = []
    for n in range(jobs):
        source = images[n % len(images)]
        tenant = TENANTS[n % len(TENANTS)]
        copy = COPIES[n % len(COPIES)]
        async with conn.transaction():
            cur = await conn.execute(
                "INSERT INTO jobs (tenant_id, product, ad_copy, out_dir)"
                " VALUES (%s, %s, %s, %s) RETURNING job_id",
                (tenant, source.stem, copy, str(out)),
            )
            (job_id,) = await cur.fetchone() or (0,)
            src = await anyio.to_thread.run_sync(load_image, source)
            keys: list[int] = []
            for k in range(variants):
                shot = out / str(job_id) / "img_gen" / f"{source.stem}_{k + 1}.png"
                shot.parent.mkdir(parents=True, exist_ok=True)
                img = reframe(src, k)
                await anyio.to_thread.run_sync(_save, img, shot)
                asset = f"{job_id}-{k + 1}-{source.stem}"
                await conn.execute(
                    "INSERT INTO img_assets (img_asset_id, tenant_id, path, product)"
                    " VALUES (%s, %s, %s, %s)",
                    (asset, tenant, str(shot), source.stem),
                )
                cur = await conn.execute(
                    "INSERT INTO jobs_variants (job_id, img_asset_id, tenant_id)"
                    " VALUES (%s, %s, %s) RETURNING job_variants_id",
                    (job_id, asset, tenant),
                )
                (key,) = await cur.fetchone() or (0,)
                keys.append(key)
        made.append((job_id, keys))
    return made


async def release(conn: AsyncConnection[Any], job_id: int) -> None:
    """img_gen is done for the job's variants: from here on the pipeline takes over."""
    async with conn.transaction():
        await conn.execute(
            "UPDATE jobs_variants SET status = 'done' WHERE job_id = %s AND current_step = 'img_gen'",
            (job_id,),
        )
        await conn.execute(
            "UPDATE jobs SET status = 'done', updated_at = now() WHERE job_id = %s", (job_id,)
        )


# -- workers ----------------------------------------------------------------------------------------


@dataclass
class Workers:
    """Either one in-process :class:`Worker` or N ``pgstagechain worker`` processes."""

    count: int
    dsn: str
    concurrency: int
    logs: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    worker: Worker | None = None

    def ids(self) -> list[str]:
        return [f"feedly-w{i + 1}" for i in range(self.count)]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Workers]:
        self.logs.mkdir(parents=True, exist_ok=True)
        if self.count == 1:
            self.worker = Worker(
                pipeline, self.dsn, concurrency=self.concurrency, worker_id=self.ids()[0]
            )
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.worker.run)
                try:
                    await self.worker.wait_started()
                    yield self
                finally:
                    self.worker.stop()
            return
        try:
            await anyio.to_thread.run_sync(self.start_processes)
            yield self
        finally:
            await anyio.to_thread.run_sync(self.stop_processes)

    def start_processes(self) -> None:
        """``pgstagechain worker examples.feedly.pipeline:pipeline``, N times."""
        # The repo root on the path, so ``examples.feedly.pipeline`` imports from anywhere.
        path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path}
        for wid in self.ids():
            cmd = [
                sys.executable,
                "-m",
                "pgstagechain",
                "--dsn",
                self.dsn,
                "worker",
                PIPELINE_SPEC,
                "--concurrency",
                str(self.concurrency),
                "--worker-id",
                wid,
            ]
            with open(self.logs / f"{wid}.log", "wb") as out:
                self.procs.append(
                    subprocess.Popen(
                        cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
                    )
                )

    def stop_processes(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 45
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker process %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.wait()

    def dead(self) -> list[str]:
        """Worker processes that exited on their own, with the end of their log."""
        out = []
        for wid, proc in zip(self.ids(), self.procs, strict=False):
            if proc.poll() is not None:
                tail = (self.logs / f"{wid}.log").read_text(errors="replace")[-1500:]
                out.append(f"{wid} exited with status {proc.returncode}:\n{tail}")
        return out

    async def wait_listening(self, conn: AsyncConnection[Any], seconds: float = 120.0) -> None:
        """Wait until every worker process has its LISTEN connection open."""
        if not self.procs:
            return
        with anyio.fail_after(seconds):
            while await admin.listeners(conn) < len(self.procs):
                dead = self.dead()
                if dead:
                    raise SystemExit("error: a worker process failed to start\n" + dead[0])
                await anyio.sleep(0.2)


# -- watching progress ------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """The pipeline's status (:func:`pgstagechain.admin.status`) as this run sees it: the
    counts of an earlier run (``--keep``) taken off, and this run's jobs' failures."""

    done: dict[str, int]
    running: dict[str, int]
    failed: dict[str, int]
    posted: set[int]
    failures: list[dict[str, Any]]
    settled: bool

    @property
    def blocked(self) -> set[int]:
        return {int(f["job_id"]) for f in self.failures}

    def finished(self, job_ids: Sequence[int]) -> bool:
        """Every job has its post or cannot get one, and nothing is still moving."""
        return self.settled and all(j in self.posted or j in self.blocked for j in job_ids)


async def snapshot(
    conn: AsyncConnection[Any], job_ids: list[int], before: admin.PipelineStatus | None = None
) -> Snapshot:
    """Where this run's jobs are; ``before``: the status when they were released."""
    now = await admin.status(conn, pipeline)

    def since(figure: str) -> dict[str, int]:
        return {
            s.stage: getattr(s, figure) - (getattr(before[s.stage], figure) if before else 0)
            for s in now.stages
        }

    cur = await conn.execute("SELECT job_id FROM posts WHERE job_id = ANY(%s)", (job_ids,))
    posted = {j for (j,) in await cur.fetchall()}
    return Snapshot(
        done=since("done"),
        running={s.stage: s.running for s in now.stages},
        failed=since("failed"),
        posted=posted,
        failures=await failed_rows(conn, job_ids),
        settled=now.settled,
    )


async def failed_rows(conn: AsyncConnection[Any], job_ids: list[int]) -> list[dict[str, Any]]:
    """Variants and jobs that stopped at a failed stage, with the last error of that stage."""
    found = await admin.failures(conn, pipeline, groups=[str(j) for j in job_ids])
    rows = [
        {
            "level": "variant" if f.level == "row" else "job",
            "job_id": int(f.group_key or f.key),
            "key": f.key,
            "stage": f.stage,
            "error": f.error or "",
        }
        for f in found
    ]
    return sorted(rows, key=lambda r: (r["job_id"], r["key"]))


def progress_bars(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=32),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        console=console,
        disable=not console.is_terminal,
        refresh_per_second=4,
    )


async def watch(
    conn: AsyncConnection[Any],
    jobs: list[tuple[int, list[int]]],
    workers: Workers,
    console: Console,
    give_up: float,
) -> Snapshot:
    """Release the jobs, then follow them until each has a post or cannot get one."""
    job_ids = [j for j, _ in jobs]
    totals = {s.name: (len(job_ids) if s.group else sum(len(k) for _, k in jobs)) for s in pipeline}
    width = max(len(s) for s in STAGES) + 4
    started = time.monotonic()
    last_line = 0.0
    with progress_bars(console) as bars:
        tasks = {
            s.name: bars.add_task(
                f"{i + 1:>2} {s.name:<{width - 3}}" + (" job" if s.group else "    "),
                total=totals[s.name],
                note="",
            )
            for i, s in enumerate(pipeline)
        }
        before = await admin.status(conn, pipeline)
        for job_id, _keys in jobs:
            await release(conn, job_id)
        while True:
            snap = await snapshot(conn, job_ids, before)
            for name, task in tasks.items():
                running = snap.running.get(name, 0)
                note = f"[cyan]{running} running[/]" if running else ""
                failed = snap.failed.get(name, 0)
                if failed:
                    note += f" [bold red]{failed} failed[/]"
                bars.update(task, completed=snap.done.get(name, 0), note=note)
            elapsed = time.monotonic() - started
            if not console.is_terminal and elapsed - last_line >= 5:
                last_line = elapsed
                console.print(
                    f"[{elapsed:5.1f}s] "
                    + " ".join(f"{n}={snap.done.get(n, 0)}/{totals[n]}" for n in STAGES)
                    + f" posts={len(snap.posted)}/{len(job_ids)}"
                )
            if snap.finished(job_ids):
                return snap
            dead = workers.dead()
            if dead and len(dead) == len(workers.procs):
                raise SystemExit("error: every worker process exited\n" + "\n".join(dead))
            if elapsed > give_up:
                console.print(f"[bold red]gave up waiting after {give_up:.0f}s[/]")
                return snap
            await anyio.sleep(0.25)


# -- the report -------------------------------------------------------------------------------------


def _q(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1]


async def stage_timings(conn: AsyncConnection[Any], job_ids: list[int]) -> list[dict[str, Any]]:
    """Per stage: runs, p50/max duration, p50/max hand-off wait (previous stage finished ->
    this stage started: notification, claim and queueing behind busy slots), workers."""
    runs = [
        (r.stage, r.row_key, r.group_key, r.state, r.worker_id, r.started_at, r.finished_at)
        for r in await admin.runs(conn, pipeline, groups=[str(j) for j in job_ids])
    ]
    finished: dict[tuple[str, str], Any] = {}
    group_last: dict[tuple[str, str], Any] = {}
    for stage, key, group, state, _w, _s, end in runs:
        if state == "succeeded":
            finished[(stage, key)] = end
            if not pipeline[stage].group:
                prev = group_last.get((stage, group))
                group_last[(stage, group)] = end if prev is None else max(prev, end)
    out = []
    for s in pipeline:
        mine = [r for r in runs if r[0] == s.name]
        ok = [r for r in mine if r[3] == "succeeded"]
        durations = [(r[6] - r[5]).total_seconds() for r in ok]
        waits = []
        for _stage, key, group, _st, _w, start, _e in ok:
            if s.after in pipeline.start_steps:
                continue
            before = (
                group_last.get((s.after, group))
                if s.group and not pipeline[s.after].group
                else finished.get((s.after, key))
            )
            if before is not None:
                waits.append(max(0.0, (start - before).total_seconds()))
        out.append(
            {
                "stage": s.name,
                "level": "job" if s.group else "variant",
                "runs": len(ok),
                "failed_attempts": sum(1 for r in mine if r[3] in ("failed", "expired")),
                "p50_s": _q(durations, 0.5),
                "max_s": max(durations, default=None),
                "wait_p50_s": _q(waits, 0.5),
                "wait_max_s": max(waits, default=None),
                "workers": sorted({r[4] for r in ok}),
            }
        )
    return out


def _secs(v: float | None) -> str:
    return "-" if v is None else (f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s")


def timing_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    table.add_column("stage")
    table.add_column("level")
    for col in ("runs", "p50", "max", "wait p50", "wait max", "errors", "workers"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["stage"],
            r["level"],
            str(r["runs"]),
            _secs(r["p50_s"]),
            _secs(r["max_s"]),
            _secs(r["wait_p50_s"]),
            _secs(r["wait_max_s"]),
            str(r["failed_attempts"]) if r["failed_attempts"] else "",
            str(len(r["workers"])),
        )
    return table


async def gallery(conn: AsyncConnection[Any], job_ids: list[int], out: Path) -> Path:
    cur = await conn.execute(
        "SELECT record FROM posts WHERE job_id = ANY(%s) ORDER BY job_id", (job_ids,)
    )
    entries = [record for (record,) in await cur.fetchall()]
    variants = sum(len(e.get("variants", [])) for e in entries)
    return write_gallery(
        out / "index.html",
        entries,
        title=f"Feedly: {len(entries)} Instagram post{'s' * (len(entries) != 1)}",
        subtitle=f"Each post is the best of its job's variants ({variants} scored in all) on image"
        " quality, text read back by OCR, WCAG contrast and text kept off the product."
        f" Made {time.strftime('%Y-%m-%d %H:%M')}.",
    )


def failure_table(failures: list[dict[str, Any]]) -> Table:
    table = Table(title="failed", title_style="bold red")
    for col in ("job", "level", "key", "stage", "error (last line)"):
        table.add_column(col)
    for f in failures:
        last = [ln for ln in f["error"].strip().splitlines() if ln.strip()][-1:] or ["-"]
        table.add_row(str(f["job_id"]), f["level"], f["key"], f["stage"], last[0][:160])
    return table


# -- main -------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, dsn: str, console: Console, t0: float) -> int:
    out: Path = args.out
    await prepare(dsn)
    images = product_images(args.images)
    workers = Workers(args.workers, dsn, args.concurrency, out / "logs")
    kind = "in this process" if args.workers == 1 else "as separate processes"
    console.print(
        f"[bold]Feedly[/]: {args.jobs} job(s) x {args.variants} variant(s), "
        f"{args.workers} worker(s) {kind}, database {redact(dsn)}"
    )
    async with (
        await AsyncConnection.connect(dsn, autocommit=True) as conn,
        serving_dashboard(args, dsn, console),
    ):
        async with workers.running():
            await workers.wait_listening(conn)
            t_ready = time.monotonic()
            jobs = await create_jobs(conn, images, args.jobs, args.variants, out)
            job_ids = [j for j, _ in jobs]
            t_release = time.monotonic()
            snap = await watch(conn, jobs, workers, console, args.timeout)
            t_done = time.monotonic()
        timings = await stage_timings(conn, job_ids)
        page = await gallery(conn, job_ids, out)
        failures = await failed_rows(conn, job_ids)
    total = time.monotonic() - t0
    console.print(timing_table(timings, f"per-stage timings ({len(job_ids)} jobs)"))
    summary = {
        "jobs": job_ids,
        "variants": {str(j): k for j, k in jobs},
        "posted": sorted(snap.posted),
        "workers": args.workers,
        "concurrency": args.concurrency,
        "seconds": {
            "setup": round(t_ready - t0, 2),
            "img_gen": round(t_release - t_ready, 2),
            "pipeline": round(t_done - t_release, 2),
            "total": round(total, 2),
        },
        "stages": timings,
        "failures": failures,
        "gallery": str(page),
    }
    (out / "run.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    console.print(
        f"setup {summary['seconds']['setup']:.1f} s, img_gen {summary['seconds']['img_gen']:.1f} s,"
        f" pipeline {summary['seconds']['pipeline']:.1f} s, total {total:.1f} s"
    )
    console.print(
        f"posts: {len(snap.posted)}/{len(job_ids)}   gallery: [link=file://{page}]{page}[/]"
    )
    missing = [j for j in job_ids if j not in snap.posted]
    if failures:
        # a job whose variants failed only in part still gets its post (FanIn.SETTLED)
        console.print(failure_table(failures))
    if missing:
        console.print(
            f"[bold red]{len(missing)} job(s) without a post[/]: {missing}. "
            f"Details of a row: pgstagechain --dsn URL inspect {PIPELINE_SPEC} KEY "
            f"(worker logs in {out / 'logs'})"
        )
        return 1
    return 0


@contextlib.asynccontextmanager
async def serving_dashboard(
    args: argparse.Namespace, dsn: str, console: Console
) -> AsyncIterator[None]:
    """With ``--dashboard``: the web dashboard, in this event loop, while the demo runs.
    Retry and cancel are on, for whoever has the token printed in the URL."""
    if not args.dashboard:
        yield
        return
    import secrets

    import uvicorn

    from pgstagechain.dashboard import dashboard_app

    token = secrets.token_urlsafe(24)
    app = dashboard_app(pipeline, dsn, writes=True, token=token)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=args.dashboard_port, log_level="warning")
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        while not server.started:  # noqa: ASYNC110 - uvicorn offers no event to wait on
            await anyio.sleep(0.05)
        console.print(
            f"dashboard: [link]http://127.0.0.1:{args.dashboard_port}/#token={token}[/link]"
        )
        try:
            yield
        finally:
            server.should_exit = True


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m examples.feedly", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "--dsn",
        default=os.environ.get("FEEDLY_DSN") or os.environ.get("PGSTAGECHAIN_DSN"),
        help="PostgreSQL URL (default: $FEEDLY_DSN, $PGSTAGECHAIN_DSN, else an embedded server)",
    )
    ap.add_argument("--jobs", type=int, default=4, help="ad jobs to create (default 4)")
    ap.add_argument("--variants", type=int, default=3, help="variants per job (default 3)")
    ap.add_argument(
        "--workers",
        type=int,
        default=2,
        help="1: a worker in this process; N>1: N worker processes (default 2)",
    )
    ap.add_argument(
        "--concurrency", type=int, default=2, help="runs in flight per worker (default 2)"
    )
    ap.add_argument("--images", type=Path, default=DEFAULT_DIR, help="folder of product images")
    ap.add_argument("--out", type=Path, default=Path("feedly-output"), help="output folder")
    ap.add_argument(
        "--pgdata",
        type=Path,
        default=Path(".pgdata/feedly"),
        help="data folder of the embedded server (default ./.pgdata/feedly)",
    )
    ap.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    ap.add_argument(
        "--copy-on-image",
        choices=("en", "ko"),
        default=os.environ.get("FEEDLY_COPY_ON_IMAGE") or "en",
        help="language of the ad copy drawn on the feed image: en (default) or ko, the "
        "Korean copy (the caption is Korean either way); $FEEDLY_COPY_ON_IMAGE",
    )
    ap.add_argument(
        "--dashboard",
        action="store_true",
        help="serve the web dashboard while the demo runs (its URL is printed)",
    )
    ap.add_argument(
        "--dashboard-port", type=int, default=8765, help="port of --dashboard (default 8765)"
    )
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep earlier runs: their output files, and on the embedded server their jobs "
        "(default: each run starts afresh at job 1 with an emptied --out)",
    )
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("jobs", "variants", "workers", "concurrency"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name} must be at least 1")
    if not args.images.is_dir():
        raise SystemExit(f"error: --images {args.images} is not a folder")
    os.environ["FEEDLY_COPY_ON_IMAGE"] = args.copy_on_image  # read by every worker's stages
    t0 = time.monotonic()
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: wide enough for the tables
        console = Console(width=max(console.width, 120))
    args.out = args.out.resolve()
    fresh_output(args.out, args.keep)
    logging.basicConfig(
        filename=args.out / "feedly.log",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    with database(args.dsn, args.pgdata, console, keep=args.keep) as dsn:
        return anyio.run(run, args, dsn, console, t0)


if __name__ == "__main__":
    raise SystemExit(main())
