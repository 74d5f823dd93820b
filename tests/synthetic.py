"""Tiny synthetic image datasets that tests build for themselves (no downloads)."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image


def random_image(rng: np.random.Generator, size=(40, 48), label: int = 0) -> Image.Image:
    """An RGB image whose mean colour depends on ``label`` plus noise, so classes are learnable."""
    h, w = size
    base = np.array([(label * 70) % 256, (label * 130 + 60) % 256, (label * 200 + 120) % 256], dtype=np.float32)
    img = base + rng.normal(0, 40, size=(h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")


def make_image_folder(root: str, num_classes: int = 3, per_class: int = 4, size=(40, 48),
                      splits: Sequence[str] = ("train", "val"), formats: Sequence[str] = ("png", "jpg"),
                      seed: int = 0) -> str:
    """Write ``root/<split>/class_<c>/img_<i>.<fmt>`` (formats alternate) and return ``root``."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(num_classes):
            d = os.path.join(root, split, f"class_{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                fmt = formats[i % len(formats)]
                random_image(rng, size, c).save(os.path.join(d, f"img_{i}.{fmt}"),
                                                format="JPEG" if fmt in ("jpg", "jpeg") else fmt.upper())
    return root
