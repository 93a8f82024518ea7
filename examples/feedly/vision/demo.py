"""Run the ten stages in order on local images, without a database, and write a gallery.

``python -m examples.feedly.vision.demo [--images DIR] [--out DIR] [--variants N]``
groups the images into jobs of N variants each. It is the reference for wiring the stage
functions of :mod:`.stages` into pgstagechain handlers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from .backends import FeedlyConfig
from .gallery import write_gallery
from .sample_images import DEFAULT_DIR, IMAGE_SUFFIXES
from .stages import JOB_STAGES, VARIANT_STAGES, Backends, JobInput, VariantInput

DEFAULT_COPIES = (
    "New arrival: Summer Sale, up to 30% off",
    "Limited edition. Free shipping, shop now!",
)


def run_job(
    job_id: str,
    images: list[Path],
    out_dir: Path,
    text: str,
    backends: Backends,
    product: str | None = None,
) -> dict[str, Any]:
    """All stages for one job; returns the job's gallery entry."""
    variants: dict[str, dict[str, Any]] = {}
    for img in images:
        key = img.stem
        results: dict[str, Any] = {}
        for stage, fn in VARIANT_STAGES.items():
            inp = VariantInput(key, job_id, img, out_dir, previous=results, params={"text": text})
            results[stage] = fn(inp, backends)
        variants[key] = results
    job_results: dict[str, Any] = {}
    for stage, jfn in JOB_STAGES.items():
        jinp = JobInput(
            job_id, out_dir, variants, previous=job_results, params={"product": product}
        )
        job_results[stage] = jfn(jinp, backends)
    (out_dir / job_id / "results.json").write_text(
        json.dumps({"variants": variants, "job": job_results}, indent=1, ensure_ascii=False),
        encoding="utf-8",
    )
    feed = job_results["instagram_feed_gen"]
    chosen = feed["chosen_variant_id"]
    return {
        "job_id": job_id,
        "chosen_variant_id": chosen,
        "chosen_overlay": variants[chosen]["overlay"]["overlay_image"],
        "feed_image": feed["feed_image"],
        "caption_ko": job_results["ad_copy_gen_kor"]["korean"],
        "hashtags": job_results["ad_copy_gen_kor"]["hashtags"],
        "english": text,
        "backends": f"detector={backends.detector.name}; vlm={backends.vlm.name}; "
        f"translator={backends.translator.name}; korean font={feed['korean_font']}",
        "variants": feed["variants"],
    }


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--variants", type=int, default=3)
    args = ap.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="feedly-demo-"))
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    backends = Backends(FeedlyConfig.from_env())
    jobs = []
    for n, start in enumerate(range(0, len(paths), args.variants)):
        group = paths[start : start + args.variants]
        jobs.append(
            run_job(f"job{n + 1}", group, out, DEFAULT_COPIES[n % len(DEFAULT_COPIES)], backends)
        )
        print(f"job{n + 1}: chose {jobs[-1]['chosen_variant_id']} from {[p.stem for p in group]}")
    page = write_gallery(out / "index.html", jobs)
    print(f"gallery: {page}")


if __name__ == "__main__":
    main()
