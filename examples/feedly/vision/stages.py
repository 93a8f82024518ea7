"""The ten Feedly stages as uniform, database-free functions, ready for stage handlers.

Variant stages take a :class:`VariantInput` (row key, job id, image path, the previous
stages' JSON results, output dir, params) and return a small JSON-able dict; job stages take
a :class:`JobInput` holding every variant's results. Images and other large artifacts are
written under ``out_dir`` and only their paths are returned.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .backends import FeedlyConfig
from .copy_kor import Translator, ad_copy_gen_kor, make_translator
from .detect import Detection, Detector, detect_objects, make_detector
from .feed import find_korean_font
from .feed import instagram_feed_gen as _feed_gen
from .iou import iou_eval as _iou_eval
from .ocr import ocr_eval as _ocr_eval
from .overlay import copy_blocks, render_overlay, role_of
from .planner import plan_proposals
from .readability import background_pixels, region_contrast
from .readability import readability_eval as _readability_eval
from .sample_images import load_image
from .vlm import VisionLanguageModel, make_vlm

Results = Mapping[str, Mapping[str, Any]]


@dataclass
class VariantInput:
    """What a variant-level handler knows: ``previous`` maps stage name to its result."""

    key: str
    job_id: str
    image_path: str | Path
    out_dir: str | Path
    previous: Results = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)

    def dir(self) -> Path:
        """Per-variant artifact folder (created)."""
        d = Path(self.out_dir) / str(self.job_id) / str(self.key)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def need(self, stage: str) -> Mapping[str, Any]:
        """A previous stage's result, or a clear error naming the missing stage."""
        if stage not in self.previous:
            raise KeyError(f"stage result {stage!r} missing for variant {self.key}")
        return self.previous[stage]


@dataclass
class JobInput:
    """What a job-level handler knows: every variant's stage results and earlier job stages."""

    job_id: str
    out_dir: str | Path
    variants: Mapping[str, Results]
    previous: Results = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)

    def dir(self) -> Path:
        """Per-job artifact folder (created)."""
        d = Path(self.out_dir) / str(self.job_id)
        d.mkdir(parents=True, exist_ok=True)
        return d


class Backends:
    """Lazily built, reused backends (model loads are paid once per process)."""

    def __init__(self, config: FeedlyConfig | None = None) -> None:
        self.config = config or FeedlyConfig()
        self._detector: Detector | None = None
        self._vlm: VisionLanguageModel | None = None
        self._translator: Translator | None = None

    @property
    def detector(self) -> Detector:
        if self._detector is None:
            self._detector = make_detector(self.config)
        return self._detector

    @property
    def vlm(self) -> VisionLanguageModel:
        if self._vlm is None:
            self._vlm = make_vlm(self.config, detector=self.detector)
        return self._vlm

    @property
    def translator(self) -> Translator:
        if self._translator is None:
            self._translator = make_translator(self.config)
        return self._translator


def _copy_text(inp: VariantInput) -> str:
    text = inp.params.get("text") or inp.params.get("copy")
    if not text:
        raise KeyError("params['text'] (the English ad copy) is required")
    return str(text)


def vlm_analyze(inp: VariantInput, b: Backends) -> dict[str, Any]:
    """Stage 1: validate the generated image."""
    return b.vlm.analyze(load_image(inp.image_path))


def yolo_detect(inp: VariantInput, b: Backends) -> dict[str, Any]:
    """Stage 2: boxes of the objects the text must avoid."""
    return detect_objects(load_image(inp.image_path), b.detector)


def planner(inp: VariantInput, b: Backends) -> dict[str, Any]:
    """Stage 3: ranked text-placement proposals; the first is the default choice."""
    props = plan_proposals(load_image(inp.image_path), inp.need("yolo_detect")["detections"])
    return {"proposals": props, "proposal_id": props[0]["proposal_id"]}


def overlay(inp: VariantInput, b: Backends) -> dict[str, Any]:
    """Stage 4: render the copy (params: text, optional proposal_id); writes overlay PNGs."""
    plan = inp.need("planner")
    pid = inp.params.get("proposal_id") or plan["proposal_id"]
    proposal = next((p for p in plan["proposals"] if p["proposal_id"] == pid), None)
    if proposal is None:
        raise KeyError(f"proposal {pid!r} not among the planner's proposals")
    res = render_overlay(
        load_image(inp.image_path), _copy_text(inp), proposal, font_path=inp.params.get("font_path")
    )
    d = inp.dir()
    img_path, bg_path = d / f"overlay_{res.overlay_id}.png", d / f"overlay_{res.overlay_id}_bg.png"
    res.image.save(img_path, compress_level=1)  # intermediate artifact: speed over size
    res.background.save(bg_path, compress_level=1)
    return {
        **res.to_json(),
        "proposal_id": pid,
        "text": _copy_text(inp),
        "overlay_image": str(img_path),
        "background_image": str(bg_path),
    }


def vlm_judge(inp: VariantInput, b: Backends) -> dict[str, Any]:
    """Stage 5: judge the overlaid ad."""
    ov = inp.need("overlay")
    ctx = {"text_box": ov["text_box"], "text_color": ov["text_color"]}
    if "yolo_detect" in inp.previous:
        ctx["detections"] = inp.previous["yolo_detect"]["detections"]
    with Image.open(ov["overlay_image"]) as im:
        return b.vlm.judge(im.convert("RGB"), copy_text=ov["text"], context=ctx)


def ocr_eval(inp: VariantInput, b: Backends) -> dict[str, Any]:
    """Stage 6: OCR the overlay and compare with the copy."""
    ov = inp.need("overlay")
    with Image.open(ov["overlay_image"]) as im:
        return _ocr_eval(im.convert("RGB"), ov["text"])


def readability_eval(inp: VariantInput, b: Backends) -> dict[str, Any]:
    """Stage 7: WCAG contrast under the text (exact, from the no-text render) + English ease."""
    ov = inp.need("overlay")
    with Image.open(ov["background_image"]) as bg:
        return _readability_eval(
            bg.convert("RGB"), ov["text_box"], ov["text_color"], ov["text"], is_background=True
        )


def iou_eval(inp: VariantInput, b: Backends) -> dict[str, Any]:
    """Stage 8: overlap of the drawn text box with detected objects."""
    dets = [Detection.from_json(d) for d in inp.need("yolo_detect")["detections"]]
    return _iou_eval(inp.need("overlay")["text_box"], dets)


def variant_scores(key: str, results: Results) -> dict[str, Any]:
    """The score row of one variant, as :func:`.feed.rank_variants` expects."""
    return {
        "variant_id": key,
        "vlm_score": results.get("vlm_judge", {}).get("score"),
        "ocr_similarity": results.get("ocr_eval", {}).get("similarity"),
        "contrast_ratio": results.get("readability_eval", {}).get("contrast_p10"),
        "overlap_fraction": results.get("iou_eval", {}).get("overlap_fraction"),
        "overlay_image": results.get("overlay", {}).get("overlay_image"),
    }


def ad_copy_kor(inp: JobInput, b: Backends) -> dict[str, Any]:
    """Stage 9 (job): translate the copies used by the variants; Korean hashtags."""
    copies = [r["overlay"]["text"] for r in inp.variants.values() if "overlay" in r]
    return ad_copy_gen_kor(copies, b.translator, product=inp.params.get("product"))


def instagram_feed(inp: JobInput, b: Backends) -> dict[str, Any]:
    """Stage 10 (job): choose the best variant, write feed.png and caption.txt."""
    kor = inp.previous["ad_copy_gen_kor"]
    rows = [variant_scores(k, r) for k, r in inp.variants.items()]
    paths = {r["variant_id"]: r["overlay_image"] for r in rows if r["overlay_image"]}
    on_image: dict[str, Any] = {"copy_on_image": {"language": "en"}}
    if b.config.copy_on_image == "ko" and rows:
        best = rank_variants_rows(rows)[0]["variant_id"]
        found = korean_copy_overlay(inp.variants[best], b, inp.dir())
        if found is not None:
            paths[best], on_image["copy_on_image"] = found
        else:
            on_image["copy_on_image"]["skipped"] = "no font with Hangul found (FEEDLY_KOREAN_FONT)"
    res = _feed_gen(
        rows,
        paths,
        kor["korean"],
        kor["hashtags"],
        inp.dir(),
        english=next(iter(kor.get("translations", {})), None),
        font_path=b.config.korean_font,
    )
    return {**res, **on_image, "variants": rank_variants_rows(rows)}


def korean_copy_overlay(
    results: Results, b: Backends, out_dir: Path
) -> tuple[str, dict[str, Any]] | None:
    """The chosen variant redrawn with its copy in Korean (None without a Hangul font).

    Headline and offer are translated apart and keep their roles; the text goes in the
    planned box and colour, on the same background; the WCAG check of the readability
    stage decides whether it needs a plate (AA for normal text, 4.5:1 at the 10th
    percentile of the pixels under it)."""
    font = find_korean_font(b.config.korean_font)
    if font is None:
        return None
    ov, plan = results["overlay"], results["planner"]
    proposal = next(p for p in plan["proposals"] if p["proposal_id"] == ov["proposal_id"])
    roles = [  # translated part by part, so each keeps its role
        role_of(b.translator.translate(part)["korean"], is_offer)
        for part, is_offer in copy_blocks(ov["text"])
    ]
    with Image.open(ov["background_image"]) as im:
        background = im.convert("RGB")
    for plate in (False, True):
        res = render_overlay(
            background, ov["text"], proposal, font_path=font, plate=plate, roles=roles
        )
        pixels = background_pixels(res.background, res.text_box, res.text_color)
        check = region_contrast(res.text_color, pixels)
        if check["wcag_aa_normal"]:
            break
    path = out_dir / f"overlay_ko_{res.overlay_id}.png"
    res.image.save(path)
    return str(path), {
        "language": "ko",
        "lines": res.lines,
        "line_sizes": res.line_sizes,
        "contrast_p10": check["contrast_p10"],
        "wcag_aa_normal": check["wcag_aa_normal"],
        "plate": plate,
        "overlay_image": str(path),
    }


def rank_variants_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Score rows with totals, best first (kept small: no images inlined)."""
    from .feed import rank_variants

    return rank_variants(rows)


VARIANT_STAGES = {
    "vlm_analyze": vlm_analyze,
    "yolo_detect": yolo_detect,
    "planner": planner,
    "overlay": overlay,
    "vlm_judge": vlm_judge,
    "ocr_eval": ocr_eval,
    "readability_eval": readability_eval,
    "iou_eval": iou_eval,
}
JOB_STAGES = {"ad_copy_gen_kor": ad_copy_kor, "instagram_feed_gen": instagram_feed}
