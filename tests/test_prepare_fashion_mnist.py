"""tools/prepare_fashion_mnist.py on tiny IDX files written by hand."""
import gzip
import importlib.util
import os
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from contrast.data import build_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "prepare_fashion_mnist.py")
_spec = importlib.util.spec_from_file_location("prepare_fashion_mnist", TOOL)
prep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prep)


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX: 0x0000, type 0x08 (ubyte), ndim, big-endian uint32 sizes, row-major data."""
    return struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write(path, data: bytes):
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


@pytest.fixture
def src(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "src"
    d.mkdir()
    train_x = rng.integers(0, 256, size=(12, 5, 4), dtype=np.uint8)   # H != W catches transposes
    train_y = np.array([3, 0, 1, 2, 4, 5, 6, 7, 8, 9, 3, 0], dtype=np.uint8)
    val_x = rng.integers(0, 256, size=(4, 5, 4), dtype=np.uint8)
    val_y = np.array([9, 1, 1, 0], dtype=np.uint8)
    write(d / "train-images-idx3-ubyte", idx_bytes(train_x))
    write(d / "train-labels-idx1-ubyte", idx_bytes(train_y))
    write(d / "t10k-images-idx3-ubyte.gz", idx_bytes(val_x))
    write(d / "t10k-labels-idx1-ubyte.gz", idx_bytes(val_y))
    return d, {"train": (train_x, train_y), "val": (val_x, val_y)}


def test_both_layouts_pixels_labels_and_readers(src, tmp_path):
    d, data = src
    out = tmp_path / "fm"
    assert prep.main(["--src", str(d), "--out", str(out), "--layout", "both"]) == {"train": 12, "val": 4}
    names = ["0_tshirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat", "5_sandal", "6_shirt", "7_sneaker",
             "8_bag", "9_ankle_boot"]
    for split, (x, y) in data.items():
        lines = (out / f"{split}_map.txt").read_text().splitlines()
        assert lines == [f"{names[label]}/{i:05d}.png\t{label}" for i, label in enumerate(y)]
        with zipfile.ZipFile(out / f"{split}.zip") as zf:
            assert sorted(zf.namelist()) == sorted(line.split("\t")[0] for line in lines)
            for i, label in enumerate(y):
                rel = f"{names[label]}/{i:05d}.png"
                with zf.open(rel) as f:
                    np.testing.assert_array_equal(np.array(Image.open(f)), x[i])
                np.testing.assert_array_equal(np.array(Image.open(out / split / rel)), x[i])
        # the project's readers agree on every (image, label)
        for zip_mode in (False, True):
            ds = build_dataset(str(out), split, zip_mode, "no", None)
            assert len(ds) == len(y)
            seen = sorted((np.asarray(ds[i][0].convert("L")).tobytes(), ds[i][2]) for i in range(len(ds)))
            assert seen == sorted((x[i].tobytes(), int(y[i])) for i in range(len(y)))


def test_index_class_names_and_limits(src, tmp_path):
    d, data = src
    out = tmp_path / "fm"
    prep.main(["--src", str(d), "--out", str(out), "--layout", "zip", "--class-names", "index", "--limit-val", "2"])
    assert (out / "val_map.txt").read_text() == "9/00000.png\t9\n1/00001.png\t1\n"
    assert not (out / "train").exists() and (out / "train.zip").is_file()
    with pytest.raises(ValueError, match="lacks classes"):  # folder labels would shift
        prep.main(["--src", str(d), "--out", str(tmp_path / "f2"), "--layout", "folder", "--limit-train", "5"])


def test_val_from_train_is_the_tail_of_the_training_images_never_the_test_set(src, tmp_path):
    d, data = src
    out = tmp_path / "tune"
    counts = prep.main(["--src", str(d), "--out", str(out), "--layout", "zip", "--class-names", "index",
                        "--val-from-train", "3", "--limit-train", "4"])
    assert counts == {"train": 4, "val": 3}
    (x, y), (test_x, _) = data["train"], data["val"]
    assert (out / "val_map.txt").read_text() == "".join(f"{label}/{i:05d}.png\t{label}\n" for i, label in enumerate(y[9:]))
    with zipfile.ZipFile(out / "val.zip") as zf:
        for i, label in enumerate(y[9:]):
            with zf.open(f"{label}/{i:05d}.png") as f:
                np.testing.assert_array_equal(np.array(Image.open(f)), x[9 + i])
    assert (out / "train_map.txt").read_text().splitlines()[0] == f"{y[0]}/00000.png\t{y[0]}"
    with pytest.raises(ValueError, match="only 12 images"):
        prep.main(["--src", str(d), "--out", str(tmp_path / "t2"), "--val-from-train", "12"])


@pytest.mark.parametrize("name,data,message", [
    ("train-images-idx3-ubyte", b"\x00\x00\x09\x03" + b"\x00" * 20, "bad IDX magic"),
    ("train-images-idx3-ubyte", idx_bytes(np.zeros((12, 5, 4), np.uint8))[:-3], "data bytes"),
    ("train-images-idx3-ubyte", b"\x00\x00\x08\x03\x00\x00", "truncated header"),
    ("train-labels-idx1-ubyte", idx_bytes(np.zeros(11, np.uint8)), "12 images but"),
    ("train-labels-idx1-ubyte", idx_bytes(np.full(12, 10, np.uint8)), "out of range"),
    ("train-labels-idx1-ubyte", idx_bytes(np.zeros((12, 1), np.uint8)), "expected 1 dimension"),
])
def test_malformed_idx_errors_name_the_file(src, tmp_path, name, data, message):
    d, _ = src
    write(d / name, data)
    with pytest.raises(prep.IDXError, match=message) as err:
        prep.main(["--src", str(d), "--out", str(tmp_path / "fm")])
    assert name in str(err.value)


def test_cli_error_exit(src, tmp_path):
    d, _ = src
    write(d / "t10k-labels-idx1-ubyte.gz", b"garbage")   # not gzip at all
    run = subprocess.run([sys.executable, TOOL, "--src", str(d), "--out", str(tmp_path / "fm")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "t10k-labels-idx1-ubyte.gz" in run.stderr and "Traceback" not in run.stderr
