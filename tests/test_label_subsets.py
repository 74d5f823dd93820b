"""Semi-supervised label subsets: class-balanced, deterministic, identical on every rank, the list format
of SimCLR's imagenet_subsets/1percent.txt (one file name per line)."""
import collections
import os

import numpy as np
import pytest
import torch

from contrast.data import build_dataset, build_sampler
from contrast.data.errors import DatasetError
from contrast.data.subsets import (balanced_subset, indices_of_names, item_paths, label_subset, read_subset_file,
                                   subset_names, write_subset_file)
from tests.dist_utils import run_distributed
from tests.synthetic import make_image_folder

# class -> images; the expected counts are floor(f * n + 1/2), at least one image per class
SIZES = {0: 100, 1: 37, 2: 5, 3: 1}
EXPECTED = {0.1: {0: 10, 1: 4, 2: 1, 3: 1}, 0.01: {0: 1, 1: 1, 2: 1, 3: 1}, 0.5: {0: 50, 1: 19, 2: 3, 3: 1},
            1.0: SIZES}


def uneven_labels(seed=0):
    labels = np.concatenate([np.full(n, c) for c, n in SIZES.items()])
    return np.random.default_rng(seed).permutation(labels)


@pytest.mark.parametrize("fraction", sorted(EXPECTED))
def test_subset_is_class_balanced(fraction):
    labels = uneven_labels()
    chosen = balanced_subset(labels, fraction, seed=3)
    assert len(set(chosen.tolist())) == len(chosen) and list(chosen) == sorted(chosen)
    assert dict(collections.Counter(labels[chosen].tolist())) == EXPECTED[fraction]


def test_subset_is_deterministic_from_the_seed_alone():
    labels = uneven_labels()
    a = balanced_subset(labels, 0.1, seed=3)
    np.random.seed(123)
    torch.manual_seed(456)   # the global generators play no part
    assert np.array_equal(a, balanced_subset(labels, 0.1, seed=3))
    assert not np.array_equal(a, balanced_subset(labels, 0.1, seed=4))
    with pytest.raises(ValueError, match=r"label fraction must be in \(0, 1\]"):
        balanced_subset(labels, 0.0, seed=0)


def _rank_subset(rank, world_size, out_dir, data):
    np.random.seed(rank)
    torch.manual_seed(1000 + rank)   # rank-dependent global state, as setup_run leaves it (seed + rank)
    dataset = build_dataset(data, "train", False, "no", None, rank, world_size)
    chosen = label_subset(dataset, 0.25, None, seed=7)
    sampler = build_sampler(dataset, False, 0, 0, 7, False, world_size, rank, drop_last=True, subset=chosen)
    torch.save({"subset": chosen.tolist(), "share": [int(i) for i in sampler]}, os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.slow
def test_subset_is_the_same_on_every_rank(tmp_path):
    data = make_image_folder(str(tmp_path / "d"), num_classes=3, per_class=8, size=(8, 8), splits=("train",))
    r0, r1 = run_distributed(_rank_subset, 2, args=(data,))
    assert r0["subset"] == r1["subset"] and len(r0["subset"]) == 6   # 2 of 8 per class
    assert sorted(r0["share"] + r1["share"]) == r0["subset"]          # the ranks split the subset, nothing else


def test_subset_file_round_trip_folder_and_zip(tmp_path):
    from tools import make_zip_dataset
    data = make_image_folder(str(tmp_path / "d"), num_classes=2, per_class=6, size=(8, 8), splits=("train",))
    assert make_zip_dataset.main(["--src", data, "--dst", str(tmp_path / "z"), "--splits", "train"]) == 0
    folder = build_dataset(data, "train", False, "no", None, 0, 1)
    zipped = build_dataset(str(tmp_path / "z"), "train", True, "no", None, 0, 1)
    paths = item_paths(folder)
    assert paths == item_paths(zipped) and paths[0] == "class_0/img_0.png" and paths[6] == "class_1/img_0.png"
    chosen = balanced_subset(folder.targets, 0.5, seed=1)
    path = str(tmp_path / "subset.txt")
    write_subset_file(path, subset_names(paths, chosen))
    assert open(path).read().splitlines() == [paths[i] for i in chosen]   # bare names clash: paths
    for dataset in (folder, zipped):
        assert np.array_equal(label_subset(dataset, None, path, seed=99), chosen)
    with open(path, "a") as f:
        f.write("\nn01440764_10026.JPEG\n")
    with pytest.raises(DatasetError, match=r"subset\.txt: 1 of 7 names are not in the training split "
                                           r"\(e\.g\. 'n01440764_10026\.JPEG'\)"):
        label_subset(folder, None, path, seed=0)
    with pytest.raises(DatasetError, match=r"absent\.txt: cannot read the label subset"):
        read_subset_file(str(tmp_path / "absent.txt"))
    with pytest.raises(DatasetError, match="'img_0.png' names several images"):
        indices_of_names(paths, ["img_0.png"], "x.txt")


def test_imagenet_style_names_are_bare_file_names():
    """Unique file names (ImageNet's n01440764_10026.JPEG) are written and read bare, as SimCLR's lists."""
    paths = ["n01440764/n01440764_10026.JPEG", "n01440764/n01440764_2.JPEG", "n01443537/n01443537_7.JPEG"]
    assert subset_names(paths, np.array([0, 2])) == ["n01440764_10026.JPEG", "n01443537_7.JPEG"]
    assert indices_of_names(paths, ["n01443537_7.JPEG", "n01440764/n01440764_2.JPEG"], "f").tolist() == [1, 2]


def test_cached_probe_trains_on_the_listed_subset(tmp_path):
    """main_knn.py --linear-cached --label-fraction: the probe equals one trained on exactly the rows of
    label_subset.txt (the kNN still uses every training image)."""
    import main_knn
    from contrast.eval.linear_cached import train_linear_cached
    data = make_image_folder(str(tmp_path / "d"), num_classes=2, per_class=6, size=(8, 8))
    common = ["--data-dir", data, "--raw-pixels", "--image-size", "8", "--num-workers", "0", "--batch-size", "4",
              "--device", "cpu", "--knn-k", "3", "--linear-cached", "--linear-epochs", "3", "--linear-batch-size", "2",
              "--seed", "5"]
    result = main_knn.main(common + ["--label-fraction", "0.5", "--output-dir", str(tmp_path / "o"),
                                     "--save-features", str(tmp_path / "f.pt")])
    listed = (tmp_path / "o" / "label_subset.txt").read_text().splitlines()
    order = [f"class_{c}/img_{i}.{'png' if i % 2 == 0 else 'jpg'}" for c in range(2) for i in range(6)]
    rows = sorted(order.index(name) for name in listed)
    assert len(rows) == 6 and result["label_subset"]["images"] == 6 and result["num_train"] == 12
    saved = torch.load(tmp_path / "f.pt", weights_only=False)
    _, ref = train_linear_cached(saved["train_feats"][rows], saved["train_labels"][rows], saved["val_feats"],
                                 saved["val_labels"], 2, epochs=3, lr=0.1, batch_size=2, seed=5)
    assert result["linear"]["top1"] == ref["top1"] and result["linear"]["train_loss"] == ref["train_loss"]
    with pytest.raises(SystemExit):
        main_knn.parse_knn_args(common[:-7] + ["--label-fraction", "0.5"])   # without --linear-cached
