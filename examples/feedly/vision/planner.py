"""planner stage: where the ad copy goes and in which colour.

Candidates are horizontal bands (full width, and left/right-aligned narrower ones) across
the image. Each is scored by the visual busyness under it (saliency + edge energy), by how
much of it covers detected objects, and by a mild preference for the top/bottom thirds
(where ad copy conventionally sits). The colour is the one with the best WCAG contrast
against the worst 10 % of pixels under the band; a translucent plate is proposed when even
the best colour misses WCAG AA.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from .detect import Detection, OpenCVSaliencyDetector
from .iou import Box, area, union_area_within
from .readability import WCAG_AA_NORMAL, contrast_map

RGB = tuple[int, int, int]
#: How much a band's share of the image lowers its cost: a bigger band takes bigger type.
ROOM_WEIGHT = 0.3
DEFAULT_PALETTE: tuple[RGB, ...] = ((255, 255, 255), (17, 17, 17), (250, 235, 200), (20, 40, 80))


def candidate_boxes(
    size: tuple[int, int],
    *,
    heights: Sequence[float] = (0.16, 0.22, 0.28),
    widths: Sequence[float] = (0.9, 0.6, 0.45),
    step: float = 0.03,
    margin: float = 0.05,
) -> list[Box]:
    """Horizontal text bands at many heights; narrow bands come left- and right-aligned."""
    w, h = size
    mx, my = round(margin * w), round(margin * h)
    out: list[Box] = []
    for hf in heights:
        bh = round(hf * h)
        y = my
        while y + bh <= h - my:
            for wf in widths:
                bw = round(wf * w)
                if wf >= 0.85:
                    x0 = (w - bw) // 2
                    out.append((x0, y, x0 + bw, y + bh))
                else:
                    out.append((mx, y, mx + bw, y + bh))
                    out.append((w - mx - bw, y, w - mx, y + bh))
            y += max(1, round(step * h))
    return out


def _integral(a: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero row/column, for O(1) box means."""
    s = np.zeros((a.shape[0] + 1, a.shape[1] + 1), np.float64)
    s[1:, 1:] = a.cumsum(0).cumsum(1)
    return s


def _box_mean(sat: np.ndarray, b: Box) -> float:
    x0, y0, x1, y1 = b
    total = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return float(total / max(1, (x1 - x0) * (y1 - y0)))


def choose_text_color(
    pixels: np.ndarray, palette: Sequence[RGB] = DEFAULT_PALETTE
) -> tuple[RGB, float, float]:
    """Palette colour maximising the 10th-percentile WCAG contrast; returns (rgb, p10, median)."""
    best: tuple[RGB, float, float] | None = None
    px = pixels.reshape(-1, 3)
    if len(px) > 20000:  # a regular subsample keeps this cheap and deterministic
        px = px[:: len(px) // 20000]
    for c in palette:
        cm = contrast_map(c, px)
        p10, med = float(np.percentile(cm, 10)), float(np.median(cm))
        if best is None or p10 > best[1]:
            best = (c, p10, med)
    assert best is not None
    return best


def image_digest(image: Image.Image) -> str:
    """Short content hash, so ids differ per variant but not per run."""
    return hashlib.sha1(image.convert("RGB").tobytes()).hexdigest()[:16]


def plan_proposals(
    image: Image.Image,
    detections: Sequence[Detection | dict[str, Any]],
    *,
    k: int = 3,
    saliency: np.ndarray | None = None,
    overlap_weight: float = 3.0,
    palette: Sequence[RGB] = DEFAULT_PALETTE,
) -> list[dict[str, Any]]:
    """Rank candidate bands and return the ``k`` best proposals (non-overlapping), best first."""
    img = image.convert("RGB")
    w, h = img.size
    dets = [d if isinstance(d, Detection) else Detection.from_json(d) for d in detections]
    sal = saliency if saliency is not None else OpenCVSaliencyDetector().saliency_map(img)
    sat = _integral(sal)
    arr = np.asarray(img)
    digest = image_digest(img)
    scored: list[tuple[float, Box, float, float]] = []
    for b in candidate_boxes((w, h)):
        energy = _box_mean(sat, b)
        covered = union_area_within(b, [d.box for d in dets]) / max(1, area(b))
        cy = (b[1] + b[3]) / 2 / h
        centre_penalty = 0.15 * max(
            0.0, 1.0 - abs(cy - 0.5) / 0.25
        )  # middle third is for the product
        narrow_penalty = 0.03 if (b[2] - b[0]) < 0.85 * w else 0.0  # prefer full-width when equal
        room_bonus = ROOM_WEIGHT * area(b) / (w * h)  # room for large type, all else equal
        cost = energy + overlap_weight * covered + centre_penalty + narrow_penalty - room_bonus
        scored.append((cost, b, energy, covered))
    scored.sort(key=lambda t: (t[0], t[1]))
    chosen: list[dict[str, Any]] = []
    taken: list[Box] = []
    for cost, b, energy, covered in scored:
        if len(chosen) >= k:
            break
        if union_area_within(b, taken) > 0.3 * area(b):
            continue
        px = arr[b[1] : b[3], b[0] : b[2]]
        color, p10, med = choose_text_color(px, palette)
        plate = p10 < WCAG_AA_NORMAL
        plate_color: RGB = (0, 0, 0) if float(np.mean(color)) > 127 else (255, 255, 255)
        body = {
            "box": list(b),
            "text_color": list(color),
            "plate": plate,
            "plate_color": list(plate_color),
            "plate_alpha": 0.55 if plate else 0.0,
        }
        pid = hashlib.sha1((digest + json.dumps(body, sort_keys=True)).encode()).hexdigest()[:12]
        chosen.append(
            {
                "proposal_id": pid,
                **body,
                "text_color_hex": "#{:02x}{:02x}{:02x}".format(*color),
                "contrast_p10": round(p10, 3),
                "contrast_median": round(med, 3),
                "energy": round(energy, 4),
                "overlap_fraction": round(covered, 4),
                "cost": round(cost, 4),
                "image_size": [w, h],
                "image_digest": digest,
            }
        )
        taken.append(b)
    return chosen


def plan_text_box(
    image: Image.Image, detections: Sequence[Detection | dict[str, Any]], **kwargs: Any
) -> dict[str, Any]:
    """The single best proposal (see :func:`plan_proposals`)."""
    return plan_proposals(image, detections, k=1, **kwargs)[0]
