"""overlay stage: draw the ad copy into the planned box, with a type hierarchy.

The copy is split by role (:func:`split_copy`): a short headline ("New arrival") set small
in capitals above the offer ("Summer Sale, up to 30% off"), which is set large and heavy,
so the offer is what the eye reads first. Pillow >= 10.1's ``ImageFont.load_default(size=...)``
is a real TrueType face (Aileron), so no system font is needed; the offer's weight comes
from a stroke in the text colour, which works with any single-weight font (the Korean one
too). The sizes are the largest that fit the box after word wrapping; the exact ink box of
the drawn text is returned for the evaluation stages.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .iou import Box, as_box

FontT = ImageFont.FreeTypeFont | ImageFont.ImageFont


def load_font(size: int, font_path: str | Path | None = None) -> ImageFont.FreeTypeFont:
    """A TrueType font at ``size`` px: ``font_path`` if given, else Pillow's bundled face."""
    if font_path is not None:
        return ImageFont.truetype(str(font_path), size)
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):  # Pillow without FreeType support
        raise RuntimeError(
            "Pillow was built without FreeType; sized text needs it (Pillow >= 10.1)"
        )
    return font


def wrap_text(text: str, font: FontT, max_width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """Greedy word wrap by measured width; explicit newlines are kept as line breaks."""
    lines: list[str] = []
    for para in text.splitlines() or [""]:
        words = para.split()
        cur = ""
        for word in words:
            trial = f"{cur} {word}".strip()
            if not cur or draw.textlength(trial, font=font) <= max_width:
                cur = trial
            else:
                lines.append(cur)
                cur = word
        lines.append(cur)
    if len(lines) > 1:  # a separator at a line break is the break itself: drop it
        lines = [SEPARATOR_AT_EDGE.sub("", ln) or ln for ln in lines]
    return lines


#: A list separator ("여름 세일 · 최대 30% 할인") left at the start or end of a wrapped line.
SEPARATOR_AT_EDGE = re.compile(r"^\s*[·•|]\s*|\s*[·•|]\s*$")


def balanced_wrap(text: str, font: FontT, max_width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """Word wrap with the same line count as greedy but even line lengths (no orphan word)."""
    lines = wrap_text(text, font, max_width, draw)
    lo, hi = 1, max_width
    while lo < hi:  # narrowest width that still needs no more lines
        mid = (lo + hi) // 2
        if len(wrap_text(text, font, mid, draw)) <= len(lines):
            hi = mid
        else:
            lo = mid + 1
    return wrap_text(text, font, lo, draw)


@dataclass
class TextLayout:
    """A fitted layout: the largest font size, wrapped lines, their top-left origins, and
    per line its font size and stroke width (the stroke makes a heavier weight)."""

    font_size: int
    lines: list[str]
    origins: list[tuple[float, float]]
    ink_box: Box
    sizes: list[int] | None = None
    strokes: list[int] | None = None

    def line_styles(self) -> list[tuple[str, tuple[float, float], int, int]]:
        """(line, origin, size, stroke) for every line."""
        sizes = self.sizes or [self.font_size] * len(self.lines)
        strokes = self.strokes or [0] * len(self.lines)
        return list(zip(self.lines, self.origins, sizes, strokes, strict=True))


@dataclass(frozen=True)
class Role:
    """One block of the copy: its text, size relative to the largest block, and weight."""

    text: str
    scale: float = 1.0
    bold: bool = False


#: The headline's size relative to the offer's, and the offer's stroke per pixel of size.
HEADLINE_SCALE = 0.6
BOLD_STROKE = 1 / 40
_SPLIT = re.compile(r"^\s*(?P<head>[^:.!?]{2,40}?)\s*[:.!?]\s+(?P<offer>\S.*?)\s*$", re.S)


#: What marks the part of the copy that is the offer: a number, a percentage, free, off.
OFFER_WORDS = re.compile(r"\d|%|\b(free|off)\b", re.I)


def copy_blocks(text: str) -> list[tuple[str, bool]]:
    """The copy's parts in reading order, each with True when it is the offer.

    The copy is split at its first ``:``, ``.``, ``!`` or ``?``; the second part is the
    offer ("New arrival: Summer Sale, up to 30% off"), unless only the first part names a
    number, a percentage, "free" or "off" ("Up to 30% off. Today only"). Copy without
    such a break is all offer.
    """
    m = _SPLIT.match(text)
    if m is None:
        return [(text.strip(), True)]
    first, second = m["head"].strip(), m["offer"].strip()
    offer_first = bool(OFFER_WORDS.search(first)) and not OFFER_WORDS.search(second)
    return [(first, offer_first), (second, not offer_first)]


def split_copy(text: str) -> tuple[str, str]:
    """``(headline, offer)`` of the copy (see :func:`copy_blocks`); no headline is ``""``."""
    blocks = copy_blocks(text)
    head = next((part for part, is_offer in blocks if not is_offer), "")
    offer = next(part for part, is_offer in blocks if is_offer)
    return head, offer


def role_of(part: str, is_offer: bool) -> Role:
    """The offer large and heavy; the headline at :data:`HEADLINE_SCALE`, in capitals."""
    return Role(part, 1.0, bold=True) if is_offer else Role(part.upper(), HEADLINE_SCALE)


def copy_roles(text: str, *, hierarchy: bool = True) -> list[Role]:
    """The blocks to draw, in reading order: a small capitalised headline and a large,
    heavy offer (one plain block without ``hierarchy``)."""
    if not hierarchy:
        return [Role(text)]
    return [role_of(part, is_offer) for part, is_offer in copy_blocks(text)]


def fit_text(
    text: str,
    box: Box,
    *,
    font_path: str | Path | None = None,
    max_size: int = 96,
    min_size: int = 10,
    padding: float = 0.08,
    line_spacing: float = 1.15,
) -> TextLayout:
    """Largest font size whose wrapped text fits inside ``box`` minus padding (one style)."""
    return fit_roles(
        [Role(text)],
        box,
        font_path=font_path,
        max_size=max_size,
        min_size=min_size,
        padding=padding,
        line_spacing=line_spacing,
    )


@dataclass(frozen=True)
class _Row:
    line: str
    size: int
    stroke: int
    width: float
    height: int
    advance: int
    gap: int


def fit_roles(
    roles: Sequence[Role],
    box: Box,
    *,
    font_path: str | Path | None = None,
    max_size: int = 96,
    min_size: int = 10,
    padding: float = 0.08,
    line_spacing: float = 1.15,
) -> TextLayout:
    """Largest size (of the ``scale == 1`` block) at which every block, wrapped and stacked,
    fits inside ``box`` minus padding (binary search); blocks are centred line by line."""
    if not roles:
        raise ValueError("no text to fit")
    x0, y0, x1, y1 = box
    pad = round(padding * min(x1 - x0, y1 - y0))
    avail_w, avail_h = (x1 - x0) - 2 * pad, (y1 - y0) - 2 * pad
    scratch = ImageDraw.Draw(Image.new("L", (1, 1)))

    def layout(size: int) -> TextLayout | None:
        rows: list[_Row] = []
        for n, role in enumerate(roles):
            px = max(min_size, round(size * role.scale))
            stroke = max(1, round(px * BOLD_STROKE)) if role.bold else 0
            font = load_font(px, font_path)
            asc, desc = font.getmetrics()
            for i, ln in enumerate(balanced_wrap(role.text, font, avail_w - 2 * stroke, scratch)):
                rows.append(
                    _Row(
                        ln,
                        px,
                        stroke,
                        width=scratch.textlength(ln, font=font) + 2 * stroke,
                        height=asc + desc + 2 * stroke,
                        advance=round((asc + desc) * line_spacing),
                        gap=round(0.25 * size) if n and not i else 0,  # between blocks
                    )
                )
        tops = [0.0]
        for prev, row in itertools.pairwise(rows):
            tops.append(tops[-1] + prev.advance + row.gap)
        total_h = tops[-1] + rows[-1].height
        if max(r.width for r in rows) > avail_w or total_h > avail_h:
            return None
        top = y0 + pad + (avail_h - total_h) / 2
        origins = [
            (x0 + pad + (avail_w - r.width) / 2 + r.stroke, top + t + r.stroke)
            for r, t in zip(rows, tops, strict=True)
        ]
        ink = [
            scratch.textbbox(o, r.line, font=load_font(r.size, font_path), stroke_width=r.stroke)
            for o, r in zip(origins, rows, strict=True)
            if r.line
        ]
        if not ink:
            ink_box: Box = (x0, y0, x0, y0)
        else:
            ink_box = as_box(
                (
                    min(b[0] for b in ink),
                    min(b[1] for b in ink),
                    max(b[2] for b in ink),
                    max(b[3] for b in ink),
                )
            )
        return TextLayout(
            size,
            [r.line for r in rows],
            origins,
            ink_box,
            [r.size for r in rows],
            [r.stroke for r in rows],
        )

    lo, hi = min_size, max(min_size, min(max_size, avail_h))
    best = layout(lo)
    if best is None:
        text = " / ".join(r.text for r in roles)
        raise ValueError(f"text does not fit box {box} even at {min_size}px: {text!r}")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        got = layout(mid)
        if got is not None:
            best, lo = got, mid
        else:
            hi = mid - 1
    return best


@dataclass
class OverlayResult:
    """The overlaid image, the same picture without text (for exact contrast), and metadata."""

    image: Image.Image
    background: Image.Image
    text_box: Box
    plate_box: Box | None
    font_size: int
    lines: list[str]
    text_color: tuple[int, int, int]
    overlay_id: str
    line_sizes: list[int] | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-able metadata (images are written to files by the caller)."""
        return {
            "overlay_id": self.overlay_id,
            "text_box": list(self.text_box),
            "plate_box": list(self.plate_box) if self.plate_box else None,
            "font_size": self.font_size,
            "lines": self.lines,
            "line_sizes": self.line_sizes or [self.font_size] * len(self.lines),
            "text_color": list(self.text_color),
        }


def render_overlay(
    image: Image.Image,
    text: str,
    proposal: dict[str, Any],
    *,
    font_path: str | Path | None = None,
    plate: bool | None = None,
    max_size: int = 96,
    hierarchy: bool = True,
    roles: Sequence[Role] | None = None,
) -> OverlayResult:
    """Draw ``text`` into ``proposal["box"]`` with its colour (and plate if proposed):
    headline small, offer large and heavy (see :func:`copy_roles`), or one style when
    ``hierarchy`` is false. ``roles`` gives the blocks directly (a translated headline and
    offer), and then ``text`` only names the copy in the overlay id."""
    base = image.convert("RGB")
    box = as_box(proposal["box"])
    color = tuple(int(v) for v in proposal.get("text_color", (255, 255, 255)))
    rgb: tuple[int, int, int] = (color[0], color[1], color[2])
    blocks = list(roles) if roles is not None else copy_roles(text, hierarchy=hierarchy)
    layout = fit_roles(blocks, box, font_path=font_path, max_size=max_size)
    use_plate = bool(proposal.get("plate", False)) if plate is None else plate
    background = base.copy()
    plate_box: Box | None = None
    if use_plate:
        ib = layout.ink_box
        m = max(6, layout.font_size // 3)
        plate_box = (
            max(0, ib[0] - m),
            max(0, ib[1] - m),
            min(base.width, ib[2] + m),
            min(base.height, ib[3] + m),
        )
        pc = proposal.get("plate_color", (0, 0, 0))
        alpha = int(255 * float(proposal.get("plate_alpha", 0.55) or 0.55))
        layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
        ImageDraw.Draw(layer).rounded_rectangle(  # Pillow's corners are inclusive
            (plate_box[0], plate_box[1], plate_box[2] - 1, plate_box[3] - 1),
            radius=m,
            fill=(int(pc[0]), int(pc[1]), int(pc[2]), alpha),
        )
        background = Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")
    out = background.copy()
    draw = ImageDraw.Draw(out)
    for line, origin, size, stroke in layout.line_styles():
        font = load_font(size, font_path)
        draw.text(origin, line, font=font, fill=rgb, stroke_width=stroke, stroke_fill=rgb)
    oid = hashlib.sha1(
        f"{proposal.get('proposal_id', '')}|{text}|{layout.font_size}|{use_plate}|{hierarchy}".encode()
    ).hexdigest()[:12]
    return OverlayResult(
        out,
        background,
        layout.ink_box,
        plate_box,
        layout.font_size,
        layout.lines,
        rgb,
        oid,
        [size for _l, _o, size, _s in layout.line_styles()],
    )


def draw_boxes(
    image: Image.Image, boxes: Sequence[Sequence[float]], color: str = "#ff00aa"
) -> Image.Image:
    """Debug view: outline boxes on a copy of ``image``."""
    out = image.convert("RGB").copy()
    d = ImageDraw.Draw(out)
    for b in boxes:
        d.rectangle(as_box(b), outline=color, width=3)
    return out
