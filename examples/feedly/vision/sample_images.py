"""Deterministic synthetic product shots, so the example runs without any downloaded data.

Each shot is a product (bottle, sneaker, mug, ...) on a studio sweep: a colour gradient with
vignette, a soft contact shadow, cylindrical shading, specular highlights and sensor grain.
The truth box of each product is known, which lets tests measure the detector.

Re-make the shipped set with ``python -m examples.feedly.vision.sample_images``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from .iou import Box

SIZE = 768
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "images"

Float3 = tuple[float, float, float]


@dataclass(frozen=True)
class Sample:
    """One generated shot with the product's ground-truth box."""

    name: str
    image: Image.Image
    truth: Box


class _Scene:
    """A float RGB canvas that product parts are painted onto with soft masks."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        self.rng = rng
        self.rgb: np.ndarray = np.zeros((size, size, 3), np.float32)
        self.product = np.zeros((size, size), np.float32)

    def mask(self, draw: Callable[[ImageDraw.ImageDraw], None], blur: float = 1.0) -> np.ndarray:
        """Rasterise a shape with anti-aliasing-like softening, as a [0,1] float mask."""
        m = Image.new("L", (self.size, self.size), 0)
        draw(ImageDraw.Draw(m))
        if blur > 0:
            m = m.filter(ImageFilter.GaussianBlur(blur))
        return np.asarray(m, np.float32) / 255.0

    def paint(
        self,
        m: np.ndarray,
        color: Float3,
        *,
        shade: str = "cylinder",
        strength: float = 0.45,
        gloss: float = 0.35,
        grain: float = 2.0,
        product: bool = True,
    ) -> None:
        """Composite a shaded, glossy, grainy colour through mask ``m``."""
        ys, xs = np.nonzero(m > 0.02)
        if len(xs) == 0:
            return
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        yy, xx = np.mgrid[0 : self.size, 0 : self.size].astype(np.float32)
        u = (xx - (x0 + x1) / 2) / max(1.0, (x1 - x0) / 2)
        v = (yy - (y0 + y1) / 2) / max(1.0, (y1 - y0) / 2)
        if shade == "cylinder":
            f = 1.0 - strength * np.clip(u, -1, 1) ** 2 + gloss * np.exp(-(((u + 0.4) / 0.09) ** 2))
            f += 0.5 * gloss * np.exp(-(((u - 0.55) / 0.05) ** 2))
        elif shade == "sphere":
            r2 = (u + 0.3) ** 2 + (v + 0.3) ** 2
            f = 1.0 - strength * np.clip(u**2 + v**2, 0, 1) + gloss * np.exp(-r2 / 0.04)
        else:
            f = 1.0 - strength * 0.5 * np.clip(v, -1, 1) + 0.0 * u
        col = np.asarray(color, np.float32)[None, None, :] * f[..., None]
        col += self.rng.normal(0.0, grain, (self.size, self.size, 1)).astype(np.float32)
        a = m[..., None]
        self.rgb = self.rgb * (1 - a) + col * a
        if product:
            self.product = np.maximum(self.product, m)


def _background(scene: _Scene, top: Float3, bottom: Float3) -> None:
    """Studio sweep: vertical gradient, a lit spot and a vignette."""
    n = scene.size
    t = np.linspace(0, 1, n, dtype=np.float32)[:, None, None]
    grad = np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    spot = np.exp(-(((xx - 0.5) ** 2 + (yy - 0.35) ** 2) / 0.12))[..., None]
    vign = 1.0 - 0.25 * (((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.5)[..., None]
    scene.rgb = np.broadcast_to(grad, (n, n, 3)) * vign * (0.9 + 0.15 * spot)


def _shadow(scene: _Scene, box: Box, depth: float = 0.45, blur: float = 22) -> None:
    """Soft contact shadow, multiplied into the background (it is not part of the product)."""
    m = scene.mask(lambda d: d.ellipse(box, fill=255), blur=blur)
    scene.rgb = scene.rgb * (1 - depth * m[..., None])


def _bottle(s: _Scene) -> None:
    _shadow(s, (150, 600, 370, 650))
    s.paint(
        s.mask(lambda d: d.rounded_rectangle((170, 250, 350, 630), 40, fill=255)), (40, 120, 90)
    )
    s.paint(
        s.mask(lambda d: d.rounded_rectangle((225, 170, 295, 270), 18, fill=255)), (40, 120, 90)
    )
    s.paint(
        s.mask(lambda d: d.rounded_rectangle((220, 130, 300, 185), 10, fill=255)),
        (30, 30, 35),
        gloss=0.2,
    )
    s.paint(
        s.mask(lambda d: d.rectangle((170, 380, 350, 500), fill=255)),
        (235, 225, 200),
        strength=0.35,
        gloss=0.1,
    )

    def stripes(d: ImageDraw.ImageDraw) -> None:
        for y in range(400, 490, 18):
            d.rectangle((195, y, 325, y + 6), fill=255)

    s.paint(s.mask(stripes, blur=0.6), (180, 60, 40), strength=0.35, gloss=0.0)


def _sneaker(s: _Scene) -> None:
    _shadow(s, (170, 560, 640, 625), depth=0.5)
    s.paint(
        s.mask(lambda d: d.rounded_rectangle((180, 520, 630, 590), 30, fill=255)),
        (245, 245, 240),
        shade="flat",
    )
    upper = [
        (200, 525),
        (215, 420),
        (300, 380),
        (360, 330),
        (430, 320),
        (470, 380),
        (560, 440),
        (615, 470),
        (625, 525),
    ]
    s.paint(s.mask(lambda d: d.polygon(upper, fill=255)), (200, 40, 50), shade="flat", strength=0.6)

    def laces(d: ImageDraw.ImageDraw) -> None:
        for i in range(5):
            d.line((365 + 22 * i, 350 + 18 * i, 405 + 22 * i, 335 + 18 * i), fill=255, width=7)

    s.paint(s.mask(laces, blur=0.5), (250, 250, 250), shade="flat", gloss=0.0)
    s.paint(
        s.mask(lambda d: d.arc((260, 400, 560, 560), 200, 330, fill=255, width=16)),
        (240, 240, 240),
        shade="flat",
    )


def _mug(s: _Scene) -> None:
    _shadow(s, (380, 540, 700, 600))
    s.paint(s.mask(lambda d: d.ellipse((560, 330, 680, 480), outline=255, width=26)), (30, 80, 160))
    s.paint(
        s.mask(lambda d: d.rounded_rectangle((400, 290, 600, 570), 26, fill=255)), (30, 80, 160)
    )
    s.paint(
        s.mask(lambda d: d.ellipse((402, 278, 598, 320), fill=255)),
        (20, 45, 90),
        shade="flat",
        gloss=0.0,
    )
    s.paint(
        s.mask(lambda d: d.ellipse((412, 284, 588, 314), fill=255)),
        (70, 40, 25),
        shade="sphere",
        gloss=0.1,
    )


def _perfume(s: _Scene) -> None:
    _shadow(s, (240, 620, 530, 670))
    s.paint(
        s.mask(lambda d: d.rounded_rectangle((250, 400, 520, 650), 30, fill=255)),
        (230, 170, 190),
        gloss=0.6,
        grain=3,
    )
    s.paint(
        s.mask(lambda d: d.rounded_rectangle((275, 430, 495, 620), 20, fill=255)),
        (200, 120, 150),
        gloss=0.4,
    )
    s.paint(s.mask(lambda d: d.rectangle((355, 365, 415, 405), fill=255)), (190, 160, 90))
    s.paint(
        s.mask(lambda d: d.rounded_rectangle((320, 290, 450, 370), 16, fill=255)),
        (212, 175, 80),
        gloss=0.7,
    )


def _headphones(s: _Scene) -> None:
    _shadow(s, (190, 540, 580, 590), depth=0.35)
    s.paint(
        s.mask(lambda d: d.arc((210, 150, 560, 520), 180, 360, fill=255, width=30)),
        (40, 40, 45),
        shade="flat",
        strength=0.3,
    )
    s.paint(
        s.mask(lambda d: d.rounded_rectangle((185, 320, 275, 530), 40, fill=255)),
        (45, 45, 50),
        gloss=0.5,
    )
    s.paint(
        s.mask(lambda d: d.rounded_rectangle((495, 320, 585, 530), 40, fill=255)),
        (45, 45, 50),
        gloss=0.5,
    )
    s.paint(
        s.mask(lambda d: d.rounded_rectangle((255, 345, 290, 505), 15, fill=255)),
        (150, 150, 155),
        shade="flat",
    )
    s.paint(
        s.mask(lambda d: d.rounded_rectangle((480, 345, 515, 505), 15, fill=255)),
        (150, 150, 155),
        shade="flat",
    )


def _watch(s: _Scene) -> None:
    _shadow(s, (270, 560, 510, 610), depth=0.35)
    s.paint(
        s.mask(lambda d: d.rounded_rectangle((335, 170, 445, 330), 12, fill=255)),
        (110, 75, 45),
        strength=0.3,
    )
    s.paint(
        s.mask(lambda d: d.rounded_rectangle((335, 470, 445, 600), 12, fill=255)),
        (110, 75, 45),
        strength=0.3,
    )
    s.paint(
        s.mask(lambda d: d.ellipse((290, 300, 490, 500), fill=255)),
        (200, 200, 205),
        shade="sphere",
        gloss=0.5,
    )
    s.paint(
        s.mask(lambda d: d.ellipse((310, 320, 470, 480), fill=255)),
        (245, 242, 235),
        shade="sphere",
        strength=0.15,
        gloss=0.1,
    )

    def ticks(d: ImageDraw.ImageDraw) -> None:
        for k in range(12):
            a = k * np.pi / 6
            cx, cy = 390, 400
            d.line(
                (
                    cx + 65 * np.cos(a),
                    cy + 65 * np.sin(a),
                    cx + 75 * np.cos(a),
                    cy + 75 * np.sin(a),
                ),
                fill=255,
                width=4,
            )
        d.line((390, 400, 390, 345), fill=255, width=6)
        d.line((390, 400, 430, 420), fill=255, width=5)

    s.paint(s.mask(ticks, blur=0.5), (25, 25, 30), shade="flat", gloss=0.0)


def _lipstick(s: _Scene) -> None:
    _shadow(s, (480, 600, 660, 640), depth=0.4)
    s.paint(
        s.mask(lambda d: d.rounded_rectangle((520, 420, 620, 620), 8, fill=255)),
        (20, 20, 22),
        gloss=0.6,
    )
    s.paint(
        s.mask(lambda d: d.rectangle((530, 370, 610, 425), fill=255)), (205, 170, 80), gloss=0.7
    )
    s.paint(
        s.mask(lambda d: d.polygon([(540, 372), (540, 300), (600, 270), (600, 372)], fill=255)),
        (190, 20, 60),
        gloss=0.3,
    )


_PRODUCTS: dict[str, tuple[Callable[[_Scene], None], Float3, Float3]] = {
    "bottle": (_bottle, (236, 232, 224), (196, 188, 176)),
    "sneaker": (_sneaker, (214, 226, 238), (160, 176, 196)),
    "mug": (_mug, (246, 236, 214), (214, 196, 164)),
    "perfume": (_perfume, (248, 236, 238), (214, 190, 198)),
    "headphones": (_headphones, (232, 236, 230), (180, 190, 176)),
    "watch": (_watch, (60, 64, 72), (24, 26, 30)),
    "lipstick": (_lipstick, (236, 220, 216), (200, 176, 172)),
}
PRODUCT_NAMES: tuple[str, ...] = tuple(_PRODUCTS)


def make_sample(name: str, seed: int = 7, size: int = SIZE) -> Sample:
    """Render one product shot; the same ``(name, seed)`` always gives the same pixels."""
    if name not in _PRODUCTS:
        raise KeyError(f"unknown product {name!r}; choose from {PRODUCT_NAMES}")
    draw_fn, top, bottom = _PRODUCTS[name]
    rng = np.random.default_rng([seed, PRODUCT_NAMES.index(name)])
    scene = _Scene(SIZE, rng)
    _background(scene, top, bottom)
    draw_fn(scene)
    # Low-frequency "paper" texture plus fine grain: detectors must not fire on either.
    low = rng.normal(0, 1, (SIZE // 32, SIZE // 32)).astype(np.float32)
    low_img = Image.fromarray(low).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    scene.rgb += 2.0 * np.asarray(low_img, np.float32)[..., None]
    # Sparse sensor grain (not on every pixel) keeps the shipped PNGs small.
    speck = (rng.random((SIZE, SIZE)) < 0.12) * rng.choice(
        np.array([-3.0, 3.0], np.float32), (SIZE, SIZE)
    )
    scene.rgb += speck[..., None].astype(np.float32)
    img = Image.fromarray(np.clip(scene.rgb, 0, 255).astype(np.uint8), "RGB")
    ys, xs = np.nonzero(scene.product > 0.5)
    truth: Box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    if size != SIZE:
        k = size / SIZE
        img = img.resize((size, size), Image.Resampling.LANCZOS)
        truth = (round(truth[0] * k), round(truth[1] * k), round(truth[2] * k), round(truth[3] * k))
    return Sample(name, img, truth)


def make_samples(names: Iterable[str] = PRODUCT_NAMES, seed: int = 7) -> list[Sample]:
    """Render several shots (default: all products)."""
    return [make_sample(n, seed) for n in names]


def write_samples(out_dir: Path = DEFAULT_DIR, seed: int = 7) -> dict[str, Box]:
    """Write ``<name>.png`` for every product plus ``truth.json`` with the product boxes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    truth: dict[str, Box] = {}
    for s in make_samples(seed=seed):
        s.image.save(out_dir / f"{s.name}.png", optimize=True)
        truth[s.name] = s.truth
    (out_dir / "truth.json").write_text(
        json.dumps({k: list(v) for k, v in truth.items()}, indent=1) + "\n", encoding="utf-8"
    )
    return truth


def load_images(directory: str | Path) -> list[tuple[str, Image.Image]]:
    """Load every jpg/png/webp in ``directory`` (sorted) as upright RGB, for ``--images DIR``.

    EXIF rotation is applied and transparency is flattened onto white, because every later
    stage assumes an opaque RGB photo.
    """
    d = Path(directory)
    if not d.is_dir():
        raise NotADirectoryError(f"--images expects a directory, got {d}")
    out: list[tuple[str, Image.Image]] = []
    for p in sorted(d.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
            continue
        out.append((p.stem, load_image(p)))
    if not out:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {d}")
    return out


def load_image(path: str | Path) -> Image.Image:
    """Open one image file as upright, opaque RGB."""
    with Image.open(path) as f:
        im: Image.Image = ImageOps.exif_transpose(f)
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(bg, rgba).convert("RGB")
        return im.convert("RGB")


def main(argv: list[str] | None = None) -> None:
    """CLI: regenerate the shipped sample images."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    truth = write_samples(args.out, args.seed)
    total = sum((args.out / f"{n}.png").stat().st_size for n in truth)
    print(f"wrote {len(truth)} images to {args.out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
