from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from examples.feedly.vision.backends import FeedlyConfig, MissingBackendError
from examples.feedly.vision.detect import (
    Detection,
    Detector,
    OpenCVSaliencyDetector,
    UltralyticsDetector,
    detect_objects,
    make_detector,
)
from examples.feedly.vision.iou import area, intersection, iou
from examples.feedly.vision.overlay import fit_text, render_overlay
from examples.feedly.vision.planner import candidate_boxes, plan_proposals, plan_text_box
from examples.feedly.vision.sample_images import (
    DEFAULT_DIR,
    PRODUCT_NAMES,
    load_image,
    load_images,
    make_sample,
)

TRUTH = (300, 120, 520, 420)


def studio_with_rectangle(seed: int = 0) -> Image.Image:
    """Gradient backdrop with grain and one drawn, shaded rectangle object."""
    rng = np.random.default_rng(seed)
    h = w = 640
    t = np.linspace(0, 1, h)[:, None, None]
    bg = (230 * (1 - t) + 180 * t) * np.ones((h, w, 3))
    bg += rng.normal(0, 2.0, (h, w, 3))
    x0, y0, x1, y1 = TRUTH
    shade = np.linspace(0.8, 1.1, x1 - x0)[None, :, None]
    bg[y0:y1, x0:x1] = np.array([40, 90, 170]) * shade + rng.normal(0, 3, (y1 - y0, x1 - x0, 3))
    return Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))


def test_drawn_rectangle_is_detected() -> None:
    dets = OpenCVSaliencyDetector().detect(studio_with_rectangle())
    assert dets, "nothing detected"
    assert max(iou(d.box, TRUTH) for d in dets) > 0.5
    assert all(0.0 <= d.score <= 1.0 for d in dets)


def test_flat_image_has_no_detections() -> None:
    rng = np.random.default_rng(1)
    flat = np.clip(200 + rng.normal(0, 2, (300, 300, 3)), 0, 255).astype(np.uint8)
    assert OpenCVSaliencyDetector().detect(Image.fromarray(flat)) == []


@pytest.mark.parametrize("name", PRODUCT_NAMES)
def test_sample_products_detected(name: str) -> None:
    truth = json.loads((DEFAULT_DIR / "truth.json").read_text())
    img = load_image(DEFAULT_DIR / f"{name}.png")
    dets = OpenCVSaliencyDetector().detect(img)
    assert max(iou(d.box, tuple(truth[name])) for d in dets) > 0.6


def test_samples_are_deterministic_and_shipped() -> None:
    a, b = make_sample("mug", seed=3), make_sample("mug", seed=3)
    assert a.image.tobytes() == b.image.tobytes() and a.truth == b.truth
    assert make_sample("mug", seed=4).image.tobytes() != a.image.tobytes()
    shipped = load_images(DEFAULT_DIR)
    assert {n for n, _ in shipped} == set(PRODUCT_NAMES)
    assert all(im.mode == "RGB" and im.size == (768, 768) for _, im in shipped)
    assert sum((DEFAULT_DIR / f"{n}.png").stat().st_size for n in PRODUCT_NAMES) < 3_000_000
    # The shipped PNGs are what the generator makes (tolerance: other numpy/Pillow builds).
    remade = np.asarray(make_sample(shipped[0][0]).image, np.int16)
    assert np.abs(np.asarray(shipped[0][1], np.int16) - remade).mean() < 0.5


def test_load_images_converts_formats(tmp_path: Path) -> None:
    Image.new("RGBA", (20, 10), (255, 0, 0, 0)).save(tmp_path / "a.png")
    Image.new("L", (20, 10), 128).save(tmp_path / "b.jpg")
    Image.new("RGB", (20, 10), (0, 200, 0)).save(tmp_path / "c.webp", lossless=True)
    (tmp_path / "notes.txt").write_text("skip me")
    got = load_images(tmp_path)
    assert [n for n, _ in got] == ["a", "b", "c"]
    assert all(im.mode == "RGB" for _, im in got)
    assert got[0][1].getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert got[2][1].getpixel((0, 0)) == (0, 200, 0)
    with pytest.raises(NotADirectoryError):
        load_images(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError):
        load_images(empty)


def test_planner_avoids_the_object() -> None:
    img = studio_with_rectangle()
    dets = OpenCVSaliencyDetector().detect(img)
    props = plan_proposals(img, dets, k=3)
    assert len(props) == 3
    for p in props:
        inter = intersection(tuple(p["box"]), TRUTH)
        assert inter is None or area(inter) / area(tuple(p["box"])) < 0.05
    best = props[0]
    # Light backdrop -> dark text, with real contrast.
    assert sum(best["text_color"]) < 3 * 128 and best["contrast_p10"] >= 4.5
    assert len(best["proposal_id"]) == 12
    assert plan_text_box(img, dets)["proposal_id"] == best["proposal_id"]  # deterministic


def test_planner_picks_white_on_dark_and_penalises_overlap() -> None:
    dark = Image.new("RGB", (400, 400), (20, 20, 30))
    best = plan_text_box(dark, [])
    assert best["text_color"] == [255, 255, 255]
    # An object covering everything but a top strip forces the text into that strip.
    det = Detection((0, 120, 400, 400), 0.9)
    best = plan_text_box(dark, [det.to_json()])
    assert best["box"][3] <= 130 and best["overlap_fraction"] < 0.1
    assert all(b[2] <= 400 and b[3] <= 400 for b in candidate_boxes((400, 400)))


def test_overlay_fits_text_inside_box_and_plate() -> None:
    img = studio_with_rectangle()
    proposal = {
        "proposal_id": "p1",
        "box": [40, 480, 600, 600],
        "text_color": [17, 17, 17],
        "plate": True,
        "plate_color": [255, 255, 255],
        "plate_alpha": 0.6,
    }
    res = render_overlay(img, "New arrival: Summer Sale, up to 30% off", proposal)
    tb = res.text_box
    assert 40 <= tb[0] < tb[2] <= 600 and 480 <= tb[1] < tb[3] <= 600
    assert res.plate_box is not None and res.font_size >= 20
    diff = np.abs(np.asarray(res.image, int) - np.asarray(img, int)).sum(axis=2)
    ys, xs = np.nonzero(diff)
    pb = res.plate_box
    assert xs.min() >= pb[0] and xs.max() < pb[2] and ys.min() >= pb[1] and ys.max() < pb[3]
    assert res.background.tobytes() != res.image.tobytes()  # background has no text
    assert (
        res.to_json()["overlay_id"]
        == render_overlay(img, "New arrival: Summer Sale, up to 30% off", proposal).overlay_id
    )
    small = fit_text("A much longer line of ad copy that must wrap", (0, 0, 300, 200))
    assert len(small.lines) >= 2


def test_make_detector_and_missing_yolo_extra(tmp_path: Path) -> None:
    det = make_detector(FeedlyConfig())
    assert isinstance(det, Detector) and det.name == "opencv-saliency"
    out = detect_objects(studio_with_rectangle(), det)
    assert out["image_size"] == [640, 640] and out["detections"][0]["label"] == "object"
    with pytest.raises(ValueError, match="yolo_weights"):
        FeedlyConfig(detector="ultralytics")
    with pytest.raises(FileNotFoundError):
        UltralyticsDetector(tmp_path / "missing.pt")
    weights = tmp_path / "yolo.pt"
    weights.write_bytes(b"not a model")
    try:
        import ultralytics  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        with pytest.raises(MissingBackendError, match=r"pgstagechain\[feedly-yolo\]"):
            make_detector(FeedlyConfig(detector="ultralytics", yolo_weights=str(weights)))
    else:  # pragma: no cover - only where the extra is installed
        pytest.skip("ultralytics installed; missing-extra path not testable")


def test_blur_lowers_classical_sharpness() -> None:
    from examples.feedly.vision.vlm import ClassicalImageChecks

    img = make_sample("watch").image
    checks = ClassicalImageChecks()
    sharp = checks.analyze(img)
    blurred = checks.analyze(img.filter(ImageFilter.GaussianBlur(6)))
    assert sharp["checks"]["sharpness"] > blurred["checks"]["sharpness"]
    assert sharp["backend"] == "classical-checks (not a VLM)"
    assert 0.0 <= blurred["score"] <= 1.0
    black = Image.new("RGB", (200, 200), (0, 0, 0))
    dark = checks.analyze(black)
    assert dark["verdict"] == "fail" and dark["checks"]["exposure"] == 0.0


def test_a_product_cut_off_by_the_frame_scores_below_the_whole_product() -> None:
    from examples.feedly.app import reframe
    from examples.feedly.vision.feed import rank_variants
    from examples.feedly.vision.vlm import ClassicalImageChecks

    checks = ClassicalImageChecks()
    whole = make_sample("lipstick").image
    cropped = reframe(whole, 2)  # zoomed into the bottom-right corner: the lipstick is cut off
    ok, cut = checks.analyze(whole), checks.analyze(cropped)
    assert ok["checks"]["product_in_frame"] == 1.0
    assert "product fully inside the frame -> 1.00" in ok["reasons"]
    assert cut["checks"]["product_in_frame"] == 0.6
    assert "product cut off by the frame at the right and bottom -> 0.60" in cut["reasons"]
    assert cut["score"] <= 0.6 * ok["score"] + 1e-9
    # everything else equal, the ranking now prefers the whole product
    rest = {"ocr_similarity": 1.0, "contrast_ratio": 7.0, "overlap_fraction": 0.0}
    ranked = rank_variants(
        [
            {"variant_id": "cut", "vlm_score": cut["score"], **rest, "contrast_ratio": 9.0},
            {"variant_id": "whole", "vlm_score": ok["score"], **rest},
        ]
    )
    assert ranked[0]["variant_id"] == "whole"


def test_one_side_on_the_frame_is_a_milder_penalty() -> None:
    from examples.feedly.vision.vlm import cut_sides

    assert cut_sides((100, 100, 300, 300), (768, 768)) == []
    assert cut_sides((100, 100, 300, 768), (768, 768)) == ["bottom"]
    assert cut_sides((0, 0, 768, 768), (768, 768)) == ["left", "top", "right", "bottom"]
    assert cut_sides((5, 100, 300, 300), (768, 768)) == ["left"]  # within 1 % of the border


def test_copy_splits_into_headline_and_offer() -> None:
    from examples.feedly.vision.overlay import split_copy

    assert split_copy("New arrival: Summer Sale, up to 30% off") == (
        "New arrival",
        "Summer Sale, up to 30% off",
    )
    assert split_copy("Best seller. Buy one get one free") == (
        "Best seller",
        "Buy one get one free",
    )
    assert split_copy("Up to 30% off") == ("", "Up to 30% off")


def test_the_offer_is_the_part_with_the_deal_wherever_it_stands() -> None:
    from examples.feedly.vision.overlay import copy_blocks, copy_roles

    assert copy_blocks("Up to 30% off. Today only") == [
        ("Up to 30% off", True),
        ("Today only", False),
    ]
    roles = copy_roles("Up to 30% off. Today only")
    assert [(r.text, r.scale, r.bold) for r in roles] == [
        ("Up to 30% off", 1.0, True),  # reading order kept, the deal set large
        ("TODAY ONLY", 0.6, False),
    ]
    assert copy_blocks("Flash sale: 20% off today only") == [
        ("Flash sale", False),
        ("20% off today only", True),
    ]


def test_overlay_sets_the_offer_larger_and_heavier_than_the_headline() -> None:
    from examples.feedly.vision.overlay import copy_roles, fit_roles

    img = make_sample("perfume").image
    dets = detect_objects(img)["detections"]
    proposal = plan_proposals(img, dets)[0]
    res = render_overlay(img, "New arrival: Summer Sale, up to 30% off", proposal)
    assert res.lines[0] == "NEW ARRIVAL"
    assert res.line_sizes is not None
    headline, offer = res.line_sizes[0], res.line_sizes[-1]
    assert offer == res.font_size and headline < 0.7 * offer
    assert offer >= 0.05 * img.height  # the offer reads at feed size
    layout = fit_roles(copy_roles("New arrival: Summer Sale, up to 30% off"), proposal["box"])
    assert layout.strokes is not None and layout.strokes[0] == 0 and layout.strokes[-1] >= 1
    flat = render_overlay(img, "New arrival: Summer Sale, up to 30% off", proposal, hierarchy=False)
    assert len(set(flat.line_sizes or [])) == 1 and flat.overlay_id != res.overlay_id


def test_a_wrapped_line_never_starts_or_ends_with_a_separator() -> None:
    from PIL import ImageDraw

    from examples.feedly.vision.overlay import load_font, wrap_text

    draw = ImageDraw.Draw(Image.new("L", (1, 1)))
    font = load_font(40)
    width = int(draw.textlength("Summer sale ·", font=font)) + 2
    lines = wrap_text("Summer sale · up to 30% off", font, width, draw)
    assert lines == ["Summer sale", "up to 30% off"]
    assert wrap_text("Summer sale · up to 30% off", font, 2000, draw) == [
        "Summer sale · up to 30% off"
    ]
