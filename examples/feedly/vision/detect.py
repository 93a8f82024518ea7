"""yolo_detect stage: find the objects the ad text must not cover.

The default :class:`OpenCVSaliencyDetector` needs no model weights: it fuses three classical
cues (spectral-residual saliency, Canny edge density, colour distance from a backdrop model
estimated on the image border) and boxes the connected salient regions. It does not know
object classes, so every box is labelled ``"object"``. :class:`UltralyticsDetector` runs a
real YOLO model when the user supplies a local weights file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import cv2
import numpy as np
from PIL import Image

from .backends import require
from .iou import Box, as_box, iou

if TYPE_CHECKING:
    from .backends import FeedlyConfig


@dataclass(frozen=True)
class Detection:
    """One detected object: pixel box, confidence in [0, 1] and a class label."""

    box: Box
    score: float
    label: str = "object"

    def to_json(self) -> dict[str, Any]:
        """JSON-able form for stage results."""
        return {"box": list(self.box), "score": round(float(self.score), 4), "label": self.label}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Detection:
        """Inverse of :meth:`to_json`."""
        return cls(as_box(d["box"]), float(d.get("score", 1.0)), str(d.get("label", "object")))


@runtime_checkable
class Detector(Protocol):
    """Anything that boxes objects in an RGB image."""

    name: str

    def detect(self, image: Image.Image) -> list[Detection]:
        """Return detections sorted by descending score."""
        ...


def _norm(a: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by robust percentiles so one hot pixel cannot flatten the map."""
    lo, hi = np.percentile(a, 1), np.percentile(a, 99.5)
    if hi - lo < 1e-9:
        return np.zeros_like(a, dtype=np.float32)
    out: np.ndarray = np.clip((a - lo) / (hi - lo), 0, 1).astype(np.float32)
    return out


def spectral_residual_saliency(gray: np.ndarray, width: int = 96) -> np.ndarray:
    """Hou & Zhang (2007) spectral residual saliency, at the input's size, in [0, 1].

    Implemented with numpy FFTs because ``cv2.saliency`` lives in opencv-contrib only.
    """
    h, w = gray.shape
    small = cv2.resize(
        gray.astype(np.float32), (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA
    )
    spec = np.fft.fft2(small)
    log_amp = np.log(np.abs(spec) + 1e-8)
    phase = np.angle(spec)
    residual = log_amp - cv2.blur(log_amp, (3, 3))
    sal = np.abs(np.fft.ifft2(np.exp(residual + 1j * phase))) ** 2
    sal = cv2.GaussianBlur(sal.astype(np.float32), (0, 0), 2.5)
    return _norm(cv2.resize(sal, (w, h), interpolation=cv2.INTER_LINEAR))


def edge_density(gray: np.ndarray, radius: int = 9) -> np.ndarray:
    """Local density of Canny edges (auto thresholds from the median), in [0, 1]."""
    g = cv2.GaussianBlur(gray, (0, 0), 1.2)
    med = float(np.median(g))
    edges = cv2.Canny(g, max(10, int(0.66 * med * 0.5)), max(30, int(1.33 * med * 0.5)))
    dens = cv2.blur(edges.astype(np.float32) / 255.0, (2 * radius + 1, 2 * radius + 1))
    return _norm(dens)


def _poly_terms(xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Quadratic surface basis in normalised coordinates (gradient + vignette + lit spot)."""
    return np.stack([np.ones_like(xx), xx, yy, xx * xx, yy * yy, xx * yy], axis=-1)


def backdrop_contrast(rgb: np.ndarray, border: int = 10, rounds: int = 3) -> np.ndarray:
    """:func:`backdrop_distance` scaled to [0, 1]."""
    return _norm(backdrop_distance(rgb, border, rounds))


def backdrop_distance(rgb: np.ndarray, border: int = 10, rounds: int = 3) -> np.ndarray:
    """Colour distance (CIELAB units, 8-bit scale) from a smooth backdrop model.

    Studio sweeps are smooth (gradient, vignette, lit spot), so a quadratic surface per Lab
    channel is fitted first on the image border, then refitted on the pixels that agree with
    it best (robust iterations). Pixels far from the surface are likely product. Darkening
    at the same chroma (shadows) is down-weighted so contact shadows do not inflate boxes.
    """
    h, w = rgb.shape[:2]
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    basis = _poly_terms(xx / w - 0.5, yy / h - 0.5)
    sample = np.zeros((h, w), bool)
    sample[:border], sample[-border:], sample[:, :border], sample[:, -border:] = (
        True,
        True,
        True,
        True,
    )
    dist = np.zeros((h, w), np.float32)
    for _ in range(rounds):
        a = basis[sample]
        coef, *_ = np.linalg.lstsq(a, lab[sample], rcond=None)
        diff = lab - basis @ coef
        dl = diff[..., 0]
        dl = np.where(dl < 0, 0.35 * dl, dl)
        dist = np.sqrt(dl**2 + diff[..., 1] ** 2 + diff[..., 2] ** 2)
        sample = dist < np.percentile(dist, 40)
    return cv2.GaussianBlur(dist, (0, 0), 1.5)


class OpenCVSaliencyDetector:
    """Classical, weight-free object boxer (see module docstring for the cues)."""

    name = "opencv-saliency"

    def __init__(
        self,
        *,
        work_size: int = 384,
        min_area_frac: float = 0.004,
        max_objects: int = 5,
        weights: tuple[float, float, float] = (0.2, 0.3, 0.5),
        min_delta_e: float = 10.0,
    ) -> None:
        self.min_delta_e = min_delta_e
        self.work_size = work_size
        self.min_area_frac = min_area_frac
        self.max_objects = max_objects
        self.weights = weights

    def saliency_map(self, image: Image.Image) -> np.ndarray:
        """Fused cue map in [0, 1] at the image's own size (also used by the planner)."""
        return self._cues(image)[0]

    def _cues(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """(fused map at full size, raw backdrop distance at work size)."""
        rgb = np.asarray(image.convert("RGB"))
        h, w = rgb.shape[:2]
        k = self.work_size / max(h, w)
        small = (
            cv2.resize(
                rgb, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA
            )
            if k < 1
            else rgb
        )
        gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
        a, b, c = self.weights
        dist = backdrop_distance(small)
        fused = a * spectral_residual_saliency(gray) + b * edge_density(gray) + c * _norm(dist)
        fused = _norm(fused)
        return (cv2.resize(fused, (w, h), interpolation=cv2.INTER_LINEAR) if k < 1 else fused), dist

    def detect(self, image: Image.Image) -> list[Detection]:
        """Threshold the fused map (Otsu), close gaps, and box connected regions."""
        w, h = image.size
        k = min(1.0, self.work_size / max(h, w))
        full, dist = self._cues(image)
        if float(np.percentile(dist, 99.5)) < self.min_delta_e:
            return []  # nothing differs visibly from the backdrop: the cue maps are only noise
        sal = (
            cv2.resize(
                full, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA
            )
            if k < 1
            else full
        )
        u8 = (sal * 255).astype(np.uint8)
        thr, mask = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        if thr < 40:  # a flat image: Otsu splits noise, so nothing stands out
            return []
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel, iterations=2)
        mask = cv2.morphologyEx(
            mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
        )
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        min_area = self.min_area_frac * sal.shape[0] * sal.shape[1]
        found: list[Detection] = []
        for cnt in contours:
            if cv2.contourArea(cnt) < min_area:
                continue
            x, y, bw, bh = cv2.boundingRect(cnt)
            region = mask[y : y + bh, x : x + bw] > 0
            inside = sal[y : y + bh, x : x + bw][region]
            if float(dist[y : y + bh, x : x + bw][region].mean()) < 0.5 * self.min_delta_e:
                continue  # texture or lighting blob, not an object
            score = float(np.clip(inside.mean() if inside.size else 0.0, 0, 1))
            box = (
                int(x / k),
                int(y / k),
                min(w, int(np.ceil((x + bw) / k))),
                min(h, int(np.ceil((y + bh) / k))),
            )
            found.append(Detection(box, score, "object"))
        found.sort(key=lambda d: d.score, reverse=True)
        return non_max_suppression(found, 0.5)[: self.max_objects]


def non_max_suppression(dets: list[Detection], threshold: float) -> list[Detection]:
    """Drop boxes overlapping a higher-scoring box by more than ``threshold`` IoU."""
    kept: list[Detection] = []
    for d in sorted(dets, key=lambda d: d.score, reverse=True):
        if all(iou(d.box, k.box) <= threshold for k in kept):
            kept.append(d)
    return kept


class UltralyticsDetector:
    """A real YOLO model from a LOCAL weights file (never downloaded: YOLO_OFFLINE=1)."""

    name = "ultralytics-yolo"

    def __init__(
        self, weights_path: str | Path, *, conf: float = 0.25, device: str = "cpu"
    ) -> None:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"YOLO weights not found at {path} (a local .pt/.onnx file is required)"
            )
        os.environ.setdefault("YOLO_OFFLINE", "1")
        ultralytics = require(
            "ultralytics", extra="feedly-yolo", purpose="the YOLO detector backend"
        )
        self.model: Any = ultralytics.YOLO(str(path))
        self.conf = conf
        self.device = device

    def detect(self, image: Image.Image) -> list[Detection]:
        """Run the model once and convert its boxes to :class:`Detection`."""
        result = self.model.predict(
            image.convert("RGB"), conf=self.conf, device=self.device, verbose=False
        )[0]
        names: dict[int, str] = getattr(result, "names", {}) or {}
        out: list[Detection] = []
        for xyxy, score, cls in zip(
            result.boxes.xyxy.tolist(),
            result.boxes.conf.tolist(),
            result.boxes.cls.tolist(),
            strict=True,
        ):
            out.append(Detection(as_box(xyxy), float(score), names.get(int(cls), str(int(cls)))))
        out.sort(key=lambda d: d.score, reverse=True)
        return out


def make_detector(config: FeedlyConfig | None = None) -> Detector:
    """Build the configured detector (default: the weight-free OpenCV one)."""
    if config is None or config.detector == "opencv":
        return OpenCVSaliencyDetector()
    if config.detector == "ultralytics":
        assert config.yolo_weights is not None  # validated by FeedlyConfig
        return UltralyticsDetector(config.yolo_weights)
    raise ValueError(f"unknown detector {config.detector!r}")


def detect_objects(image: Image.Image, detector: Detector | None = None) -> dict[str, Any]:
    """yolo_detect stage body: JSON-able detections plus the backend name and image size."""
    det = detector or OpenCVSaliencyDetector()
    found = det.detect(image)
    return {
        "backend": det.name,
        "image_size": list(image.size),
        "detections": [d.to_json() for d in found],
    }
