from __future__ import annotations

import pytest
from PIL import Image

from examples.feedly.vision.iou import as_box, iou, iou_eval, overlap_fraction, union_area_within
from examples.feedly.vision.readability import (
    background_pixels,
    contrast_ratio,
    readability_eval,
    region_contrast,
    relative_luminance,
    text_readability,
)


def test_iou_known_boxes() -> None:
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    # 5x10 overlap = 50; union = 100 + 100 - 50
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert overlap_fraction((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(0.5)
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges do not overlap


def test_union_area_does_not_double_count() -> None:
    region = (0, 0, 100, 100)
    boxes = [(0, 0, 50, 50), (25, 25, 75, 75)]  # 2500 + 2500 - 625
    assert union_area_within(region, boxes) == 4375
    res = iou_eval(
        [0, 0, 100, 100], [{"box": [0, 0, 50, 50]}, {"box": [25, 25, 75, 75], "label": "cup"}]
    )
    assert res["overlap_fraction"] == pytest.approx(0.4375)
    assert res["per_object"][1]["label"] == "cup"
    assert as_box([10.4, 20.6, 5, 1]) == (5, 1, 10, 21)


def test_contrast_black_on_white_is_exactly_21() -> None:
    assert contrast_ratio((0, 0, 0), (255, 255, 255)) == 21.0
    assert contrast_ratio((255, 255, 255), (0, 0, 0)) == 21.0
    assert contrast_ratio((120, 30, 200), (120, 30, 200)) == 1.0


def test_contrast_mid_grey_hand_computed() -> None:
    # #777777: c = 119/255 = 0.466667; ((c + 0.055) / 1.055) ** 2.4 = 0.184475
    lum = ((119 / 255 + 0.055) / 1.055) ** 2.4
    assert float(relative_luminance((119, 119, 119))) == pytest.approx(lum)
    assert lum == pytest.approx(0.184475, abs=1e-5)
    assert contrast_ratio((119, 119, 119), (255, 255, 255)) == pytest.approx(1.05 / (lum + 0.05))
    assert contrast_ratio((119, 119, 119), (255, 255, 255)) == pytest.approx(4.478, abs=1e-3)
    # Low-channel branch: #0a0a0a has c = 0.0392 <= 0.04045 -> linear c / 12.92
    assert float(relative_luminance((10, 10, 10))) == pytest.approx(10 / 255 / 12.92)


def test_region_contrast_masks_text_strokes() -> None:
    img = Image.new("RGB", (100, 40), (255, 255, 255))
    for x in range(10, 90, 10):  # black "strokes" on white
        img.paste((0, 0, 0), (x, 10, x + 3, 30))
    px = background_pixels(img, (0, 0, 100, 40), text_color=(0, 0, 0))
    assert (px == 255).all()
    rc = region_contrast((0, 0, 0), px)
    assert rc["contrast_p10"] == 21.0 and rc["wcag_aaa_normal"]
    res = readability_eval(img, (0, 0, 100, 40), (0, 0, 0), "Fresh summer sneakers. Shop now.")
    assert res["legibility_score"] == 1.0
    grey = readability_eval(
        Image.new("RGB", (50, 50), (119, 119, 119)),
        (0, 0, 50, 50),
        (255, 255, 255),
        "Hi",
        is_background=True,
    )
    assert grey["contrast_p10"] == pytest.approx(4.478, abs=1e-3)
    assert grey["wcag_aa_large"] and not grey["wcag_aa_normal"]


def test_textstat_english_readability_offline() -> None:
    easy = text_readability("Big sale. Shop now. New shoes for you.")
    hard = text_readability(
        "Unprecedented multifunctional ergonomically engineered architectural innovation."
    )
    assert easy["flesch_reading_ease"] > hard["flesch_reading_ease"]
    assert 0.0 <= hard["ease"] <= easy["ease"] <= 1.0
    assert easy["words"] == 8
