from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from PIL import Image

from examples.feedly.vision.backends import FeedlyConfig, MissingBackendError, require
from examples.feedly.vision.copy_kor import (
    OpenAICompatibleTranslator,
    PhrasebookTranslator,
    Translator,
    ad_copy_gen_kor,
    korean_hashtags,
    make_translator,
)
from examples.feedly.vision.ocr import normalise_text, ocr_eval, text_similarity
from examples.feedly.vision.overlay import render_overlay
from examples.feedly.vision.sample_images import make_sample
from examples.feedly.vision.vlm import (
    ClassicalImageChecks,
    OpenAICompatibleVLM,
    VisionLanguageModel,
    answer_to_result,
    llava_prompt,
    make_vlm,
    parse_vlm_answer,
)

COPY = "New arrival: Summer Sale, up to 30% off"


def test_text_similarity() -> None:
    assert normalise_text("Up to 30% OFF!") == "upto30off"
    assert text_similarity("NEW ARRIVAL summer sale", "New arrival: Summer Sale") == 1.0
    assert text_similarity("", "") == 1.0
    assert text_similarity("xyz", COPY) < 0.2
    assert 0.8 < text_similarity("New arrlval Summer Sa1e", "New arrival Summer Sale") < 1.0


def test_ocr_reads_back_overlaid_copy() -> None:
    img = make_sample("sneaker").image
    proposal = {"proposal_id": "t", "box": [38, 38, 730, 161], "text_color": [17, 17, 17]}
    ov = render_overlay(img, COPY, proposal)
    res = ocr_eval(ov.image, COPY)
    assert res["similarity"] > 0.8, res["read_text"]
    assert res["lines"] and res["lines"][0]["box"][1] < 200
    blank = ocr_eval(img, COPY)  # the product shot has no lettering
    assert blank["similarity"] < 0.3


@pytest.mark.parametrize(
    ("answer", "score", "verdict"),
    [
        ("Score: 7/10\nVerdict: PASS\nReason: sharp product", 0.7, "pass"),
        ("**Score:** 7.5\n**Verdict:** FAIL", 0.75, "fail"),
        ("I would rate this image 8 out of 10.", 0.8, None),
        ("Rating: 9", 0.9, None),
        ("Overall quality: 85%", 0.85, None),
        ("score 4/5, verdict: yes", 0.8, "pass"),
        ("Yes, the product is clearly visible.", None, "pass"),
        ("No. The text covers the bottle.", None, "fail"),
        ("Score: 12", None, None),  # out of range is rejected
        ("I cannot see an image.", None, None),
    ],
)
def test_parse_llava_style_answers(answer: str, score: float | None, verdict: str | None) -> None:
    p = parse_vlm_answer(answer)
    assert (p.score is None) == (score is None)
    if score is not None:
        assert p.score == pytest.approx(score)
    assert p.verdict == verdict


def test_answer_to_result_rules() -> None:
    r = answer_to_result("vlm_judge", "x", "Score: 3/10\nReason: text over product")
    assert r["score"] == 0.3 and r["verdict"] == "fail" and r["reasons"] == ["text over product"]
    assert answer_to_result("vlm_judge", "x", "Yes.")["score"] == 1.0
    bad = answer_to_result("vlm_judge", "x", "lorem ipsum")
    assert bad["parsed"] is False and bad["score"] == 0.0 and bad["verdict"] == "unknown"
    assert llava_prompt("Q?") == "USER: <image>\nQ? ASSISTANT:"


def test_openai_compatible_vlm_against_local_server(openai_server: Any) -> None:
    def reply(body: dict[str, Any]) -> str:
        content = body["messages"][0]["content"]
        url = next(p["image_url"]["url"] for p in content if p["type"] == "image_url")
        head, b64 = url.split(",", 1)
        assert head == "data:image/jpeg;base64"
        Image.open(io.BytesIO(base64.b64decode(b64))).verify()
        text = next(p["text"] for p in content if p["type"] == "text")
        return (
            "Score: 8/10\nVerdict: PASS\nReason: ok"
            if "Instagram" in text
            else "Score: 6/10\nVerdict: FAIL\nReason: blurry"
        )

    with openai_server(reply) as (base_url, received):
        vlm = OpenAICompatibleVLM(base_url, "llava-test", api_key="sk-test")
        assert isinstance(vlm, VisionLanguageModel)
        img = make_sample("mug").image
        a = vlm.analyze(img)
        j = vlm.judge(img, copy_text=COPY)
    assert (a["score"], a["verdict"]) == (0.6, "fail")
    assert (j["score"], j["verdict"], j["stage"]) == (0.8, "pass", "vlm_judge")
    assert received[0]["auth"] == "Bearer sk-test"
    assert received[1]["body"]["model"] == "llava-test"
    assert COPY in received[1]["body"]["messages"][0]["content"][0]["text"]


def test_make_vlm_default_is_classical_not_a_vlm() -> None:
    vlm = make_vlm(FeedlyConfig())
    assert isinstance(vlm, ClassicalImageChecks)
    img = make_sample("perfume").image
    proposal = {"proposal_id": "t", "box": [38, 38, 730, 161], "text_color": [17, 17, 17]}
    ov = render_overlay(img, COPY, proposal)
    j = vlm.judge(
        ov.image,
        copy_text=COPY,
        context={
            "text_box": list(ov.text_box),
            "text_color": [17, 17, 17],
            "detections": [{"box": [250, 290, 521, 651]}],
            "ocr_similarity": 1.0,
        },
    )
    assert "not a VLM" in j["backend"] and 0 <= j["score"] <= 1
    assert j["checks"]["text_clear_of_product"] == 1.0 and j["checks"]["ocr"] == 1.0
    covered = vlm.judge(
        ov.image,
        copy_text=COPY,
        context={
            "text_box": list(ov.text_box),
            "text_color": [17, 17, 17],
            "detections": [{"box": [0, 0, 768, 300]}],
        },
    )
    assert covered["checks"]["text_clear_of_product"] == 0.0 and covered["score"] < j["score"]


def test_phrasebook_translates_known_phrases() -> None:
    t = PhrasebookTranslator()
    assert isinstance(t, Translator)
    assert t.translate("New arrival")["korean"] == "신상품 출시"
    assert t.translate("Free shipping")["korean"] == "무료 배송"
    r = t.translate(COPY)
    assert r["korean"] == "신상품 출시 · 여름 세일 · 최대 30% 할인"
    assert r["coverage"] == 1.0 and "not an LLM" in r["backend"]
    assert (
        t.translate("Limited edition perfume. Shop now!")["korean"]
        == "한정판 향수 · 지금 쇼핑하세요!"
    )
    assert (
        t.translate("Timeless classic watch for him")["korean"] == "그를 위한 변치 않는 클래식 시계"
    )
    unknown = t.translate("Quirky gizmo sale")
    assert unknown["untranslated"] == ["Quirky", "gizmo"] and unknown["korean"].endswith("세일")
    tags = korean_hashtags(r["korean"])
    assert tags[:3] == ["#신상", "#여름세일", "#세일"] and all(
        tg.startswith("#") and " " not in tg for tg in tags
    )
    job = ad_copy_gen_kor([COPY, COPY], product="sneakers")
    assert len(job["translations"]) == 1 and "#스니커즈" in job["hashtags"]


def test_openai_compatible_translator_against_local_server(openai_server: Any) -> None:
    with openai_server(lambda body: '"신상품 출시! 여름 세일 최대 30% 할인"') as (
        base_url,
        received,
    ):
        cfg = FeedlyConfig(translator="openai", openai_base_url=base_url, openai_model="gpt-test")
        tr = make_translator(cfg)
        assert isinstance(tr, OpenAICompatibleTranslator)
        out = tr.translate(COPY)
    assert out["korean"] == "신상품 출시! 여름 세일 최대 30% 할인"
    msgs = received[0]["body"]["messages"]
    assert msgs[0]["role"] == "system" and msgs[1]["content"] == COPY
    assert received[0]["auth"] is None


def test_config_from_env_and_missing_extras() -> None:
    cfg = FeedlyConfig.from_env(
        {
            "FEEDLY_VLM": "openai",
            "FEEDLY_OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
            "FEEDLY_OPENAI_MODEL": "m",
            "OPENAI_API_KEY": "secret",
        }
    )
    assert cfg.vlm == "openai" and cfg.openai_api_key == "secret"
    assert "secret" not in repr(cfg) and cfg.describe()["openai_api_key_set"] is True
    with pytest.raises(ValueError):
        FeedlyConfig(vlm="gpt5")
    with pytest.raises(ValueError, match="llava_model_path"):
        FeedlyConfig.from_env({}, vlm="llava")
    with pytest.raises(MissingBackendError, match=r"pip install 'pgstagechain\[feedly-llava\]'"):
        require("transformers_that_does_not_exist", extra="feedly-llava")
