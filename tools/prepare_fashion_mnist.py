"""Turn the Fashion-MNIST IDX files into the folder and/or ImageNet-Zip dataset layouts.

Input (``--src``, default the Debian package ``dataset-fashion-mnist``'s
``/usr/share/datasets/fashion-mnist``): ``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``,
each optionally gzipped (``.gz``). The IDX format (LeCun et al.): big-endian
magic ``0x0000 08 <ndim>`` (``08`` = unsigned byte), ``ndim`` uint32 sizes, then
the row-major data.

Output in ``--data-dir`` (``--out``: alias; ``train`` from the 60k training images, ``val`` from the 10k
test images), grayscale PNG files ``<class>/<index:05d>.png``:

* ``--layout folder``: ``<data-dir>/train/<class>/...``, ``<data-dir>/val/<class>/...``
* ``--layout zip``: ``<data-dir>/train.zip`` + ``<data-dir>/train_map.txt`` (``<class>/<file><TAB><label>``),
  ``<data-dir>/val.zip`` + ``<data-dir>/val_map.txt``
* ``--layout both``: both, in the same root (each reader takes its own files).

``--class-names fmnist`` names the class folders ``<label>_<name>`` (e.g.
``0_tshirt_top``; the label prefix keeps the sorted folder order equal to the label
order, which the folder reader relies on), ``--class-names index`` names them ``0..9``.
``--limit-train`` / ``--limit-val`` keep only the first images (quick experiments).
``--val-from-train N`` makes ``val`` the last N of the 60k training images instead of the test images
(and ``train`` the others): a validation split to tune recipes on without looking at the test set.

Usage::

    python tools/prepare_fashion_mnist.py --data-dir data/fmnist --layout zip
"""
from __future__ import annotations

import argparse
import gzip
import io
import os
import struct
import sys
import zipfile
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from contrast import engine  # noqa: E402
from contrast.logger import Progress  # noqa: E402
from contrast.option import add_dataset_output_flag, add_debug_flag, new_parser  # noqa: E402


def prepare_fashion_mnist_parser(doc: str = "", default_src: str = "") -> argparse.ArgumentParser:
    p = new_parser("prepare_fashion_mnist.py", doc)
    p.add_argument("--src", default=default_src, help="folder with the four IDX files (.gz or not)")
    add_dataset_output_flag(p)
    p.add_argument("--layout", choices=["folder", "zip", "both"], default="both", help="output layout(s)")
    p.add_argument("--class-names", choices=["fmnist", "index"], default="fmnist",
                   help="class folder names: '<label>_<fmnist name>' or the label")
    p.add_argument("--limit-train", type=int, default=0, help="keep only the first N training images (0 = all)")
    p.add_argument("--limit-val", type=int, default=0, help="keep only the first N val images (0 = all)")
    p.add_argument("--val-from-train", type=int, default=0, metavar="N",
                   help="val = the last N training images (a tuning split), not the test images")
    add_debug_flag(p)
    return p


DEFAULT_SRC = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                  "ankle_boot")
SPLITS = {"train": "train", "val": "t10k"}  # output split -> IDX file prefix


class IDXError(ValueError):
    """A malformed IDX file; the message names it."""


def find_idx(src: str, stem: str) -> str:
    """``<src>/<stem>`` or ``<src>/<stem>.gz``, whichever exists."""
    for name in (stem, stem + ".gz"):
        path = os.path.join(src, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"--src {src}: neither {stem} nor {stem}.gz found")


def read_idx(path: str) -> np.ndarray:
    """Read an unsigned-byte IDX file (optionally gzipped) into a uint8 array of its shape."""
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise IDXError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e
    if len(data) < 4:
        raise IDXError(f"{path}: {len(data)} bytes, too short for an IDX header")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08 or ndim < 1:
        raise IDXError(f"{path}: bad IDX magic {data[:4].hex()} (expected 000008<ndim> for unsigned bytes)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXError(f"{path}: truncated header ({len(data)} bytes, {ndim} dimensions need {header})")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != expected:
        raise IDXError(f"{path}: {len(data) - header} data bytes, but the header's shape {shape} needs {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_split(src: str, prefix: str, num_classes: int = 10) -> Tuple[np.ndarray, np.ndarray]:
    """``(images (N, H, W) uint8, labels (N,) int64)`` of ``<prefix>-images-idx3-ubyte`` and labels."""
    img_path, lab_path = find_idx(src, f"{prefix}-images-idx3-ubyte"), find_idx(src, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3:
        raise IDXError(f"{img_path}: expected 3 dimensions (N, H, W), got shape {images.shape}")
    if labels.ndim != 1:
        raise IDXError(f"{lab_path}: expected 1 dimension (N,), got shape {labels.shape}")
    if len(images) != len(labels):
        raise IDXError(f"{img_path} holds {len(images)} images but {lab_path} {len(labels)} labels")
    if labels.size and labels.max() >= num_classes:
        raise IDXError(f"{lab_path}: label {int(labels.max())} is out of range [0, {num_classes})")
    return images, labels.astype(np.int64)


def class_folders(style: str) -> List[str]:
    if style == "fmnist":
        return [f"{i}_{name}" for i, name in enumerate(FMNIST_CLASSES)]
    return [str(i) for i in range(len(FMNIST_CLASSES))]


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_split(out: str, split: str, images: np.ndarray, labels: np.ndarray, classes: List[str],
                layouts: Tuple[str, ...]) -> int:
    """Write one split in the requested layouts; returns the number of images."""
    entries = [(f"{classes[y]}/{i:05d}.png", int(y)) for i, y in enumerate(labels)]
    missing = sorted(set(range(len(classes))) - set(labels.tolist()))
    if "folder" in layouts and split == "train" and missing:
        raise ValueError(f"train split lacks classes {missing}: the folder layout numbers classes by their "
                         f"folders, so labels would shift (raise --limit-train or use --layout zip)")
    zf = None
    if "zip" in layouts:
        os.makedirs(out, exist_ok=True)
        zf = zipfile.ZipFile(os.path.join(out, f"{split}.zip") + ".tmp", "w", compression=zipfile.ZIP_STORED)
    try:
        if "folder" in layouts:
            for c in sorted(set(labels.tolist())):
                os.makedirs(os.path.join(out, split, classes[c]), exist_ok=True)
        with Progress(f"fmnist {split}", total=len(entries), unit="img") as bar:
            for (rel, _), image in zip(entries, images):
                data = png_bytes(image)
                if "folder" in layouts:
                    with open(os.path.join(out, split, rel), "wb") as f:
                        f.write(data)
                if zf is not None:
                    zf.writestr(rel, data)
                bar.update()
    finally:
        if zf is not None:
            zf.close()
    if zf is not None:
        os.replace(os.path.join(out, f"{split}.zip") + ".tmp", os.path.join(out, f"{split}.zip"))
        with open(os.path.join(out, f"{split}_map.txt"), "w") as f:
            f.writelines(f"{rel}\t{y}\n" for rel, y in entries)
    return len(entries)


def parse_args(argv: Optional[List[str]] = None):
    p = prepare_fashion_mnist_parser(__doc__, DEFAULT_SRC)
    args = p.parse_args(argv)
    if args.limit_train < 0 or args.limit_val < 0 or args.val_from_train < 0:
        p.error("--limit-train, --limit-val and --val-from-train must be >= 0")
    if not os.path.isdir(args.src):
        p.error(f"--src {args.src}: folder does not exist (install the Debian package dataset-fashion-mnist "
                f"or point --src at the IDX files)")
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, int]:
    args = parse_args(argv)
    layouts = ("folder", "zip") if args.layout == "both" else (args.layout,)
    classes = class_folders(args.class_names)
    limits = {"train": args.limit_train, "val": args.limit_val}
    counts = {}
    splits = {split: load_split(args.src, prefix, len(classes)) for split, prefix in SPLITS.items()}
    if args.val_from_train:
        images, labels = splits["train"]
        if args.val_from_train >= len(images):
            raise ValueError(f"--val-from-train {args.val_from_train}: the training split has only {len(images)} images")
        cut = len(images) - args.val_from_train
        splits = {"train": (images[:cut], labels[:cut]), "val": (images[cut:], labels[cut:])}
    for split, (images, labels) in splits.items():
        if limits[split]:
            images, labels = images[:limits[split]], labels[:limits[split]]
        counts[split] = write_split(args.data_dir, split, images, labels, classes, layouts)
        print(f"[fmnist] {split}: {counts[split]} images of {images.shape[1]}x{images.shape[2]} -> "
              f"{args.data_dir} ({', '.join(layouts)})", flush=True)
    return counts


if __name__ == "__main__":
    engine.run_cli(main)
