"""The Feedly ad pipeline: ten stages over the ``jobs_variants`` table, declared once.

An upstream system (here: ``python -m examples.feedly``) inserts a job and its variants and
sets each variant to ``('img_gen', 'done')``. From then on the workers carry every variant
through the eight row stages; when every variant of a job has finished ``iou_eval`` or
failed for good (``FanIn.SETTLED``), the two job stages run once per job from the variants
that succeeded, and ``instagram_feed_gen`` records the post, with the variants left out and
why.

Run workers for it from the shell (repo root on ``sys.path``)::

    pgstagechain --dsn "$DSN" worker examples.feedly.pipeline:pipeline

Handlers are plain ``def`` functions: the work is CPU-bound image processing, so each run
goes to a worker thread and never blocks the worker's event loop. They read what they need
(image path, ad copy, output folder) through ``ctx.conn``; that connection's transaction is
the one that marks the stage done, so the ``posts`` row of ``instagram_feed_gen`` commits
together with the stage or not at all.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from psycopg import Connection

from pgstagechain import FanIn, PermanentError, Pipeline, Retry, Stage, StageContext

from .vision import stages as vision
from .vision.backends import FeedlyConfig
from .vision.stages import Backends, JobInput, VariantInput

Ctx = StageContext[Connection[Any]]

pipeline = Pipeline(
    "feedly",
    table="jobs_variants",
    key="job_variants_id",
    group_column="job_id",
    extra_columns=["tenant_id", "img_asset_id"],
    start="img_gen",
)

#: Local image work: a failure is most likely a full disk or a file not there yet; a couple
#: of quick retries are enough.
LOCAL = Retry(max_attempts=3, base_delay=0.5, max_delay=5.0)
#: Stages that may call a model server (FEEDLY_VLM=openai, FEEDLY_TRANSLATOR=openai): more
#: patience for a server that restarts or is overloaded.
MODEL = Retry(max_attempts=3, base_delay=1.0, max_delay=20.0)

_backends: Backends | None = None
_backends_lock = threading.Lock()


def backends() -> Backends:
    """The process's backends, built on first use from ``FEEDLY_*`` variables and reused
    (models load once per worker process, not once per run)."""
    global _backends
    with _backends_lock:
        if _backends is None:
            _backends = Backends(FeedlyConfig.from_env())
        return _backends


def variant_input(ctx: Ctx) -> VariantInput:
    """Everything a variant stage needs: its image (looked up by ``img_asset_id``), the
    job's ad copy and output folder, and the results of the variant's earlier stages."""
    found = ctx.conn.execute(
        "SELECT a.path, j.ad_copy, j.out_dir FROM img_assets a, jobs j"
        " WHERE a.img_asset_id = %s AND j.job_id = %s::bigint",
        (ctx.row["img_asset_id"], ctx.group_key),
    ).fetchone()
    if found is None:
        raise PermanentError(
            f"image asset {ctx.row['img_asset_id']!r} or job {ctx.group_key} is gone"
        )
    path, ad_copy, out_dir = found
    if not Path(path).is_file():
        raise PermanentError(f"image file of asset {ctx.row['img_asset_id']!r} is missing: {path}")
    return VariantInput(
        key=str(ctx.key),
        job_id=str(ctx.group_key),
        image_path=path,
        out_dir=out_dir,
        previous=ctx.results,
        params={"text": ad_copy},
    )


def job_input(ctx: Ctx) -> tuple[JobInput, str]:
    """A job stage's input (every variant's results via ``ctx.members``) and the tenant."""
    found = ctx.conn.execute(
        "SELECT out_dir, product, tenant_id FROM jobs WHERE job_id = %s::bigint", (ctx.key,)
    ).fetchone()
    if found is None:
        raise PermanentError(f"job {ctx.key} is gone")
    out_dir, product, tenant = found
    inp = JobInput(
        job_id=str(ctx.key),
        out_dir=out_dir,
        variants=ctx.members,
        previous=ctx.results,
        params={"product": product},
    )
    return inp, str(tenant)


def _job_reached(ctx: Ctx, step: str) -> None:
    """Mirror the job-level step on ``jobs`` (same transaction as the stage's completion)."""
    ctx.conn.execute(
        "UPDATE jobs SET current_step = %s, status = 'done', updated_at = now()"
        " WHERE job_id = %s::bigint",
        (step, ctx.key),
    )


# -- the eight variant stages ------------------------------------------------------------------


@pipeline.stage(after="img_gen", retry=MODEL, timeout=300)
def vlm_analyze(ctx: Ctx) -> dict[str, Any]:
    """1. Validate the generated image (vision-language model, or classical checks)."""
    return vision.vlm_analyze(variant_input(ctx), backends())


@pipeline.stage(after="vlm_analyze", retry=LOCAL, timeout=120)
def yolo_detect(ctx: Ctx) -> dict[str, Any]:
    """2. Boxes of the objects the text must not cover."""
    return vision.yolo_detect(variant_input(ctx), backends())


@pipeline.stage(after="yolo_detect", retry=LOCAL, timeout=120)
def planner(ctx: Ctx) -> dict[str, Any]:
    """3. Ranked text-placement proposals."""
    return vision.planner(variant_input(ctx), backends())


@pipeline.stage(after="planner", retry=LOCAL, timeout=120)
def overlay(ctx: Ctx) -> dict[str, Any]:
    """4. Render the ad copy onto the image (writes overlay PNGs)."""
    return vision.overlay(variant_input(ctx), backends())


@pipeline.stage(after="overlay", retry=MODEL, timeout=300)
def vlm_judge(ctx: Ctx) -> dict[str, Any]:
    """5. Judge the overlaid ad."""
    return vision.vlm_judge(variant_input(ctx), backends())


class OcrEval(Stage):
    """6. Read the overlay back with OCR and compare it with the copy.

    A :class:`~pgstagechain.Stage` subclass: the options live on the class. The OCR model
    already spreads one image over every core, so one OCR run at a time per worker process
    is fastest; other stages keep the rest of the worker's slots busy meanwhile.
    """

    after = "vlm_judge"
    retry = LOCAL
    timeout = 180
    concurrency = 1

    def run(self, ctx: Ctx) -> dict[str, Any]:
        return vision.ocr_eval(variant_input(ctx), backends())


pipeline.add(OcrEval())


@pipeline.stage(after="ocr_eval", retry=LOCAL, timeout=120)
def readability_eval(ctx: Ctx) -> dict[str, Any]:
    """7. Contrast of the text against what is under it, and English reading ease."""
    return vision.readability_eval(variant_input(ctx), backends())


@pipeline.stage(after="readability_eval", retry=LOCAL, timeout=60)
def iou_eval(ctx: Ctx) -> dict[str, Any]:
    """8. Overlap of the text box with the detected objects."""
    return vision.iou_eval(variant_input(ctx), backends())


# -- the two job stages (fan-in: they run once every variant of the job passed iou_eval or ----
# -- failed for good; a job is not held up by one variant that cannot be made) -------------


@pipeline.stage(after="iou_eval", group=True, retry=MODEL, timeout=300, fan_in=FanIn.SETTLED)
def ad_copy_gen_kor(ctx: Ctx) -> dict[str, Any]:
    """9. Korean ad copy and hashtags for the job."""
    inp, _tenant = job_input(ctx)
    result = vision.ad_copy_kor(inp, backends())
    _job_reached(ctx, "ad_copy_gen_kor")
    return result


class InstagramFeedGen(Stage):
    """10. Choose the best variant, compose the feed image and record the post.

    The ``posts`` row is written on ``ctx.conn``, so it commits in the same transaction as
    the stage's completion: a crash in between leaves neither, and the retry writes one.
    """

    after = "ad_copy_gen_kor"
    group = True
    retry = LOCAL
    timeout = 180

    def run(self, ctx: Ctx) -> dict[str, Any]:
        inp, tenant = job_input(ctx)
        b = backends()
        feed = vision.instagram_feed(inp, b)
        kor = inp.previous["ad_copy_gen_kor"]
        chosen = str(feed["chosen_variant_id"])
        record = {
            "job_id": int(ctx.key),
            "tenant_id": tenant,
            "product": inp.params.get("product"),
            "english": next(iter(kor.get("translations", {})), None),
            "caption_ko": kor["korean"],
            "hashtags": kor["hashtags"],
            "chosen_variant_id": chosen,
            "chosen_overlay": inp.variants[chosen]["overlay"]["overlay_image"],
            "feed_image": feed["feed_image"],
            "caption_file": feed["caption_file"],
            "caption_in_image": feed["caption_in_image"],
            "copy_on_image": feed.get("copy_on_image"),
            "backends": f"detector={b.detector.name}; vlm={b.vlm.name}; "
            f"translator={b.translator.name}; korean font={Path(feed['korean_font']).name if feed['korean_font'] else 'none'}",
            "variants": feed["variants"],
            # the variants left out: they failed for good at some stage (FanIn.SETTLED)
            "failed_variants": [
                {"variant_id": key, "stage": failed.stage, "error": failed.error}
                for key, failed in sorted(ctx.failed_members.items())
            ],
        }
        record_path = inp.dir() / "post.json"
        record_path.write_text(json.dumps(record, indent=1, ensure_ascii=False), encoding="utf-8")
        (post_id,) = ctx.conn.execute(
            "INSERT INTO posts (job_id, tenant_id, chosen_variant_id, feed_image, caption_ko,"
            " hashtags, record) VALUES (%s::bigint, %s, %s::bigint, %s, %s, %s, %s::jsonb)"
            " RETURNING post_id",
            (
                ctx.key,
                tenant,
                chosen,
                feed["feed_image"],
                kor["korean"],
                list(kor["hashtags"]),
                json.dumps(record, ensure_ascii=False),
            ),
        ).fetchone() or (None,)
        _job_reached(ctx, "instagram_feed_gen")
        return {**feed, "post_id": post_id, "record": str(record_path)}


pipeline.add(InstagramFeedGen())
pipeline.validate()
