"""tools/make_zip_dataset.py: folder -> ImageNet-Zip round trip, verification, CLI errors."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from contrast.data import ImageFolderInstance, ZipImageDataset
from tests.synthetic import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import make_zip_dataset  # noqa: E402


@pytest.fixture
def folder(tmp_path) -> str:
    return make_image_folder(str(tmp_path / "folder"), num_classes=3, per_class=3)


def test_round_trip(folder, tmp_path, capsys):
    dst = str(tmp_path / "zip")
    assert make_zip_dataset.main(["--src", folder, "--dst", dst]) == 0
    assert f"train: indexed ({dst}/train_map.idx), verified (decode)" in capsys.readouterr().out
    assert sorted(os.listdir(dst)) == ["train.zip", "train_map.idx", "train_map.txt", "val.zip", "val_map.idx",
                                       "val_map.txt"]
    for split in ("train", "val"):
        a, b = ImageFolderInstance(folder, split), ZipImageDataset(dst, split)
        assert len(a) == len(b) == 9 and b.prefix == ""
        for i in range(len(a)):
            (img_a, ia, la), (img_b, ib, lb) = a[i], b[i]
            assert (ia, la) == (ib, lb)
            np.testing.assert_array_equal(np.asarray(img_a), np.asarray(img_b))
    with open(os.path.join(dst, "train_map.txt")) as f:
        assert f.readline() == "class_0/img_0.png\t0\n"
    with zipfile.ZipFile(os.path.join(dst, "train.zip")) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}  # png and jpg are stored


@pytest.mark.parametrize("shard_size", [1, 2, 4, 9, 100])
def test_sharded_round_trip(folder, tmp_path, capsys, shard_size):
    dst = str(tmp_path / "zip")
    assert make_zip_dataset.main(["--src", folder, "--dst", dst, "--shard-size", str(shard_size),
                                  "--verify", "crc"]) == 0
    shards = -(-9 // shard_size)
    assert f"train: wrote 9 images to {shards} shards train-*.zip" in capsys.readouterr().out
    names = sorted(os.listdir(dst))
    assert names == sorted([f"{s}-{k:05d}.zip" for s in ("train", "val") for k in range(shards)]
                           + ["train_map.txt", "train_map.idx", "val_map.txt", "val_map.idx"])
    with open(os.path.join(dst, "train_map.txt")) as f:
        lines = f.read().splitlines()
    assert lines[0] == "train-00000.zip/class_0/img_0.png\t0"
    assert lines[-1] == f"train-{shards - 1:05d}.zip/class_2/img_2.png\t2"
    for k in range(shards):  # shard k holds images k*size ... in the folder's order
        with zipfile.ZipFile(os.path.join(dst, f"train-{k:05d}.zip")) as zf:
            assert zf.namelist() == [line.split("\t")[0].split("/", 1)[1]
                                     for line in lines[k * shard_size:(k + 1) * shard_size]]
    for split in ("train", "val"):
        a, b = ImageFolderInstance(folder, split), ZipImageDataset(dst, split)
        assert len(b) == 9 and len(b.shards) == shards and b.prefix == ""
        for i in range(len(a)):
            (img_a, ia, la), (img_b, ib, lb) = a[i], b[i]
            assert (ia, la) == (ib, lb)
            np.testing.assert_array_equal(np.asarray(img_a), np.asarray(img_b))
    # switching layouts with --overwrite leaves no file of the old one behind
    assert make_zip_dataset.main(["--src", folder, "--dst", dst, "--overwrite", "--verify", "none"]) == 0
    assert sorted(os.listdir(dst)) == ["train.zip", "train_map.idx", "train_map.txt", "val.zip", "val_map.idx",
                                       "val_map.txt"]


def test_bad_shard_size(folder, tmp_path):
    with pytest.raises(SystemExit):
        make_zip_dataset.main(["--src", folder, "--dst", str(tmp_path / "zip"), "--shard-size", "0"])


def test_refuses_to_overwrite(folder, tmp_path, capsys):
    dst = str(tmp_path / "zip")
    assert make_zip_dataset.main(["--src", folder, "--dst", dst, "--splits", "train", "--verify", "crc"]) == 0
    assert make_zip_dataset.main(["--src", folder, "--dst", dst, "--splits", "train"]) == 1
    assert f"error: {dst}/train.zip: exists (pass --overwrite to replace it)" in capsys.readouterr().err
    assert make_zip_dataset.main(["--src", folder, "--dst", dst, "--splits", "train", "--overwrite"]) == 0


def test_corrupt_source_fails_verification(folder, tmp_path, capsys):
    with open(os.path.join(folder, "val", "class_2", "img_1.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 truncated")
    dst = str(tmp_path / "zip")
    assert make_zip_dataset.main(["--src", folder, "--dst", dst]) == 1
    err = capsys.readouterr().err
    assert f"error: {dst}/val.zip:class_2/img_1.jpg: verification failed (OSError" in err


def test_missing_source(tmp_path, capsys):
    missing = str(tmp_path / "nothing")
    assert make_zip_dataset.main(["--src", missing, "--dst", str(tmp_path / "zip")]) == 1
    assert f"error: {missing}: dataset root does not exist or is not a folder" in capsys.readouterr().err
    assert not [f for f in os.listdir(tmp_path / "zip") if f.endswith(".tmp")]


def test_cli_help():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_zip_dataset.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--src" in out.stdout and "--verify" in out.stdout
