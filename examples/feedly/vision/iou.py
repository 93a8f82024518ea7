"""Box geometry for the iou_eval stage: how much of the ad text covers detected objects."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

Box = tuple[int, int, int, int]
"""Axis-aligned box ``(x0, y0, x1, y1)`` in pixels, x1/y1 exclusive."""


def as_box(value: Sequence[float]) -> Box:
    """Coerce a 4-sequence (e.g. a JSON list) to an integer box, so stored results round-trip."""
    if len(value) != 4:
        raise ValueError(f"a box needs 4 numbers, got {value!r}")
    x0, y0, x1, y1 = (round(float(v)) for v in value)
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def area(box: Box) -> int:
    """Area of a box; degenerate boxes have area 0 instead of a negative number."""
    return max(0, box[2] - box[0]) * max(0, box[3] - box[1])


def intersection(a: Box, b: Box) -> Box | None:
    """The overlapping box of ``a`` and ``b``, or ``None`` when they do not overlap."""
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1, y1)


def iou(a: Box, b: Box) -> float:
    """Intersection over union, the standard box-match measure (0 = disjoint, 1 = equal)."""
    inter = intersection(a, b)
    if inter is None:
        return 0.0
    i = area(inter)
    union = area(a) + area(b) - i
    return i / union if union > 0 else 0.0


def overlap_fraction(text_box: Box, obj: Box) -> float:
    """Share of the text box covered by one object: what matters for "text hides product"."""
    inter = intersection(text_box, obj)
    a = area(text_box)
    return area(inter) / a if inter is not None and a > 0 else 0.0


def union_area_within(region: Box, boxes: Iterable[Box]) -> int:
    """Exact area of the union of ``boxes`` clipped to ``region`` (coordinate compression).

    Summing per-object overlaps double counts when objects overlap each other; this does not.
    """
    clipped = [c for c in (intersection(region, b) for b in boxes) if c is not None]
    if not clipped:
        return 0
    xs = sorted({v for c in clipped for v in (c[0], c[2])})
    ys = sorted({v for c in clipped for v in (c[1], c[3])})
    total = 0
    for i in range(len(xs) - 1):
        for j in range(len(ys) - 1):
            cx, cy = xs[i], ys[j]
            if any(c[0] <= cx < c[2] and c[1] <= cy < c[3] for c in clipped):
                total += (xs[i + 1] - xs[i]) * (ys[j + 1] - ys[j])
    return total


def iou_eval(text_box: Sequence[float], detections: Sequence[Any]) -> dict[str, Any]:
    """iou_eval stage: per-object IoU/overlap and the covered share of the text box.

    ``detections`` may be :class:`~.detect.Detection` objects or their JSON dicts
    (``{"box": [...], "score": ..., "label": ...}``).
    """
    tb = as_box(text_box)
    objs: list[tuple[Box, str, float]] = []
    for d in detections:
        if isinstance(d, dict):
            objs.append(
                (as_box(d["box"]), str(d.get("label", "object")), float(d.get("score", 1.0)))
            )
        else:
            objs.append((as_box(d.box), str(d.label), float(d.score)))
    per_object: list[dict[str, Any]] = [
        {
            "box": list(b),
            "label": label,
            "score": round(score, 4),
            "iou": round(iou(tb, b), 4),
            "overlap_fraction": round(overlap_fraction(tb, b), 4),
        }
        for b, label, score in objs
    ]
    covered = union_area_within(tb, [b for b, _, _ in objs])
    frac = covered / area(tb) if area(tb) > 0 else 0.0
    return {
        "text_box": list(tb),
        "max_iou": max((round(iou(tb, b), 4) for b, _, _ in objs), default=0.0),
        "overlap_fraction": round(frac, 4),
        "per_object": per_object,
    }
