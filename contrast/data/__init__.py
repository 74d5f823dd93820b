"""Datasets, samplers and the dataset factory (see ``docs/design.md``, "Data contract")."""
from __future__ import annotations

from typing import Callable, Optional

from contrast.data.datasets import (CACHE_MODES, DatasetError, ImageFolderInstance, ZipImageDataset,
                                    shard_indices)
from contrast.data.samplers import (ResumableDistributedSampler, SlidingWindowSampler, build_sampler,
                                    window_epochs)

__all__ = ["CACHE_MODES", "DatasetError", "ImageFolderInstance", "ZipImageDataset", "shard_indices",
           "ResumableDistributedSampler", "SlidingWindowSampler", "build_sampler", "window_epochs",
           "build_dataset"]


def build_dataset(data_dir: str, split: str, zip_mode: bool, cache_mode: str, transform: Optional[Callable],
                  rank: int = 0, world_size: int = 1, strict: bool = False):
    """``ZipImageDataset`` (``--zip``) or ``ImageFolderInstance`` of ``data_dir`` / ``split``.

    ``cache_mode``: ``no``, ``part`` (this rank's shard in RAM, exposed as ``local_indices``) or
    ``full``. ``strict``: corrupt images raise instead of being replaced and counted.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    cls = ZipImageDataset if zip_mode else ImageFolderInstance
    return cls(data_dir, split, transform=transform, cache_mode=cache_mode, rank=rank, world_size=world_size,
               strict=strict)
