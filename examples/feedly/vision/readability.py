"""readability_eval stage: WCAG 2 contrast of the text against what is under it, plus an
English readability score of the copy (textstat, pinned to 0.7.8 which works offline)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from .backends import require
from .iou import Box, as_box

RGB = tuple[int, int, int]

WCAG_AA_NORMAL = 4.5
WCAG_AA_LARGE = 3.0
WCAG_AAA_NORMAL = 7.0


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """WCAG 2 sRGB channel linearisation (8-bit input), vectorised."""
    s = np.asarray(c, np.float64) / 255.0
    return np.where(s <= 0.04045, s / 12.92, ((s + 0.055) / 1.055) ** 2.4)


def relative_luminance(rgb: Sequence[int] | np.ndarray) -> np.ndarray:
    """WCAG relative luminance in [0, 1] for one colour (``(..., 3)`` arrays work too)."""
    lin = srgb_to_linear(np.asarray(rgb))
    return np.asarray(0.2126 * lin[..., 0] + 0.7152 * lin[..., 1] + 0.0722 * lin[..., 2])


def contrast_ratio(a: Sequence[int], b: Sequence[int]) -> float:
    """WCAG contrast ratio between two colours, from 1.0 (same) to 21.0 (black on white)."""
    la, lb = float(relative_luminance(a)), float(relative_luminance(b))
    hi, lo = max(la, lb), min(la, lb)
    return (hi + 0.05) / (lo + 0.05)


def contrast_map(text_color: Sequence[int], pixels: np.ndarray) -> np.ndarray:
    """Per-pixel contrast ratio of ``text_color`` against an ``(..., 3)`` uint8 array."""
    lt = float(relative_luminance(text_color))
    lp = relative_luminance(pixels)
    ratio: np.ndarray = (np.maximum(lt, lp) + 0.05) / (np.minimum(lt, lp) + 0.05)
    return ratio


def background_pixels(
    image: Image.Image,
    box: Sequence[float],
    text_color: Sequence[int] | None = None,
    tol: float = 60.0,
) -> np.ndarray:
    """Pixels inside ``box`` as ``(n, 3)``; with ``text_color``, drop the text strokes.

    Pass the pre-text background when you have it (exact). On an already overlaid image,
    pixels near the text colour and their 1-px neighbourhood (anti-aliasing) are excluded.
    """
    b = as_box(box)
    arr = np.asarray(image.convert("RGB"))[b[1] : b[3], b[0] : b[2]]
    if arr.size == 0:
        raise ValueError(f"box {b} is outside the image {image.size}")
    if text_color is None:
        return arr.reshape(-1, 3)
    d = np.linalg.norm(arr.astype(np.float32) - np.asarray(text_color, np.float32), axis=-1)
    text = d < tol
    import cv2  # local: only this path needs it

    text = cv2.dilate(text.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    keep = arr[~text]
    return keep if keep.size else arr.reshape(-1, 3)


def region_contrast(text_color: Sequence[int], pixels: np.ndarray) -> dict[str, Any]:
    """Contrast statistics of a text colour over background pixels.

    ``p10`` (the contrast that 90 % of the background reaches) is the decision value:
    a mean hides the busy patch where the copy becomes unreadable.
    """
    cm = contrast_map(text_color, pixels.reshape(-1, 3))
    p10 = float(np.percentile(cm, 10))
    return {
        "text_color": [int(v) for v in text_color],
        "contrast_p10": round(p10, 3),
        "contrast_median": round(float(np.median(cm)), 3),
        "contrast_min": round(float(cm.min()), 3),
        "mean_background": [round(float(v)) for v in pixels.reshape(-1, 3).mean(axis=0)],
        "wcag_aa_normal": p10 >= WCAG_AA_NORMAL,
        "wcag_aa_large": p10 >= WCAG_AA_LARGE,
        "wcag_aaa_normal": p10 >= WCAG_AAA_NORMAL,
    }


def text_readability(text: str) -> dict[str, Any]:
    """English readability of the copy via textstat (Flesch reading ease etc.).

    Short ad copy gives noisy formula values, so the raw numbers are reported alongside a
    clipped 0-1 ``ease`` score rather than pretending to precision.
    """
    textstat = require("textstat", purpose="English readability scoring")
    fre = float(textstat.flesch_reading_ease(text))
    return {
        "flesch_reading_ease": round(fre, 2),
        "flesch_kincaid_grade": round(float(textstat.flesch_kincaid_grade(text)), 2),
        "words": int(textstat.lexicon_count(text)),
        "syllables": int(textstat.syllable_count(text)),
        "ease": round(min(1.0, max(0.0, fre / 100.0)), 4),
    }


def contrast_score(ratio: float) -> float:
    """Map a contrast ratio to [0, 1]: 1.0 at AAA (7:1) and above, 0.0 at 1:1."""
    return float(min(1.0, max(0.0, (ratio - 1.0) / (WCAG_AAA_NORMAL - 1.0))))


def readability_eval(
    image: Image.Image,
    text_box: Sequence[float],
    text_color: Sequence[int],
    copy_text: str,
    *,
    is_background: bool = False,
) -> dict[str, Any]:
    """readability_eval stage body.

    ``image`` is the overlaid ad (text strokes are masked out) or, with
    ``is_background=True``, the same picture rendered without the text (exact).
    """
    box: Box = as_box(text_box)
    px = background_pixels(image, box, None if is_background else text_color)
    contrast = region_contrast(text_color, px)
    english = text_readability(copy_text)
    legibility = contrast_score(contrast["contrast_p10"])
    return {
        "text_box": list(box),
        **contrast,
        "english": english,
        "legibility_score": round(legibility, 4),
        "score": round(0.8 * legibility + 0.2 * english["ease"], 4),
    }
