"""Worker-side augmentation randomness is a pure function of (seed, epoch, global position): the
same crops with 0 or 2 DataLoader workers, after a mid-epoch resume, on any world size, for
corrupt-image replacements; the main process' random streams are left alone."""
from __future__ import annotations

import os
import random
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from contrast.data import SampleIndex, build_dataset, build_sampler, sample_seed
from contrast.data.transforms import build_augmentation
from contrast.seeding import seeded_rng
from tests.synthetic import make_image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return make_image_folder(str(tmp_path_factory.mktemp("det")), num_classes=2, per_class=6, size=(40, 48),
                             splits=("train",))


def _loader(ds, sampler, workers):
    return DataLoader(ds, batch_size=2, sampler=sampler, num_workers=workers, drop_last=True,
                      multiprocessing_context="fork" if workers else None,
                      worker_init_fn=lambda w: (torch.manual_seed(1000 + w), random.seed(w)))  # any worker state


def _epoch(ds, sampler, workers):
    """(views as one tensor per batch, indices) of one pass."""
    out = []
    for views, index, _ in _loader(ds, sampler, workers):
        out.append((torch.cat([v.flatten(1).float() for v in views], 1), index))
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for (va, ia), (vb, ib) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(va, vb)


@pytest.mark.parametrize("aug,fast", [("SimCLR", True), ("MultiCrop", True), ("RandAug", True), ("SimCLR", False)])
def test_same_crops_with_0_or_2_workers(folder, aug, fast):
    cpu = build_augmentation(aug, num_views=2, image_size=24, image_size2=12, num_crop2=2, fast=fast).cpu
    ds = build_dataset(folder, "train", False, "no", cpu)
    sampler = build_sampler(ds, True, 8, 4, seed=3, shuffle_per_epoch=False, num_replicas=1, rank=0)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        a, b = _epoch(ds, sampler, 0), _epoch(ds, sampler, 2)
        _assert_same(a, b)
    # and the randomness is real: another epoch or seed gives other crops of the same image
    one = ds[SampleIndex(3, sample_seed(3, 0, 0))][0]
    two = ds[SampleIndex(3, sample_seed(3, 1, 0))][0]
    assert any(not torch.equal(x, y) for x, y in zip(one, two))


def test_mid_epoch_resume_gives_the_remaining_tensors(folder):
    cpu = build_augmentation("MoCov2", num_views=2, image_size=24).cpu
    ds = build_dataset(folder, "train", False, "no", cpu)
    sampler = build_sampler(ds, False, 0, 0, seed=5, shuffle_per_epoch=False, num_replicas=1, rank=0)
    sampler.set_epoch(2)
    full = _epoch(ds, sampler, 2)
    state = sampler.state_dict(consumed=4)  # two batches of two were trained before the interruption
    resumed = build_sampler(build_dataset(folder, "train", False, "no", cpu), False, 0, 0, seed=0,
                            shuffle_per_epoch=False, num_replicas=1, rank=0)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    _assert_same(_epoch(ds, resumed, 2), full[2:])
    resumed.set_epoch(3)
    sampler.set_epoch(3)
    _assert_same(_epoch(ds, resumed, 0), _epoch(ds, sampler, 2))


def test_world_size_does_not_change_a_samples_crops(folder):
    cpu = build_augmentation("SimCLR", num_views=2, image_size=24).cpu
    ds = build_dataset(folder, "train", False, "no", cpu)

    def items(world, rank):
        s = build_sampler(ds, True, 8, 4, seed=1, shuffle_per_epoch=False, num_replicas=world, rank=rank)
        s.set_epoch(1)
        return [(int(i), ds[i][0]) for i in s]

    single = items(1, 0)
    for r in range(2):
        for (i, views), (j, ref) in zip(items(2, r), single[r::2]):
            assert i == j and all(torch.equal(v, w) for v, w in zip(views, ref))


def test_corrupt_replacement_is_deterministic(tmp_path):
    root = make_image_folder(str(tmp_path / "f"), num_classes=1, per_class=4, splits=("train",))
    with open(os.path.join(root, "train", "class_0", "img_1.jpg"), "wb") as f:
        f.write(b"garbage")
    cpu = build_augmentation("SimCLR", num_views=2, image_size=24).cpu
    ds = build_dataset(root, "train", False, "no", cpu)
    sampler = build_sampler(ds, False, 0, 0, seed=2, shuffle_per_epoch=False, num_replicas=1, rank=0, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = _epoch(ds, sampler, 0), _epoch(ds, sampler, 2)
        _assert_same(a, b)
        assert a[0][1].tolist() == [0, 2]  # position 1 (img_1) was replaced by index 2...
        replaced = ds[SampleIndex(1, sample_seed(2, 0, 1))][0]
    with seeded_rng(sample_seed(2, 0, 1)):  # ...transformed under the seed of position 1
        direct = cpu(ds.load_image(2))
    assert all(torch.equal(x, y) for x, y in zip(replaced, direct))


def test_main_process_random_streams_are_untouched(folder):
    cpu = build_augmentation("SimCLR", num_views=2, image_size=24).cpu
    ds = build_dataset(folder, "train", False, "no", cpu)
    sampler = build_sampler(ds, True, 8, 4, seed=0, shuffle_per_epoch=False, num_replicas=1, rank=0)

    def draws():
        return torch.rand(3).tolist(), random.random(), float(np.random.rand())

    torch.manual_seed(11), random.seed(11), np.random.seed(11)
    expected = draws()
    torch.manual_seed(11), random.seed(11), np.random.seed(11)
    for i in sampler:  # (a DataLoader itself draws its base seed from the global generator)
        ds[i]
    assert draws() == expected


def test_indices_without_seed_keep_the_global_generator(folder):
    cpu = build_augmentation("SimCLR", num_views=1, image_size=24).cpu
    ds = build_dataset(folder, "train", False, "no", cpu)
    torch.manual_seed(0)
    a = ds[2][0][0]
    torch.manual_seed(0)
    b = ds[2][0][0]
    c = ds[2][0][0]
    assert torch.equal(a, b) and not torch.equal(b, c)
