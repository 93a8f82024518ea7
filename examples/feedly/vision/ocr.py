"""ocr_eval stage: read the overlay back with OCR and compare it with the intended copy.

Uses RapidOCR (``rapidocr`` >= 3 ships its PP-OCR ONNX models inside the wheel, so it works
offline). The score is a character-level similarity (difflib ratio) after normalisation,
ignoring case, punctuation and whitespace, which OCR engines handle inconsistently.
"""

from __future__ import annotations

import difflib
import re
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .backends import require
from .iou import as_box


def normalise_text(text: str) -> str:
    """NFKC, casefold, keep letters/digits only: what OCR similarity should be judged on."""
    t = unicodedata.normalize("NFKC", text).casefold()
    return re.sub(r"[\W_]+", "", t)


def text_similarity(read: str, expected: str) -> float:
    """Character-level similarity in [0, 1] of normalised strings (1.0 = identical)."""
    a, b = normalise_text(read), normalise_text(expected)
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


@dataclass(frozen=True)
class OcrLine:
    """One recognised line with its confidence and quadrilateral box."""

    text: str
    score: float
    box: tuple[int, int, int, int]


class RapidOcrReader:
    """Thread-safe lazy wrapper around one RapidOCR engine (model load takes ~1 s)."""

    name = "rapidocr"

    def __init__(self, **params: Any) -> None:
        self._params = {"Global.log_level": "error", **params}
        self._engine: Any = None
        self._lock = threading.Lock()

    def _get(self) -> Any:
        with self._lock:
            if self._engine is None:
                mod = require("rapidocr", purpose="OCR evaluation")
                self._engine = mod.RapidOCR(params=self._params)
            return self._engine

    def read(self, image: Image.Image) -> list[OcrLine]:
        """Recognised lines in reading order (top to bottom, then left to right)."""
        engine = self._get()
        result = engine(np.asarray(image.convert("RGB")))
        txts = result.txts or ()
        if not txts:
            return []
        lines = []
        for text, score, quad in zip(txts, result.scores, result.boxes, strict=True):
            q = np.asarray(quad)
            box = as_box((q[:, 0].min(), q[:, 1].min(), q[:, 0].max(), q[:, 1].max()))
            lines.append(OcrLine(str(text), float(score), box))
        height = np.median([ln.box[3] - ln.box[1] for ln in lines])
        lines.sort(key=lambda ln: (round(ln.box[1] / max(1.0, height / 2)), ln.box[0]))
        return lines


_DEFAULT_READER: RapidOcrReader | None = None


def default_reader() -> RapidOcrReader:
    """A process-wide reader, so repeated stage calls pay the model load once."""
    global _DEFAULT_READER
    if _DEFAULT_READER is None:
        _DEFAULT_READER = RapidOcrReader()
    return _DEFAULT_READER


def ocr_eval(
    image: Image.Image,
    expected: str,
    *,
    region: Sequence[float] | None = None,
    margin: float = 0.15,
    reader: RapidOcrReader | None = None,
) -> dict[str, Any]:
    """ocr_eval stage body: OCR the overlay (optionally only around ``region``) and score it.

    Cropping to the planned text box (plus a margin) is faster and ignores any lettering on
    the product itself; without a region the whole ad is read.
    """
    r = reader or default_reader()
    crop = image.convert("RGB")
    offset = (0, 0)
    if region is not None:
        b = as_box(region)
        mx, my = round(margin * (b[2] - b[0])), round(margin * (b[3] - b[1]) + 8)
        cb = (
            max(0, b[0] - mx),
            max(0, b[1] - my),
            min(crop.width, b[2] + mx),
            min(crop.height, b[3] + my),
        )
        crop, offset = crop.crop(cb), (cb[0], cb[1])
    lines = r.read(crop)
    read = " ".join(ln.text for ln in lines)
    return {
        "engine": r.name,
        "expected": expected,
        "read_text": read,
        "similarity": round(text_similarity(read, expected), 4),
        "lines": [
            {
                "text": ln.text,
                "score": round(ln.score, 4),
                "box": [
                    ln.box[0] + offset[0],
                    ln.box[1] + offset[1],
                    ln.box[2] + offset[0],
                    ln.box[3] + offset[1],
                ],
            }
            for ln in lines
        ],
    }
