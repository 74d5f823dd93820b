"""Datasets, samplers and the dataset factory (see ``docs/design.md``, "Data contract", and
``docs/data.md``)."""
from __future__ import annotations

from typing import Callable, Optional

from contrast.data.datasets import CACHE_MODES, ImageFolderInstance, ZipImageDataset, shard_indices
from contrast.data.errors import DatasetError
from contrast.data.samplers import (FeistelPermutation, ResumableDistributedSampler, ResumableSampler, SampleIndex,
                                    SlidingWindowSampler, build_sampler, sample_seed, window_epochs)

__all__ = ["CACHE_MODES", "DatasetError", "ImageFolderInstance", "ZipImageDataset", "shard_indices",
           "FeistelPermutation", "ResumableDistributedSampler", "ResumableSampler", "SampleIndex", "SlidingWindowSampler",
           "build_sampler", "sample_seed", "window_epochs", "build_dataset"]


def build_dataset(data_dir: str, split: str, zip_mode: bool, cache_mode: str, transform: Optional[Callable],
                  rank: int = 0, world_size: int = 1, strict: bool = False, index_dir: Optional[str] = None):
    """``ZipImageDataset`` (``--zip``) or ``ImageFolderInstance`` of ``data_dir`` / ``split``.

    ``cache_mode``: ``no``, ``part`` (this rank's shard in RAM, exposed as ``local_indices``) or
    ``full``. ``strict``: corrupt images raise instead of being replaced and counted.
    ``index_dir``: where to keep the dataset's index file (default: next to the data, or
    ``~/.cache/contrast/index`` when the data folder is read-only).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    cls = ZipImageDataset if zip_mode else ImageFolderInstance
    return cls(data_dir, split, transform=transform, cache_mode=cache_mode, rank=rank, world_size=world_size,
               strict=strict, index_dir=index_dir)
