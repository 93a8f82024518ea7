from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from examples.feedly.vision import feed
from examples.feedly.vision.backends import FeedlyConfig
from examples.feedly.vision.demo import run_job
from examples.feedly.vision.feed import (
    FEED_SIZE,
    _font_has_hangul,
    caption_text,
    find_korean_font,
    rank_variants,
    render_feed_image,
    variant_score,
)
from examples.feedly.vision.gallery import write_gallery
from examples.feedly.vision.sample_images import DEFAULT_DIR
from examples.feedly.vision.stages import Backends


def test_variant_scoring_prefers_better_variant() -> None:
    good = {
        "variant_id": "a",
        "vlm_score": 0.9,
        "ocr_similarity": 1.0,
        "contrast_ratio": 9.0,
        "overlap_fraction": 0.0,
    }
    covered = {**good, "variant_id": "b", "overlap_fraction": 0.8}
    low_contrast = {**good, "variant_id": "c", "contrast_ratio": 1.5}
    assert variant_score(good) == pytest.approx((0.35 * 0.9 + 0.25 + 0.2 + 0.2) / 1.0)
    ranked = rank_variants([low_contrast, covered, good])
    assert [v["variant_id"] for v in ranked] == ["a", "b", "c"]
    assert variant_score({"variant_id": "x"}) == 0.0  # missing results never win
    tie = rank_variants([{**good, "variant_id": "z"}, {**good, "variant_id": "y"}])
    assert tie[0]["variant_id"] == "y"


def test_feed_image_size_and_korean_caption() -> None:
    ad = Image.new("RGB", (768, 768), (200, 30, 30))
    r = render_feed_image(ad, "신상품 출시 · 여름 세일", ["#신상", "#세일"])
    assert r.image.size == FEED_SIZE == (1080, 1350)
    assert r.image.getpixel((540, 540)) == (200, 30, 30)  # the ad fills the top square
    band = r.image.crop((0, 1090, 1080, 1350))
    if r.font_path is None:
        assert not r.caption_in_image
    else:
        assert r.caption_in_image and _font_has_hangul(r.font_path)
        assert np.asarray(band.convert("L")).min() < 100  # dark caption glyphs were drawn
    assert "#신상 #세일" in caption_text("신상품", ["#신상", "#세일"], "New")


def test_feed_falls_back_without_korean_font(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feed, "find_korean_font", lambda explicit=None: None)
    r = render_feed_image(Image.new("RGB", (500, 400), (0, 0, 255)), "한글", ["#태그"])
    assert r.image.size == (1080, 1350) and r.font_path is None and not r.caption_in_image
    band = r.image.crop((0, 1100, 1080, 1350)).convert("L")
    assert np.asarray(band).min() > 200  # no tofu boxes, just the plain band


def test_font_probe_rejects_fonts_without_hangul() -> None:
    dejavu = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    if not Path(dejavu).is_file():
        pytest.skip("DejaVu not installed")
    assert not _font_has_hangul(dejavu)
    found = find_korean_font()
    assert found is None or _font_has_hangul(found)


def test_full_job_and_gallery(tmp_path: Path) -> None:
    backends = Backends(FeedlyConfig())
    imgs = [DEFAULT_DIR / "mug.png", DEFAULT_DIR / "watch.png"]
    job1 = run_job(
        "job-A", imgs, tmp_path, "New arrival: Summer Sale, up to 30% off", backends, product="mug"
    )
    job2 = run_job(
        "job-B", [DEFAULT_DIR / "sneaker.png"], tmp_path, "Free shipping. Shop now!", backends
    )
    with Image.open(job1["feed_image"]) as im:
        assert im.size == (1080, 1350)
    assert job1["chosen_variant_id"] in {"mug", "watch"}
    assert job1["caption_ko"] == "신상품 출시 · 여름 세일 · 최대 30% 할인"
    results = json.loads((tmp_path / "job-A" / "results.json").read_text(encoding="utf-8"))
    mug = results["variants"]["mug"]
    assert mug["ocr_eval"]["similarity"] > 0.8
    assert mug["iou_eval"]["overlap_fraction"] < 0.2
    assert mug["readability_eval"]["contrast_p10"] >= 3.0
    assert "not a VLM" in mug["vlm_analyze"]["backend"]
    page = write_gallery(tmp_path / "index.html", [job1, job2])
    text = page.read_text(encoding="utf-8")
    for job in (job1, job2):
        assert f"id='job-{job['job_id']}'" in text
        assert job["caption_ko"] in text
    assert "#무료배송" in text
    srcs = re.findall(r"src='([^']+)'", text)
    assert srcs and all(not s.startswith("/") and (tmp_path / s).is_file() for s in srcs)
    assert text.count("<tr class='chosen'>") == 2


def test_gallery_is_a_page_to_show(tmp_path: Path) -> None:
    backends = Backends(FeedlyConfig())
    job = run_job(
        "7", [DEFAULT_DIR / "mug.png"], tmp_path, "Best seller. Buy one get one free", backends
    )
    job["backends"] += "; korean font=/home/me/.venv/lib/site-packages/fonts/NotoSansKR-Regular.otf"
    text = write_gallery(tmp_path / "index.html", [job], subtitle="best of each job").read_text(
        encoding="utf-8"
    )
    # no file-system paths on the page: links are relative, a font is named by its file name
    assert str(tmp_path) not in text and ".venv" not in text and "site-packages" not in text
    assert "Korean font: NotoSansKR-Regular.otf" in text
    # the posts fill the window in a grid of cards, each showing the feed image at card width
    assert "grid-template-columns:repeat(auto-fill,minmax(min(100%,560px),1fr))" in text
    assert "<img class='feed'" in text and ".feed{display:block;width:100%" in text
    # the caption and hashtags are text on the page, not only pixels in the image
    assert f"<p class='tags' lang='ko'>{' '.join(job['hashtags'])}</p>" in text
    assert "<p class='sub'>best of each job</p>" in text


def test_korean_copy_on_the_image_keeps_the_hierarchy_and_passes_wcag(tmp_path: Path) -> None:
    if find_korean_font() is None:
        pytest.skip("no font with Hangul (pip install pylopdf-fonts-ko)")
    backends = Backends(FeedlyConfig(copy_on_image="ko"))
    job = run_job(
        "job-ko",
        [DEFAULT_DIR / "perfume.png"],
        tmp_path,
        "New arrival: Summer Sale, up to 30% off",
        backends,
        product="perfume",
    )
    results = json.loads((tmp_path / "job-ko" / "results.json").read_text(encoding="utf-8"))
    on_image = results["job"]["instagram_feed_gen"]["copy_on_image"]
    assert on_image["language"] == "ko"
    headline, offer = on_image["lines"][0], on_image["lines"][-1]
    assert re.search("[가-힣]", headline) and re.search("[가-힣]", offer)
    assert "30%" in offer  # the offer is the large, heavy line
    assert on_image["line_sizes"][0] < on_image["line_sizes"][-1]
    assert on_image["wcag_aa_normal"] is True and on_image["contrast_p10"] >= 4.5
    with Image.open(on_image["overlay_image"]) as ko, Image.open(job["chosen_overlay"]) as en:
        assert ko.size == en.size
        assert np.asarray(ko.convert("L")).tolist() != np.asarray(en.convert("L")).tolist()
    english = Backends(FeedlyConfig())
    plain = run_job(
        "job-en", [DEFAULT_DIR / "perfume.png"], tmp_path, "Flash sale: 20% off", english
    )
    assert plain["feed_image"] != job["feed_image"]
    en_results = json.loads((tmp_path / "job-en" / "results.json").read_text(encoding="utf-8"))
    assert en_results["job"]["instagram_feed_gen"]["copy_on_image"] == {"language": "en"}


def test_copy_on_image_rejects_an_unknown_language() -> None:
    with pytest.raises(ValueError, match="copy_on_image must be one of"):
        FeedlyConfig.from_env({"FEEDLY_COPY_ON_IMAGE": "fr"})
