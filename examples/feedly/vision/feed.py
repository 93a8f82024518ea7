"""instagram_feed_gen stage: pick the best variant and compose the 1080x1350 feed post.

Pillow's bundled font has no Hangul, so the Korean caption band needs a Korean font. It is
searched in order: ``FEEDLY_KOREAN_FONT`` / an explicit path, the ``pylopdf-fonts-ko`` wheel
(Noto Sans KR, SIL OFL, on PyPI), ``fc-list :lang=ko``, then common OS paths. Without one the
image gets no Korean text (never tofu boxes) and the caption lives in ``caption.txt`` only.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .readability import contrast_score

FEED_SIZE = (1080, 1350)
WEIGHTS: dict[str, float] = {"vlm": 0.35, "ocr": 0.25, "contrast": 0.2, "clear": 0.2}
COMMON_KOREAN_FONTS = (
    "/usr/share/fonts/truetype/nanum/NanumGothic.ttf",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/System/Library/Fonts/AppleSDGothicNeo.ttc",
    "C:/Windows/Fonts/malgun.ttf",
)


def variant_score(scores: Mapping[str, Any], weights: Mapping[str, float] = WEIGHTS) -> float:
    """Weighted total in [0, 1] from a variant's stage results.

    Keys: ``vlm_score`` (vlm_judge score), ``ocr_similarity``, ``contrast_ratio`` (WCAG,
    p10 under the text) and ``overlap_fraction`` (text box share over objects). A missing
    value counts as 0, so a variant with a failed stage cannot win by omission.
    """
    parts = {
        "vlm": float(scores.get("vlm_score") or 0.0),
        "ocr": float(scores.get("ocr_similarity") or 0.0),
        "contrast": contrast_score(float(scores.get("contrast_ratio") or 1.0)),
        "clear": 1.0 - min(1.0, float(scores["overlap_fraction"]))
        if scores.get("overlap_fraction") is not None
        else 0.0,
    }
    total = sum(weights[k] * parts[k] for k in weights)
    return round(total / sum(weights.values()), 4)


def rank_variants(variants: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Variants (each with ``variant_id`` and score keys) sorted best first, with ``total``.

    Ties break on ``variant_id`` so the choice is deterministic.
    """
    ranked = [{**v, "total": variant_score(v)} for v in variants]
    ranked.sort(key=lambda v: (-v["total"], str(v.get("variant_id"))))
    return ranked


def _font_has_hangul(path: str) -> bool:
    """True when the font draws distinct glyphs for two Hangul syllables (not .notdef tofu)."""
    try:
        font = ImageFont.truetype(path, 40)
    except OSError:
        return False
    a, b = font.getmask("한"), font.getmask("글")
    return a.getbbox() is not None and bytes(a) != bytes(b)


@lru_cache(maxsize=8)
def find_korean_font(explicit: str | None = None) -> str | None:
    """Path of a font that renders Hangul, or ``None`` (see module docstring for the order)."""
    candidates: list[str] = []
    for c in (explicit, os.environ.get("FEEDLY_KOREAN_FONT")):
        if c:
            candidates.append(c)
    try:
        mod: Any = importlib.import_module("pylopdf_fonts_ko")
        candidates.append(str(mod.sans_path()))
    except ImportError:
        pass
    if shutil.which("fc-list"):
        try:
            out = subprocess.run(
                ["fc-list", ":lang=ko", "file"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout
            candidates.extend(
                sorted(line.split(":")[0].strip() for line in out.splitlines() if line.strip())
            )
        except (OSError, subprocess.SubprocessError):
            pass
    candidates.extend(COMMON_KOREAN_FONTS)
    for c in candidates:
        if Path(c).is_file() and _font_has_hangul(c):
            return c
    return None


def _wrap_chars(
    text: str, font: ImageFont.FreeTypeFont, width: int, draw: ImageDraw.ImageDraw
) -> list[str]:
    """Wrap on spaces, falling back to characters for long unbroken Korean runs."""
    lines: list[str] = []
    cur = ""
    for word in text.split(" "):
        trial = f"{cur} {word}".strip()
        if draw.textlength(trial, font=font) <= width:
            cur = trial
            continue
        if cur:
            lines.append(cur)
        cur = ""
        for ch in word:
            if draw.textlength(cur + ch, font=font) > width and cur:
                lines.append(cur)
                cur = ""
            cur += ch
    if cur:
        lines.append(cur)
    return lines


@dataclass
class FeedRender:
    """The composed post and how its caption band was rendered."""

    image: Image.Image
    font_path: str | None
    caption_in_image: bool


def render_feed_image(
    overlay: Image.Image,
    caption_ko: str,
    hashtags: Sequence[str],
    *,
    font_path: str | None = None,
    size: tuple[int, int] = FEED_SIZE,
    band_color: tuple[int, int, int] = (250, 248, 245),
) -> FeedRender:
    """Fit the overlaid ad into the top square and draw the Korean caption band below."""
    w, h = size
    canvas = Image.new("RGB", size, band_color)
    ad = overlay.convert("RGB").copy()
    ad.thumbnail((w, w), Image.Resampling.LANCZOS)
    if ad.size != (w, w):  # upscale small ads to the square instead of leaving borders
        scale = min(w / ad.width, w / ad.height)
        ad = ad.resize(
            (round(ad.width * scale), round(ad.height * scale)), Image.Resampling.LANCZOS
        )
    canvas.paste(ad, ((w - ad.width) // 2, (w - ad.height) // 2))
    font_file = find_korean_font(font_path)
    draw = ImageDraw.Draw(canvas)
    band_top, pad = w, 36
    draw.line((pad, band_top + 1, w - pad, band_top + 1), fill=(220, 214, 206), width=2)
    if font_file is None:
        return FeedRender(canvas, None, False)
    avail_h = h - band_top - 2 * pad
    size_px = 48
    while size_px > 18:
        font = ImageFont.truetype(font_file, size_px)
        tag_font = ImageFont.truetype(font_file, max(16, int(size_px * 0.62)))
        cap_lines = _wrap_chars(caption_ko, font, w - 2 * pad, draw)
        tag_lines = _wrap_chars(" ".join(hashtags), tag_font, w - 2 * pad, draw)
        asc, desc = font.getmetrics()
        tasc, tdesc = tag_font.getmetrics()
        need = (
            len(cap_lines) * int((asc + desc) * 1.2)
            + 12
            + len(tag_lines) * int((tasc + tdesc) * 1.2)
        )
        if need <= avail_h:
            break
        size_px -= 2
    y = band_top + pad
    for line in cap_lines:
        draw.text((pad, y), line, font=font, fill=(24, 24, 28))
        y += int((asc + desc) * 1.2)
    y += 12
    for line in tag_lines:
        draw.text((pad, y), line, font=tag_font, fill=(40, 90, 170))
        y += int((tasc + tdesc) * 1.2)
    return FeedRender(canvas, font_file, True)


def caption_text(caption_ko: str, hashtags: Sequence[str], english: str | None = None) -> str:
    """The post's caption text (Korean copy, optional English original, hashtags)."""
    parts = [caption_ko.strip()]
    if english:
        parts.append(english.strip())
    parts.append(" ".join(hashtags))
    return "\n\n".join(p for p in parts if p) + "\n"


def instagram_feed_gen(
    variants: Sequence[Mapping[str, Any]],
    overlay_paths: Mapping[str, str | Path],
    caption_ko: str,
    hashtags: Sequence[str],
    out_dir: str | Path,
    *,
    english: str | None = None,
    font_path: str | None = None,
) -> dict[str, Any]:
    """instagram_feed_gen stage body: rank, render ``feed.png``, write ``caption.txt``."""
    if not variants:
        raise ValueError("no variants to choose from")
    ranked = rank_variants(variants)
    best = ranked[0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with Image.open(overlay_paths[str(best["variant_id"])]) as im:
        render = render_feed_image(im, caption_ko, hashtags, font_path=font_path)
    feed_path = out / "feed.png"
    render.image.save(feed_path)
    cap_path = out / "caption.txt"
    cap_path.write_text(caption_text(caption_ko, hashtags, english), encoding="utf-8")
    return {
        "chosen_variant_id": best["variant_id"],
        "ranking": [{"variant_id": v["variant_id"], "total": v["total"]} for v in ranked],
        "feed_image": str(feed_path),
        "caption_file": str(cap_path),
        "feed_size": list(render.image.size),
        "korean_font": render.font_path,
        "caption_in_image": render.caption_in_image,
    }
