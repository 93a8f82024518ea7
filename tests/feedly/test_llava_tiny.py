"""LlavaTransformersVLM end to end on a tiny random LLaVA built offline (no hub access).

Needs the ``feedly-llava`` extra (torch CPU + transformers): ``make test-llava`` installs it
and runs this module. Skipped without it, unless ``FEEDLY_REQUIRE_MODELS=1`` (set by
``make test-llava``), which turns a missing package into a failure so CI cannot pass by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from examples.feedly.vision.sample_images import make_sample
from examples.feedly.vision.vlm import LlavaTransformersVLM, make_vlm

pytestmark = pytest.mark.model

if os.environ.get("FEEDLY_REQUIRE_MODELS") == "1":
    import tokenizers
    import torch
    import transformers
else:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")

WORDS = [
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "<image>",
    "USER",
    ":",
    "ASSISTANT",
    "Score",
    "Verdict",
    "PASS",
    "FAIL",
    "Reason",
    "/",
    "10",
    "7",
] + [f"w{i}" for i in range(24)]


def build_tiny_llava(path: Path) -> dict[str, int]:
    """Random tiny LLaVA (CLIP vision + Llama text) with a word-level tokenizer and a real
    LlavaProcessor, saved with save_pretrained. Generation is constrained to the word PASS
    through generation_config.suppress_tokens so the answer parsing is exercised."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [tokenizers.pre_tokenizers.WhitespaceSplit(), tokenizers.pre_tokenizers.Punctuation()]
    )
    tk.decoder = tokenizers.decoders.WordPiece(prefix="##")
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    processor = transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    text = transformers.LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config)
    model.generation_config.suppress_tokens = [i for w, i in vocab.items() if w != "PASS"]
    model.generation_config.pad_token_id = 3
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return vocab


def test_llava_transformers_backend_runs_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    build_tiny_llava(tmp_path)
    vlm = LlavaTransformersVLM(tmp_path, max_new_tokens=4)
    img = make_sample("bottle").image
    res = vlm.analyze(img)
    assert res["stage"] == "vlm_analyze" and res["backend"].startswith("llava-transformers:")
    assert res["raw"].split() == ["PASS"] * 4
    assert res["verdict"] == "pass" and res["score"] == 1.0 and res["parsed"] is True
    judged = vlm.judge(img, copy_text="New arrival")
    assert judged["stage"] == "vlm_judge" and 0.0 <= judged["score"] <= 1.0
    with pytest.raises(FileNotFoundError):
        LlavaTransformersVLM(tmp_path / "missing")


def test_make_vlm_llava_from_config(tmp_path: Path) -> None:
    from examples.feedly.vision.backends import FeedlyConfig

    build_tiny_llava(tmp_path)
    vlm = make_vlm(FeedlyConfig(vlm="llava", llava_model_path=str(tmp_path)))
    assert isinstance(vlm, LlavaTransformersVLM)
