"""Folder and ImageNet-Zip datasets: items, cache modes, worker safety, bad input, corrupt images."""
from __future__ import annotations

import multiprocessing
import os
import re
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from contrast.data import (DatasetError, ImageFolderInstance, ZipImageDataset, build_dataset, build_sampler)
from tests.synthetic import make_image_folder


def _pixels(path_or_file) -> np.ndarray:
    with Image.open(path_or_file) as img:
        return np.asarray(img.convert("RGB"))


def _to_array(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy())


def _reference_folder(root: str, split: str):
    """(absolute path, label) for every image, listed by hand from the folder tree."""
    classes = sorted(os.listdir(os.path.join(root, "train")))
    out = []
    for c in sorted(os.listdir(os.path.join(root, split))):
        for f in sorted(os.listdir(os.path.join(root, split, c))):
            out.append((os.path.join(root, split, c, f), classes.index(c)))
    return out


def _write_zip_layout(root: str, folder: str, prefix: str = "", splits=("train", "val")) -> str:
    """Write ImageNet-Zip files of ``folder`` by hand (entries under ``prefix``, corrupt files kept)."""
    os.makedirs(root, exist_ok=True)
    for split in splits:
        with zipfile.ZipFile(os.path.join(root, f"{split}.zip"), "w") as zf, \
                open(os.path.join(root, f"{split}_map.txt"), "w") as mf:
            for path, label in _reference_folder(folder, split):
                rel = os.path.relpath(path, os.path.join(folder, split)).replace(os.sep, "/")
                zf.write(path, prefix + rel)
                mf.write(f"{rel}\t{label}\n")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return make_image_folder(str(tmp_path_factory.mktemp("folder")), num_classes=3, per_class=4)


def _check_items(ds, reference) -> None:
    assert len(ds) == len(reference)
    for i, (path, label) in enumerate(reference):
        sample, index, target = ds[i]
        assert index == i and target == label and isinstance(target, int)
        np.testing.assert_array_equal(np.asarray(sample), _pixels(path))


@pytest.mark.parametrize("split", ["train", "val"])
def test_folder_dataset_items(folder, split):
    ds = build_dataset(folder, split, zip_mode=False, cache_mode="no", transform=None)
    assert isinstance(ds, ImageFolderInstance) and ds.classes == ["class_0", "class_1", "class_2"]
    _check_items(ds, _reference_folder(folder, split))


@pytest.mark.parametrize("prefix", ["", "train_root/"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_zip_dataset_items(folder, tmp_path, prefix, split):
    root = _write_zip_layout(str(tmp_path / "z"), folder, prefix=prefix.replace("train_root", split))
    ds = build_dataset(root, split, zip_mode=True, cache_mode="no", transform=None)
    assert isinstance(ds, ZipImageDataset) and ds.prefix == prefix.replace("train_root", split)
    assert ds.num_classes == 3
    _check_items(ds, _reference_folder(folder, split))


def test_transform_may_return_views(folder):
    ds = build_dataset(folder, "train", False, "no", transform=lambda img: [img.size, img.mode])
    assert ds[3][0] == [(48, 40), "RGB"]


def test_val_labels_follow_train_classes(tmp_path):
    root = make_image_folder(str(tmp_path), num_classes=3, per_class=2)
    os.rename(os.path.join(root, "val", "class_0"), str(tmp_path / "moved"))
    ds = ImageFolderInstance(root, "val")
    assert ds.targets == [1, 1, 2, 2]


@pytest.mark.parametrize("zip_mode", [False, True])
def test_full_cache_serves_from_ram(folder, tmp_path, zip_mode):
    src = make_image_folder(str(tmp_path / "f"), num_classes=2, per_class=3)
    root = _write_zip_layout(str(tmp_path / "z"), src) if zip_mode else src
    reference = [_pixels(p) for p, _ in _reference_folder(src, "train")]
    ds = build_dataset(root, "train", zip_mode, "full", transform=None)
    assert ds.local_indices is None
    for name in os.listdir(root):  # storage gone: every read must come from the cache
        if name.endswith(".zip"):
            os.remove(os.path.join(root, name))
    if not zip_mode:
        for path, _ in _reference_folder(src, "train"):
            os.remove(path)
    for i in range(len(ds)):
        np.testing.assert_array_equal(np.asarray(ds[i][0]), reference[i])
    assert ds.num_corrupt == 0


@pytest.mark.parametrize("zip_mode", [False, True])
def test_part_cache_world2(tmp_path, zip_mode):
    src = make_image_folder(str(tmp_path / "f"), num_classes=1, per_class=5, splits=("train",))
    ref = _reference_folder(src, "train")
    root = _write_zip_layout(str(tmp_path / "z"), src, splits=("train",)) if zip_mode else src
    expected = [_pixels(path) for path, _ in ref]
    probe = build_dataset(root, "train", zip_mode, "part", None, rank=0, world_size=2)
    for i in range(5):  # a non-local index is still served, read from storage
        np.testing.assert_array_equal(np.asarray(probe[i][0]), expected[i])
    shards = [build_dataset(root, "train", zip_mode, "part", None, rank=r, world_size=2, strict=True)
              for r in range(2)]
    assert shards[0].local_indices.tolist() == [0, 2, 4]
    assert shards[1].local_indices.tolist() == [1, 3, 0]  # padded to equal length by wrapping
    for path, _ in ref:  # storage gone: local indices still come from RAM, others are unreadable
        os.remove(path)
    if zip_mode:
        os.remove(os.path.join(root, "train.zip"))
    for r, ds in enumerate(shards):
        for i in ds.local_indices.tolist():
            img, index, _ = ds[i]
            assert index == i
            np.testing.assert_array_equal(np.asarray(img), expected[i])
        other = 1 if r == 0 else 2
        name = "train.zip" if zip_mode else os.path.basename(ref[other][0])
        with pytest.raises(DatasetError, match=re.escape(name)):
            ds[other]


def test_part_cache_dataset_smaller_than_world(tmp_path):
    root = make_image_folder(str(tmp_path), num_classes=1, per_class=1, splits=("train",))
    expected = _pixels(_reference_folder(root, "train")[0][0])
    for r in range(4):
        ds = build_dataset(root, "train", False, "part", None, rank=r, world_size=4)
        assert ds.local_indices.tolist() == [0]
        sampler = build_sampler(ds, sliding_window=True, window_size=8, window_stride=4, seed=0,
                                shuffle_per_epoch=False, num_replicas=4, rank=r)
        assert list(sampler) == [0]
        img, index, label = ds[next(iter(sampler))]
        assert (index, label) == (0, 0)
        np.testing.assert_array_equal(np.asarray(img), expected)


@pytest.mark.parametrize("sliding", [False, True])
def test_part_cache_sampler_draws_local_shard(folder, sliding):
    n = 12
    seen = []
    for r in range(2):
        ds = build_dataset(folder, "train", False, "part", None, rank=r, world_size=2)
        sampler = build_sampler(ds, sliding_window=sliding, window_size=8, window_stride=2, seed=1,
                                shuffle_per_epoch=False, num_replicas=2, rank=r)
        for e in range(6):
            sampler.set_epoch(e)
            idx = list(sampler)
            assert len(idx) == (4 if sliding else 6)
            assert set(idx) <= set(ds.local_indices.tolist())
            seen += idx
    assert set(seen) == set(range(n))


def test_zip_dataloader_workers_read_correct_bytes(tmp_path):
    src = make_image_folder(str(tmp_path / "f"), num_classes=2, per_class=16, size=(96, 96), splits=("train",))
    ref = _reference_folder(src, "train")
    expected = [_pixels(path) for path, _ in ref]
    ds = ZipImageDataset(_write_zip_layout(str(tmp_path / "z"), src, splits=("train",)), "train", transform=_to_array)
    ds[0]  # open a descriptor in the parent first: workers inherit it (safe: pread has no shared offset)
    assert ds._fds
    loader = DataLoader(ds, batch_size=1, num_workers=2, multiprocessing_context="fork")
    for _ in range(3):
        items = [(img[0].numpy(), int(i), int(lab)) for img, i, lab in loader]
        assert [i for _, i, _ in items] == list(range(len(ref)))  # no item replaced by the corrupt policy
        for (img, i, lab), want, (_, label) in zip(items, expected, ref):
            np.testing.assert_array_equal(img, want)
            assert lab == label
    assert ds.num_corrupt == 0


def _read_all_in_child(ds, queue) -> None:
    inherited = dict(ds._fds)
    queue.put(([ds.read_bytes(i) for i in range(len(ds))], inherited == ds._fds))


def test_zip_reads_in_forked_child_with_inherited_descriptor(folder, tmp_path):
    root = _write_zip_layout(str(tmp_path / "z"), folder)
    ds = ZipImageDataset(root, "train")
    ds[0]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_all_in_child, args=(ds, queue))
    child.start()
    data, reused = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0 and reused
    with zipfile.ZipFile(os.path.join(root, "train.zip")) as zf:
        assert data == [zf.read(p) for p, _ in _map_lines(os.path.join(root, "train_map.txt"))]
    assert [ds.read_bytes(i) for i in range(len(ds))] == data  # the parent's descriptor still reads right


def _map_lines(path):
    with open(path) as f:
        return [(line.split("\t")[0], int(line.split("\t")[1])) for line in f if line.strip()]


# -- bad input ------------------------------------------------------------------------------------


def test_missing_root(tmp_path):
    missing = str(tmp_path / "nope")
    for zip_mode in (False, True):
        with pytest.raises(DatasetError, match=re.escape(f"{missing}: dataset root does not exist")):
            build_dataset(missing, "train", zip_mode, "no", None)


def test_no_images(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetError, match=re.escape(f"{tmp_path / 'train'}: no class folders found")):
        build_dataset(str(tmp_path), "train", False, "no", None)


def test_missing_split_folder(tmp_path):
    with pytest.raises(DatasetError, match=re.escape(f"{tmp_path / 'val'}: split folder does not exist")):
        build_dataset(str(tmp_path), "val", False, "no", None)


def test_class_folder_without_images(tmp_path):
    root = make_image_folder(str(tmp_path), num_classes=2, per_class=2, splits=("train",))
    empty = tmp_path / "train" / "class_9"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=re.escape(f"{empty}: class folder contains no images")):
        build_dataset(root, "train", False, "no", None)


def test_val_class_unknown_to_train(tmp_path):
    root = make_image_folder(str(tmp_path), num_classes=2, per_class=1)
    os.rename(os.path.join(root, "val", "class_1"), os.path.join(root, "val", "class_x"))
    with pytest.raises(DatasetError, match=re.escape(f"{tmp_path / 'val' / 'class_x'}: class 'class_x' does not")):
        build_dataset(root, "val", False, "no", None)


def _zip_root(tmp_path, folder, map_text: str, split: str = "train") -> str:
    root = _write_zip_layout(str(tmp_path / "z"), folder)
    with open(os.path.join(root, f"{split}_map.txt"), "w") as f:
        f.write(map_text)
    return root


@pytest.mark.parametrize("line", ["class_0/img_0.png 0", "class_0/img_0.png\tzero", "class_0/img_0.png",
                                  "class_0/img_0.png\t0\textra", "\t0"])
def test_bad_map_line(tmp_path, folder, line):
    root = _zip_root(tmp_path, folder, f"class_0/img_1.jpg\t0\n{line}\n")
    map_path = os.path.join(root, "train_map.txt")
    with pytest.raises(DatasetError, match=re.escape(f"{map_path}:2: expected '<relative path><TAB><integer label>', "
                                                     f"got {line!r}")):
        build_dataset(root, "train", True, "no", None)


def test_negative_label(tmp_path, folder):
    root = _zip_root(tmp_path, folder, "class_0/img_1.jpg\t0\nclass_0/img_0.png\t-1\n")
    with pytest.raises(DatasetError, match=re.escape(f"{root}/train_map.txt:2: negative label -1")):
        build_dataset(root, "train", True, "no", None)


def test_val_label_out_of_range(tmp_path, folder):
    root = _zip_root(tmp_path, folder, "class_1/img_0.png\t1\nclass_2/img_1.jpg\t3\n", split="val")
    with pytest.raises(DatasetError, match=re.escape(f"{root}/val_map.txt: label 3 of 'class_2/img_1.jpg' is out of "
                                                     f"range [0, 3)")):
        build_dataset(root, "val", True, "no", None)


def test_map_entry_missing_from_zip(tmp_path, folder):
    root = _zip_root(tmp_path, folder, "class_0/img_0.png\t0\nclass_0/ghost.jpg\t0\n")
    with pytest.raises(DatasetError, match=re.escape(f"{root}/train.zip: 1 entries of {root}/train_map.txt are missing "
                                                     f"from the zip (entry prefix ''), first: 'class_0/ghost.jpg'")):
        build_dataset(root, "train", True, "no", None)
    root = _zip_root(tmp_path, folder, "ghost/first.jpg\t0\n")
    with pytest.raises(DatasetError, match=re.escape(f"{root}/train.zip: entry 'ghost/first.jpg' (first line of "
                                                     f"{root}/train_map.txt) is missing from the zip")):
        build_dataset(root, "train", True, "no", None)


def test_missing_map_and_zip(tmp_path, folder):
    root = _write_zip_layout(str(tmp_path / "z"), folder)
    os.remove(os.path.join(root, "train.zip"))
    with pytest.raises(DatasetError, match=re.escape(f"{root}/train.zip: zip file does not exist")):
        build_dataset(root, "train", True, "no", None)
    os.remove(os.path.join(root, "train_map.txt"))
    with pytest.raises(DatasetError, match=re.escape(f"{root}/train_map.txt: map file does not exist")):
        build_dataset(root, "val", True, "no", None)  # val needs the train map for num_classes


def test_bad_cache_mode(folder):
    with pytest.raises(ValueError, match="--cache-mode must be one of"):
        build_dataset(folder, "train", False, "some", None)


# -- corrupt images ---------------------------------------------------------------------------------


def _corrupt_folder(tmp_path):
    """Five images of one class; img_1.jpg truncated, img_2.png garbage."""
    root = make_image_folder(str(tmp_path / "f"), num_classes=1, per_class=5, splits=("train",))
    d = os.path.join(root, "train", "class_0")
    with open(os.path.join(d, "img_1.jpg"), "rb") as f:
        data = f.read()
    with open(os.path.join(d, "img_1.jpg"), "wb") as f:
        f.write(data[: len(data) // 2])
    with open(os.path.join(d, "img_2.png"), "wb") as f:
        f.write(b"this is not a png")
    return root, d


@pytest.mark.parametrize("zip_mode", [False, True])
@pytest.mark.parametrize("cache_mode", ["no", "full"])
def test_corrupt_image_replaced_and_counted(tmp_path, zip_mode, cache_mode):
    src, d = _corrupt_folder(tmp_path)
    root = src
    if zip_mode:
        root = _write_zip_layout(str(tmp_path / "z"), src, splits=("train",))
    ds = build_dataset(root, "train", zip_mode, cache_mode, None)
    with pytest.warns(RuntimeWarning) as record:
        img, index, label = ds[1]
    names = [str(w.message) for w in record]
    assert len(names) == 2 and "img_1.jpg" in names[0] and "img_2.png" in names[1]
    assert "cannot read or decode image" in names[0]
    assert index == 3 and label == 0  # next decodable index, deterministic
    np.testing.assert_array_equal(np.asarray(img), _pixels(os.path.join(d, "img_3.jpg")))
    assert ds.num_corrupt == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ds[4][1] == 4 and ds[2][1] == 3
    assert ds.num_corrupt == 3


@pytest.mark.parametrize("zip_mode", [False, True])
def test_corrupt_image_strict(tmp_path, zip_mode):
    src, d = _corrupt_folder(tmp_path)
    root = src
    if zip_mode:
        root = _write_zip_layout(str(tmp_path / "z"), src, splits=("train",))
        expected = f"{root}/train.zip:class_0/img_1.jpg: cannot read or decode image"
    else:
        expected = f"{d}/img_1.jpg: cannot read or decode image"
    ds = build_dataset(root, "train", zip_mode, "no", None, strict=True)
    with pytest.raises(DatasetError, match=re.escape(expected)):
        ds[1]
    assert ds.num_corrupt == 0


def test_corrupt_counter_over_workers(tmp_path):
    root, _ = _corrupt_folder(tmp_path)
    ds = build_dataset(root, "train", False, "no", _to_array)
    loader = DataLoader(ds, batch_size=1, num_workers=2, multiprocessing_context="fork")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        indices = [int(i) for _, i, _ in loader]
    assert indices == [0, 3, 3, 3, 4]
    assert ds.num_corrupt == 3  # item 1 meets img_1 and img_2, item 2 meets img_2
