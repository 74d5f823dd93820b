"""16-bit and other high-bit-depth images become 8-bit RGB by the range of their type (not clipped),
through every decode path: dataset load_image (folder and zip), the fast and the plain transforms."""
from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from contrast.data import build_dataset
from contrast.data.transforms import build_augmentation, to_rgb
from contrast.data import batched_ops as B

RNG = np.random.default_rng(0)
GRAY16 = RNG.integers(0, 65536, (12, 10)).astype(np.uint16)
RGB16 = RNG.integers(0, 65536, (12, 10, 3)).astype(np.uint16)


def _png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (colour type 0 grey or 2 RGB), big-endian samples."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", w, h, 16, 2 if arr.ndim == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _saved(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _expected8(v: np.ndarray) -> np.ndarray:
    return np.array([[round(int(x) / 257) for x in row] for row in v], dtype=np.uint8)


def _rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(to_rgb(img))


GRAY_FILES = {
    "png I;16": _png16(GRAY16),
    "tiff I;16": _saved(Image.frombytes("I;16", (10, 12), GRAY16.astype("<u2").tobytes()), "TIFF"),
    "tiff I;16B": _saved(Image.frombytes("I;16B", (10, 12), GRAY16.astype(">u2").tobytes()), "TIFF"),
}


@pytest.mark.parametrize("name", list(GRAY_FILES))
def test_16bit_grayscale_files(name):
    with Image.open(io.BytesIO(GRAY_FILES[name])) as img:
        assert img.mode.startswith("I;16")  # as Pillow opens them
        assert (np.asarray(img.convert("RGB")) == 255).mean() > 0.9  # what convert() alone does: clipped
    out = _rgb(GRAY_FILES[name])
    assert out.shape == (12, 10, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], _expected8(GRAY16))


def test_16bit_rgb_png_as_pillow_opens_it():
    out = _rgb(_png16(RGB16))  # Pillow keeps the high byte of each sample when it opens the file
    np.testing.assert_array_equal(out, (RGB16 >> 8).astype(np.uint8))
    assert np.abs(out.astype(int) - np.round(RGB16 / 257)).max() <= 1


def test_int_and_float_modes():
    def gray(values):
        img = Image.fromarray(values)
        out = np.asarray(to_rgb(img))
        assert (out[..., 0] == out[..., 2]).all()
        return img.mode, out[..., 0]

    mode, out = gray(GRAY16.astype(np.int32))  # 16-bit data held in mode I (older Pillow PNGs)
    assert mode == "I"
    np.testing.assert_array_equal(out, _expected8(GRAY16))
    big = GRAY16.astype(np.int64) * 30000  # beyond 16 bits: the int32 range, not clipped
    mode, out = gray(big.astype(np.int32))
    np.testing.assert_array_equal(out, [[round(int(v) * 255 / (2 ** 31 - 1)) for v in row] for row in big])
    unit = GRAY16.astype(np.float32) / 65535  # float in [0, 1]
    mode, out = gray(unit)
    assert mode == "F"
    np.testing.assert_array_equal(out, [[round(float(v) * 255) for v in row] for row in unit])


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "L", "CMYK", "1"])
def test_other_modes_as_before(mode):
    img = Image.fromarray(RNG.integers(0, 256, (12, 10, 3)).astype(np.uint8)).convert(mode)
    np.testing.assert_array_equal(np.asarray(to_rgb(img)), np.asarray(img.convert("RGB")))


def test_every_decode_path(tmp_path):
    value = 40000  # a constant 16-bit image: every crop, resize and flip keeps round(v / 257) = 156
    flat = np.full((40, 48), value, dtype=np.uint16)
    want = round(value / 257)
    root = tmp_path / "d"
    (root / "train" / "c").mkdir(parents=True)
    (root / "train" / "c" / "a.png").write_bytes(_png16(flat))
    with zipfile.ZipFile(root / "train.zip", "w") as zf:
        zf.writestr("c/a.png", _png16(flat))
    (root / "train_map.txt").write_text("c/a.png\t0\n")
    for zip_mode in (False, True):
        ds = build_dataset(str(root), "train", zip_mode, "no", None)
        assert np.asarray(ds.load_image(0)).min() == np.asarray(ds.load_image(0)).max() == want
        assert np.asarray(ds[0][0]).max() == want
    for name in ("SimCLR", "MultiCrop", "val", "NULL"):
        fast = build_augmentation(name, num_views=2, image_size=24, image_size2=12, fast=True).cpu
        views = build_dataset(str(root), "train", True, "no", fast)[0][0]
        assert all(v.dtype == torch.uint8 and v.min() == v.max() == want for v in views)
    plain = build_augmentation("NULL", image_size=24, fast=False).cpu
    (view,) = build_dataset(str(root), "train", False, "no", plain)[0][0]
    mean, std = torch.tensor(B.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(B.IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(view, ((torch.full((3, 24, 24), want / 255.0) - mean) / std).expand_as(view))
