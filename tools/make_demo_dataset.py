"""Write a small synthetic, class-structured image dataset in the folder layout (no download).

Ten classes, each a shape or texture (circle, square, triangle, cross, ring, horizontal / vertical /
diagonal stripes, checkerboard, dot grid) drawn in one of four fixed colour pairs,
random size, position and rotation, plus pixel noise. Colour carries no class information, so a
linear classifier needs shape features: a useful check that pretraining learned something.

    python tools/make_demo_dataset.py --data-dir output/demo/data --train-per-class 100 --val-per-class 20

writes ``<data-dir>/{train,val}/<class>/<i>.png`` (``--out``: alias of ``--data-dir``).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from contrast import engine  # noqa: E402
from contrast.logger import Progress  # noqa: E402
from contrast.option import add_dataset_output_flag, add_debug_flag, add_seed_flag, new_parser  # noqa: E402


def demo_dataset_parser(doc: str = "") -> argparse.ArgumentParser:
    p = new_parser("make_demo_dataset.py", doc)
    add_dataset_output_flag(p)
    p.add_argument("--train-per-class", type=int, default=100, help="training images per class")
    p.add_argument("--val-per-class", type=int, default=20, help="validation images per class")
    p.add_argument("--image-size", "--size", dest="image_size", type=int, default=32,
                   help="image side in pixels (--size: alias)")
    add_seed_flag(p)
    add_debug_flag(p)
    return p


Draw = Callable[[ImageDraw.ImageDraw, np.random.Generator, int, tuple], None]


def _box(rng: np.random.Generator, size: int):
    r = rng.uniform(0.25, 0.42) * size
    cx, cy = rng.uniform(r, size - r, 2)
    return cx, cy, r


def _circle(d, rng, size, fg):
    cx, cy, r = _box(rng, size)
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)


def _square(d, rng, size, fg):
    cx, cy, r = _box(rng, size)
    d.rectangle([cx - r * 0.8, cy - r * 0.8, cx + r * 0.8, cy + r * 0.8], fill=fg)


def _triangle(d, rng, size, fg):
    cx, cy, r = _box(rng, size)
    a = rng.uniform(0, 2 * np.pi)
    d.polygon([(cx + r * np.cos(a + k * 2 * np.pi / 3), cy + r * np.sin(a + k * 2 * np.pi / 3)) for k in range(3)],
              fill=fg)


def _cross(d, rng, size, fg):
    cx, cy, r = _box(rng, size)
    w = r * 0.3
    d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
    d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)


def _ring(d, rng, size, fg):
    cx, cy, r = _box(rng, size)
    d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=max(2, int(r * 0.3)))


def _stripes(axis: str) -> Draw:
    def draw(d, rng, size, fg):
        period = int(rng.integers(4, 9))
        offset = int(rng.integers(0, period))
        for p in range(-size, 2 * size, period):
            q = p + offset
            if axis == "h":
                d.rectangle([0, q, size, q + period // 2 - 1], fill=fg)
            elif axis == "v":
                d.rectangle([q, 0, q + period // 2 - 1, size], fill=fg)
            else:
                d.line([(q, 0), (q + size, size)], fill=fg, width=max(1, period // 2))
    return draw


def _checker(d, rng, size, fg):
    cell = int(rng.integers(4, 9))
    for i in range(0, size, cell):
        for j in range(0, size, cell):
            if (i // cell + j // cell) % 2 == 0:
                d.rectangle([i, j, i + cell - 1, j + cell - 1], fill=fg)


def _dots(d, rng, size, fg):
    step = int(rng.integers(6, 11))
    rad = step * 0.25
    off = rng.uniform(0, step, 2)
    for x in np.arange(off[0], size, step):
        for y in np.arange(off[1], size, step):
            d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=fg)


# Few colour pairs shared by all classes: colour tells neither the class nor (much of) the instance, so
# instance discrimination has to use shape and texture.
PALETTE = (((230, 230, 230), (20, 20, 20)), ((20, 20, 20), (230, 230, 230)),
           ((240, 200, 40), (30, 60, 160)), ((30, 60, 160), (240, 200, 40)))

CLASSES: Dict[str, Draw] = {
    "circle": _circle, "square": _square, "triangle": _triangle, "cross": _cross, "ring": _ring,
    "hstripes": _stripes("h"), "vstripes": _stripes("v"), "diagonal": _stripes("d"), "checker": _checker,
    "dots": _dots,
}


def render(name: str, rng: np.random.Generator, size: int) -> Image.Image:
    """One ``size`` x ``size`` RGB image of class ``name`` with random colours and noise."""
    fg, bg = PALETTE[int(rng.integers(len(PALETTE)))]
    img = Image.new("RGB", (size, size), bg)
    CLASSES[name](ImageDraw.Draw(img), rng, size, fg)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_dataset(out: str, train_per_class: int, val_per_class: int, size: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        with Progress(f"demo data {split}", total=n * len(CLASSES), unit="img") as bar:
            for name in CLASSES:
                folder = os.path.join(out, split, name)
                os.makedirs(folder, exist_ok=True)
                for i in range(n):
                    render(name, rng, size).save(os.path.join(folder, f"{i:05d}.png"))
                    bar.update()
    return out


def main(argv: Optional[List[str]] = None) -> str:
    p = demo_dataset_parser(__doc__)
    a = p.parse_args(argv)
    if min(a.train_per_class, a.val_per_class, a.image_size) < 1:
        p.error("--train-per-class, --val-per-class and --image-size must be >= 1")
    make_dataset(a.data_dir, a.train_per_class, a.val_per_class, a.image_size, a.seed)
    print(f"wrote {len(CLASSES)} classes x ({a.train_per_class} train + {a.val_per_class} val) images of "
          f"{a.image_size} px to {a.data_dir}")
    return a.data_dir


if __name__ == "__main__":
    engine.run_cli(main)
