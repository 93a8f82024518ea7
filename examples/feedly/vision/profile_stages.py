"""Measure CPU and wall time of each stage per variant on this machine; prints a table.

``python -m examples.feedly.vision.profile_stages [--images DIR] [--repeat N]``.
CPU time is process time (all threads: ONNX Runtime may use several cores), so CPU can
exceed wall time. One-off costs (OCR model load) are reported separately.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from .backends import FeedlyConfig
from .ocr import default_reader
from .readability import text_readability
from .sample_images import DEFAULT_DIR, IMAGE_SUFFIXES
from .stages import JOB_STAGES, VARIANT_STAGES, Backends, JobInput, VariantInput


def profile(
    images: list[Path], repeat: int = 1, text: str = "New arrival: Summer Sale, up to 30% off"
) -> dict[str, Any]:
    """Run every stage on every image ``repeat`` times; returns per-stage samples in seconds."""
    backends = Backends(FeedlyConfig())
    cpu: dict[str, list[float]] = defaultdict(list)
    wall: dict[str, list[float]] = defaultdict(list)
    t0c, t0w = time.process_time(), time.perf_counter()
    default_reader()._get()
    one_off = {"ocr model load": (time.process_time() - t0c, time.perf_counter() - t0w)}
    t0c, t0w = time.process_time(), time.perf_counter()
    text_readability(text)
    one_off["textstat first call"] = (time.process_time() - t0c, time.perf_counter() - t0w)
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeat):
            variants: dict[str, dict[str, Any]] = {}
            for img in images:
                results: dict[str, Any] = {}
                for stage, fn in VARIANT_STAGES.items():
                    inp = VariantInput(
                        img.stem, "job", img, tmp, previous=results, params={"text": text}
                    )
                    c, w = time.process_time(), time.perf_counter()
                    results[stage] = fn(inp, backends)
                    cpu[stage].append(time.process_time() - c)
                    wall[stage].append(time.perf_counter() - w)
                variants[img.stem] = results
            job: dict[str, Any] = {}
            for stage, jfn in JOB_STAGES.items():
                c, w = time.process_time(), time.perf_counter()
                job[stage] = jfn(JobInput("job", tmp, variants, previous=job), backends)
                cpu[stage].append(time.process_time() - c)
                wall[stage].append(time.perf_counter() - w)
    return {"cpu": dict(cpu), "wall": dict(wall), "one_off": one_off}


def main(argv: list[str] | None = None) -> None:
    """CLI: print the table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)
    images = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    res = profile(images, args.repeat)
    print(f"{len(images)} variants x {args.repeat} run(s); default backends; times in ms")
    print(
        f"{'stage':<20}{'level':<9}{'n':>4}{'cpu mean':>10}{'cpu max':>10}{'wall mean':>11}{'wall max':>10}"
    )
    total_cpu = 0.0
    for stage in list(VARIANT_STAGES) + list(JOB_STAGES):
        c, w = res["cpu"][stage], res["wall"][stage]
        level = "variant" if stage in VARIANT_STAGES else "job"
        if level == "variant":
            total_cpu += statistics.mean(c)
        print(
            f"{stage:<20}{level:<9}{len(c):>4}{1000 * statistics.mean(c):>10.0f}{1000 * max(c):>10.0f}"
            f"{1000 * statistics.mean(w):>11.0f}{1000 * max(w):>10.0f}"
        )
    print(f"{'sum of variant stages':<33}{1000 * total_cpu:>10.0f}")
    for name, (c1, w1) in res["one_off"].items():
        print(f"one-off {name}: cpu {1000 * c1:.0f} ms, wall {1000 * w1:.0f} ms")


if __name__ == "__main__":
    main()
