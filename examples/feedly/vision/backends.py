"""Backend selection for the Feedly stages, from options or environment variables.

Defaults need only the ``feedly`` extra (OpenCV, Pillow, RapidOCR, textstat). Heavier or
remote backends are opt-in and a missing one fails early with the extra to install.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import ModuleType
from typing import Any

DETECTORS = ("opencv", "ultralytics")
VLMS = ("classical", "llava", "openai")
TRANSLATORS = ("phrasebook", "openai", "transformers")
#: The language of the ad copy drawn on the feed image (the caption is Korean either way).
COPY_LANGUAGES = ("en", "ko")

EXTRA_FOR_MODULE = {
    "cv2": "feedly",
    "PIL": "feedly",
    "numpy": "feedly",
    "rapidocr": "feedly",
    "onnxruntime": "feedly",
    "textstat": "feedly",
    "httpx": "feedly",
    "ultralytics": "feedly-yolo",
    "torch": "feedly-llava",
    "transformers": "feedly-llava",
}


class MissingBackendError(ImportError):
    """An optional backend's package is not installed; the message names the extra."""


def require(module: str, *, extra: str | None = None, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`MissingBackendError` naming ``pgstagechain[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        name = extra or EXTRA_FOR_MODULE.get(top, "feedly")
        why = f" for {purpose}" if purpose else ""
        raise MissingBackendError(
            f"{top!r} is needed{why} but is not importable ({exc}). "
            f"Install it with: pip install 'pgstagechain[{name}]'"
        ) from exc


@dataclass(frozen=True)
class FeedlyConfig:
    """Which backend each model-backed stage uses; see :meth:`from_env` for variable names."""

    detector: str = "opencv"
    yolo_weights: str | None = None
    vlm: str = "classical"
    llava_model_path: str | None = None
    openai_base_url: str | None = None
    openai_model: str | None = None
    openai_api_key: str | None = field(default=None, repr=False)
    translator: str = "phrasebook"
    translator_model_path: str | None = None
    translator_model: str | None = None
    korean_font: str | None = None
    copy_on_image: str = "en"

    def __post_init__(self) -> None:
        """Reject impossible combinations at configuration time, not mid-pipeline."""
        if self.detector not in DETECTORS:
            raise ValueError(f"detector must be one of {DETECTORS}, got {self.detector!r}")
        if self.vlm not in VLMS:
            raise ValueError(f"vlm must be one of {VLMS}, got {self.vlm!r}")
        if self.copy_on_image not in COPY_LANGUAGES:
            raise ValueError(
                f"copy_on_image must be one of {COPY_LANGUAGES}, got {self.copy_on_image!r}"
            )
        if self.translator not in TRANSLATORS:
            raise ValueError(f"translator must be one of {TRANSLATORS}, got {self.translator!r}")
        if self.detector == "ultralytics" and not self.yolo_weights:
            raise ValueError("detector='ultralytics' needs yolo_weights (a local .pt path)")
        if self.vlm == "llava" and not self.llava_model_path:
            raise ValueError("vlm='llava' needs llava_model_path (a local model directory)")
        if "openai" in (self.vlm, self.translator) and not (
            self.openai_base_url and self.openai_model
        ):
            raise ValueError("an 'openai' backend needs openai_base_url and openai_model")
        if self.translator == "transformers" and not self.translator_model_path:
            raise ValueError("translator='transformers' needs translator_model_path")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> FeedlyConfig:
        """Read ``FEEDLY_*`` variables (``OPENAI_API_KEY`` as key fallback); kwargs win.

        Variables: FEEDLY_DETECTOR, FEEDLY_YOLO_WEIGHTS, FEEDLY_VLM, FEEDLY_LLAVA_PATH,
        FEEDLY_OPENAI_BASE_URL, FEEDLY_OPENAI_MODEL, FEEDLY_OPENAI_API_KEY, FEEDLY_TRANSLATOR,
        FEEDLY_TRANSLATOR_PATH, FEEDLY_TRANSLATOR_MODEL, FEEDLY_KOREAN_FONT,
        FEEDLY_COPY_ON_IMAGE (``en`` or ``ko``).
        """
        env = os.environ if environ is None else environ
        names = {
            "detector": "FEEDLY_DETECTOR",
            "yolo_weights": "FEEDLY_YOLO_WEIGHTS",
            "vlm": "FEEDLY_VLM",
            "llava_model_path": "FEEDLY_LLAVA_PATH",
            "openai_base_url": "FEEDLY_OPENAI_BASE_URL",
            "openai_model": "FEEDLY_OPENAI_MODEL",
            "openai_api_key": "FEEDLY_OPENAI_API_KEY",
            "translator": "FEEDLY_TRANSLATOR",
            "translator_model_path": "FEEDLY_TRANSLATOR_PATH",
            "translator_model": "FEEDLY_TRANSLATOR_MODEL",
            "korean_font": "FEEDLY_KOREAN_FONT",
            "copy_on_image": "FEEDLY_COPY_ON_IMAGE",
        }
        values: dict[str, Any] = {k: env[v] for k, v in names.items() if env.get(v)}
        if "openai_api_key" not in values and env.get("OPENAI_API_KEY"):
            values["openai_api_key"] = env["OPENAI_API_KEY"]
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown FeedlyConfig options: {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_options(self, **changes: Any) -> FeedlyConfig:
        """A copy with some options changed (validated again)."""
        return replace(self, **changes)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary without secrets, for stage results and logs."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "openai_api_key"}
        out["openai_api_key_set"] = bool(self.openai_api_key)
        return out
