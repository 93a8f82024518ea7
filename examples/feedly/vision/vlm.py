"""vlm_analyze / vlm_judge stages: a vision-language model checks the image, then the ad.

Backends behind one :class:`VisionLanguageModel` protocol:

* :class:`LlavaTransformersVLM`: LLaVA via transformers from a LOCAL model directory;
* :class:`OpenAICompatibleVLM`: any OpenAI-compatible chat-completions server (vLLM,
  llama.cpp server, Ollama, ...), image sent as a base64 data URL;
* :class:`ClassicalImageChecks` (default): measurable image checks. It is NOT a VLM and
  says so in every result, so nobody mistakes its numbers for a model's judgement.

Every result is a JSON-able dict with ``score`` in [0, 1], ``verdict`` and ``reasons``.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import cv2
import numpy as np
from PIL import Image

from .backends import require
from .detect import Detection, Detector, OpenCVSaliencyDetector
from .readability import background_pixels, contrast_score, region_contrast

if TYPE_CHECKING:
    from .backends import FeedlyConfig

ANALYZE_PROMPT = (
    "You are checking an AI-generated product photo before it is used in an advertisement. "
    "Is the product clearly visible, in focus, well exposed, and free of generation artefacts "
    "(distorted shapes, garbled lettering, duplicated parts)? Answer exactly in this form:\n"
    "Score: <0-10>\nVerdict: PASS or FAIL\nReason: <one sentence>"
)
JUDGE_PROMPT = (
    'You are judging an Instagram advertisement. The intended ad copy is: "{copy}". '
    "Is the copy legible and spelled as intended, does it avoid covering the product, and does "
    "the layout look professional? Answer exactly in this form:\n"
    "Score: <0-10>\nVerdict: PASS or FAIL\nReason: <one sentence>"
)
PASS_THRESHOLD = 0.6


def llava_prompt(question: str) -> str:
    """LLaVA-1.5 conversation template with the image placeholder."""
    return f"USER: <image>\n{question} ASSISTANT:"


@dataclass(frozen=True)
class ParsedAnswer:
    """What could be read from a free-text model answer."""

    score: float | None  # normalised to [0, 1]
    verdict: str | None  # "pass" | "fail"
    reason: str


_NUM = r"(\d+(?:\.\d+)?)"
_SCORE_PATTERNS: tuple[tuple[str, float | None], ...] = (
    (rf"{_NUM}\s*/\s*(10|100|5)\b", None),  # 7/10, 85/100, 4/5
    (rf"{_NUM}\s+out\s+of\s+(10|100|5)\b", None),  # 7 out of 10
    (rf"{_NUM}\s*%", 100.0),  # 85%
    (rf"\b(?:score|rating|rate|grade)\b[^0-9\n]{{0,20}}{_NUM}", 10.0),  # Score: 7, rating of 8.5
)
_VERDICT_RE = re.compile(
    r"\bverdict\b\W*\**\s*(pass|fail|yes|no|good|bad|acceptable|unacceptable)", re.I
)
_LEADING_RE = re.compile(r"^\W*(pass|fail|yes|no)\b", re.I)


def parse_vlm_answer(text: str) -> ParsedAnswer:
    """Read a 0-10 score and/or a pass/fail verdict from a model's free-text answer.

    Accepts "Score: 7/10", "**Score:** 7.5", "7 out of 10", "Rating: 8", "85%", "8/10",
    "Verdict: PASS", or a bare leading "Yes"/"No". Out-of-range numbers are rejected.
    """
    clean = text.replace("*", "").strip()
    score: float | None = None
    for pattern, scale in _SCORE_PATTERNS:
        m = re.search(pattern, clean, re.I)
        if not m:
            continue
        value = float(m.group(1))
        denom = scale if scale is not None else float(m.group(2))
        if 0.0 <= value <= denom:
            score = value / denom
            break
    verdict: str | None = None
    vm = _VERDICT_RE.search(clean) or _LEADING_RE.search(clean)
    if vm:
        word = vm.group(1).lower()
        verdict = "pass" if word in ("pass", "yes", "good", "acceptable") else "fail"
    rm = re.search(r"\breason\b\s*:\s*(.+)", clean, re.I)
    reason = rm.group(1).strip() if rm else clean.splitlines()[-1].strip() if clean else ""
    return ParsedAnswer(score, verdict, reason[:300])


def answer_to_result(stage: str, backend: str, answer: str) -> dict[str, Any]:
    """Turn a model answer into the common result dict (unparseable answers score 0)."""
    p = parse_vlm_answer(answer)
    reasons = [p.reason] if p.reason else []
    score = p.score
    if score is None and p.verdict is not None:
        score = 1.0 if p.verdict == "pass" else 0.0
        reasons.append("no numeric score in the answer; score derived from the verdict")
    if score is None:
        return {
            "stage": stage,
            "backend": backend,
            "score": 0.0,
            "verdict": "unknown",
            "parsed": False,
            "reasons": ["could not parse a score or verdict from the model answer"],
            "raw": answer,
        }
    verdict = p.verdict or ("pass" if score >= PASS_THRESHOLD else "fail")
    return {
        "stage": stage,
        "backend": backend,
        "score": round(float(score), 4),
        "verdict": verdict,
        "parsed": True,
        "reasons": reasons,
        "raw": answer,
    }


@runtime_checkable
class VisionLanguageModel(Protocol):
    """The two LLaVA stages of the pipeline."""

    name: str

    def analyze(
        self, image: Image.Image, *, context: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """vlm_analyze: is the generated product image usable?"""
        ...

    def judge(
        self, image: Image.Image, *, copy_text: str, context: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """vlm_judge: is the overlaid ad good?"""
        ...


def image_to_data_url(image: Image.Image, max_side: int = 768, quality: int = 90) -> str:
    """JPEG data URL, downscaled so requests stay small (VLMs resize to ~336-768 anyway)."""
    img = image.convert("RGB")
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class OpenAICompatibleVLM:
    """Chat-completions client for OpenAI-compatible servers (``base_url`` ends in ``/v1``)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        max_tokens: int = 120,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.max_tokens = max_tokens
        self.name = f"openai-compatible:{model}"

    def ask(self, image: Image.Image, prompt: str) -> str:
        """One user turn with text + image; returns the assistant's text."""
        httpx = require("httpx", purpose="the OpenAI-compatible VLM backend")
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {
            "model": self.model,
            "temperature": 0,
            "max_tokens": self.max_tokens,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": prompt},
                        {"type": "image_url", "image_url": {"url": image_to_data_url(image)}},
                    ],
                }
            ],
        }
        resp = httpx.post(
            f"{self.base_url}/chat/completions", json=body, headers=headers, timeout=self.timeout
        )
        resp.raise_for_status()
        content = resp.json()["choices"][0]["message"]["content"]
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return str(content or "")

    def analyze(
        self, image: Image.Image, *, context: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """vlm_analyze via the remote model."""
        return answer_to_result("vlm_analyze", self.name, self.ask(image, ANALYZE_PROMPT))

    def judge(
        self, image: Image.Image, *, copy_text: str, context: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """vlm_judge via the remote model."""
        return answer_to_result(
            "vlm_judge", self.name, self.ask(image, JUDGE_PROMPT.format(copy=copy_text))
        )


class LlavaTransformersVLM:
    """LLaVA (e.g. llava-hf/llava-1.5-7b-hf downloaded beforehand) from a LOCAL directory."""

    def __init__(
        self, model_path: str | Path, *, max_new_tokens: int = 96, device: str = "cpu"
    ) -> None:
        path = Path(model_path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"LLaVA model directory not found: {path} (a local path is required)"
            )
        self.torch: Any = require("torch", extra="feedly-llava", purpose="the LLaVA backend")
        transformers: Any = require(
            "transformers", extra="feedly-llava", purpose="the LLaVA backend"
        )
        self.processor: Any = transformers.AutoProcessor.from_pretrained(
            str(path), local_files_only=True
        )
        self.model: Any = transformers.LlavaForConditionalGeneration.from_pretrained(
            str(path), local_files_only=True
        ).to(device)
        self.model.eval()
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.name = f"llava-transformers:{path.name}"

    def ask(self, image: Image.Image, prompt: str) -> str:
        """Greedy generation for one image + question; returns only the new text."""
        inputs = self.processor(
            images=image.convert("RGB"), text=llava_prompt(prompt), return_tensors="pt"
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = out[0, inputs["input_ids"].shape[1] :]
        return str(self.processor.decode(new_tokens, skip_special_tokens=True)).strip()

    def analyze(
        self, image: Image.Image, *, context: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """vlm_analyze with the local LLaVA."""
        return answer_to_result("vlm_analyze", self.name, self.ask(image, ANALYZE_PROMPT))

    def judge(
        self, image: Image.Image, *, copy_text: str, context: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """vlm_judge with the local LLaVA."""
        return answer_to_result(
            "vlm_judge", self.name, self.ask(image, JUDGE_PROMPT.format(copy=copy_text))
        )


def sharpness(gray: np.ndarray) -> float:
    """Variance of the Laplacian: low values mean a blurry image."""
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def clipping(gray: np.ndarray) -> tuple[float, float]:
    """Shares of crushed-black (<= 2) and blown-white (>= 253) pixels."""
    n = gray.size
    return float((gray <= 2).sum() / n), float((gray >= 253).sum() / n)


#: Factor on the image score by how many sides of the product's box meet the frame.
IN_FRAME = (1.0, 0.8, 0.6)
#: A box edge this close to the frame (share of the image side) counts as cut off.
FRAME_MARGIN = 0.01
SIDES = ("left", "top", "right", "bottom")


def box_area(box: Sequence[float]) -> float:
    return float(max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1]))


def cut_sides(box: Sequence[float], size: tuple[int, int]) -> list[str]:
    """The sides of the image where the product's box meets the frame (it is cut off there)."""
    w, h = size
    mx, my = FRAME_MARGIN * w, FRAME_MARGIN * h
    touches = (box[0] <= mx, box[1] <= my, box[2] >= w - mx, box[3] >= h - my)
    return [side for side, hit in zip(SIDES, touches, strict=True) if hit]


class ClassicalImageChecks:
    """Measurable stand-in for the two LLaVA stages. NOT a vision-language model.

    analyze: sharpness (variance of Laplacian), exposure (histogram clipping, mean level),
    product visible (largest detected box's share of the image) and product in frame (that
    box does not meet the image border: a product cut off by the frame scales the score by
    0.8 for one side, 0.6 for two or more).
    judge: the same plus text legibility (WCAG contrast under the text, OCR similarity when
    given in ``context``) and whether the text covers detected objects.
    """

    name = "classical-checks (not a VLM)"

    def __init__(self, detector: Detector | None = None, *, sharp_ref: float = 60.0) -> None:
        self.detector = detector or OpenCVSaliencyDetector()
        self.sharp_ref = sharp_ref

    def _image_checks(
        self, image: Image.Image, dets: Sequence[Detection] | None
    ) -> tuple[dict[str, float], list[str]]:
        gray = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
        reasons: list[str] = []
        lap = sharpness(gray)
        s_sharp = min(1.0, lap / self.sharp_ref)
        reasons.append(f"sharpness (Laplacian variance) {lap:.1f} -> {s_sharp:.2f}")
        dark, bright = clipping(gray)
        mean = float(gray.mean())
        s_expo = max(0.0, 1.0 - 5.0 * (dark + bright)) * (1.0 if 40 <= mean <= 225 else 0.5)
        reasons.append(
            f"clipping {100 * dark:.1f}% black / {100 * bright:.1f}% white, mean {mean:.0f} -> {s_expo:.2f}"
        )
        found = list(dets) if dets is not None else self.detector.detect(image)
        product = max(found, key=lambda d: box_area(d.box), default=None)
        frac = box_area(product.box) / (image.width * image.height) if product else 0.0
        s_prod = 0.0 if frac < 0.02 else 1.0 if 0.05 <= frac <= 0.85 else 0.5
        reasons.append(f"largest object covers {100 * frac:.1f}% of the image -> {s_prod:.2f}")
        cut = cut_sides(product.box, image.size) if product else []
        s_frame = IN_FRAME[min(len(cut), 2)]
        reasons.append(
            f"product cut off by the frame at the {' and '.join(cut)} -> {s_frame:.2f}"
            if cut
            else "product fully inside the frame -> 1.00"
        )
        parts = {
            "sharpness": s_sharp,
            "exposure": s_expo,
            "product_visible": s_prod,
            "product_in_frame": s_frame,
        }
        return parts, reasons

    @staticmethod
    def _result(stage: str, parts: dict[str, float], reasons: list[str]) -> dict[str, Any]:
        # A cropped product spoils the whole ad, so it scales the score instead of being
        # one check among many (averaged in, a cut-off product still won on contrast).
        rest = [v for k, v in parts.items() if k != "product_in_frame"]
        score = float(np.mean(rest)) * parts.get("product_in_frame", 1.0)
        if min(parts.values()) < 0.3:  # one failed check fails the image, like a reviewer would
            score = min(score, 0.45)
        return {
            "stage": stage,
            "backend": ClassicalImageChecks.name,
            "score": round(score, 4),
            "verdict": "pass" if score >= PASS_THRESHOLD else "fail",
            "checks": {k: round(v, 4) for k, v in parts.items()},
            "reasons": reasons,
        }

    def analyze(
        self, image: Image.Image, *, context: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """vlm_analyze stand-in: sharpness, exposure, product visible."""
        dets = _context_detections(context)
        parts, reasons = self._image_checks(image, dets)
        return self._result("vlm_analyze", parts, reasons)

    def judge(
        self, image: Image.Image, *, copy_text: str, context: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """vlm_judge stand-in; ``context`` may hold text_box, text_color, detections, ocr_similarity."""
        ctx = context or {}
        dets = _context_detections(ctx)
        parts, reasons = self._image_checks(image, dets)
        if "text_box" in ctx and "text_color" in ctx:
            px = background_pixels(image, ctx["text_box"], ctx["text_color"])
            rc = region_contrast(ctx["text_color"], px)
            parts["text_contrast"] = contrast_score(rc["contrast_p10"])
            reasons.append(
                f"text contrast p10 {rc['contrast_p10']:.2f}:1 -> {parts['text_contrast']:.2f}"
            )
            if dets:
                from .iou import area, as_box, union_area_within

                tb = as_box(ctx["text_box"])
                covered = union_area_within(tb, [d.box for d in dets]) / max(1, area(tb))
                parts["text_clear_of_product"] = 1.0 - covered
                reasons.append(f"text box over objects {100 * covered:.0f}% -> {1 - covered:.2f}")
        if "ocr_similarity" in ctx:
            parts["ocr"] = float(ctx["ocr_similarity"])
            reasons.append(f"OCR similarity to the copy {parts['ocr']:.2f}")
        return self._result("vlm_judge", parts, reasons)


def _context_detections(context: Mapping[str, Any] | None) -> list[Detection] | None:
    if not context or "detections" not in context:
        return None
    return [
        d if isinstance(d, Detection) else Detection.from_json(d) for d in context["detections"]
    ]


def make_vlm(
    config: FeedlyConfig | None = None, *, detector: Detector | None = None
) -> VisionLanguageModel:
    """Build the configured VLM backend (default: classical checks, clearly labelled)."""
    if config is None or config.vlm == "classical":
        return ClassicalImageChecks(detector)
    if config.vlm == "llava":
        assert config.llava_model_path is not None
        return LlavaTransformersVLM(config.llava_model_path)
    if config.vlm == "openai":
        assert config.openai_base_url and config.openai_model
        return OpenAICompatibleVLM(
            config.openai_base_url, config.openai_model, config.openai_api_key
        )
    raise ValueError(f"unknown vlm backend {config.vlm!r}")
