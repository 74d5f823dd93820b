"""Frozen-feature extraction for evaluation, in one process or sharded over ranks.

Every rank encodes a contiguous, *non-padded* block of the dataset
(:class:`ShardSampler`), so no image is counted twice; the blocks are gathered
with :func:`contrast.distributed.all_gather_variable` together with the dataset
indices, and every rank ends with the features of the whole dataset in dataset
order.

Also here: building the backbone of a pretraining checkpoint from its recorded
configuration (``arch``, ``stem``) and loading its weights (:func:`backbone_from_checkpoint`).
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from contrast import distributed as cd
from contrast.checkpoint import Checkpoint, CheckpointError, load_model_state, read_checkpoint
from contrast.data.workers import Loader
from contrast.logger import Progress
from contrast.models import backbone_config_of, make_backbone, stem_of


class ShardSampler(Sampler[int]):
    """Rank ``rank``'s contiguous block ``[start, stop)`` of ``range(num_samples)``, in order.

    Unlike ``DistributedSampler`` the blocks are not padded to equal length, so the
    union over ranks is exactly the dataset (blocks may be empty when
    ``num_samples < world_size``).
    """

    def __init__(self, num_samples: int, rank: Optional[int] = None, world_size: Optional[int] = None) -> None:
        self.start, self.stop = cd.shard_range(num_samples, rank, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def build_eval_loader(dataset: Dataset, batch_size: int, num_workers: int = 0,
                      rank: Optional[int] = None, world_size: Optional[int] = None) -> DataLoader:
    """A sequential loader over this rank's :class:`ShardSampler` block of ``dataset`` (a
    :class:`~contrast.data.workers.Loader`: its workers end on every exit path, their errors are one line)."""
    return Loader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world_size),
                  num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                  persistent_workers=False, drop_last=False)


def _as_batch(sample, device: torch.device, device_transform: Optional[nn.Module]) -> torch.Tensor:
    """One (B, 3, H, W) float batch from a collated ``sample`` (a tensor or a list of one view)."""
    views = list(sample) if isinstance(sample, (list, tuple)) else [sample]
    if len(views) != 1:
        raise ValueError(f"evaluation transforms must give one view per image, got {len(views)}")
    views = [v.to(device, non_blocking=True) for v in views]
    if device_transform is not None:
        views = device_transform(views)
    return views[0].float()


@torch.no_grad()
def extract_features(model: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader, device: torch.device,
                     num_samples: Optional[int] = None, device_transform: Optional[nn.Module] = None,
                     normalize: bool = False, progress: str = "", gather: bool = True,
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Encode every item of ``loader`` and return ``(features (N, D) fp32, labels (N,) int64)``.

    ``loader`` yields ``(sample, index, label)``; with several ranks each rank's
    loader covers its own block (:func:`build_eval_loader`) and the results of all
    ranks are gathered, so every rank returns the full ``N = num_samples`` rows
    (default ``len(loader.dataset)``), row ``i`` being dataset item ``i``.
    ``device_transform`` is the device stage of the augmentation (``aug.device``).
    A ``nn.Module`` ``model`` is put in eval mode while encoding and restored
    afterwards. ``normalize`` L2-normalises each row. With a :class:`ShardSampler`
    the rows are placed by sampler position, so an image the dataset replaced
    (corrupt file, ``strict=False``) fills its own row with the replacement's
    feature and label. ``progress``: a name to show this rank-0 block's progress under
    (:class:`contrast.logger.Progress`; empty: silent). ``gather=False`` returns only this rank's
    :class:`ShardSampler` block, in block order (nothing is gathered: what the sharded kNN needs).
    """
    n = len(loader.dataset) if num_samples is None else num_samples
    was_training = model.training if isinstance(model, nn.Module) else None
    if isinstance(model, nn.Module):
        model.eval()
    feats, labels, indices = [], [], []
    bar = Progress(progress, total=len(loader.sampler) if loader.sampler is not None else n, unit="img",
                   enabled=bool(progress) and cd.get_rank() == 0)
    block, filled = None, 0   # a ShardSampler block is written in place: one copy of it, not two
    try:
        for sample, index, label in loader:
            y = model(_as_batch(sample, device, device_transform)).flatten(1).float()
            y = F.normalize(y, dim=1) if normalize else y
            if isinstance(loader.sampler, ShardSampler):
                block = y.new_empty((len(loader.sampler), y.shape[1])) if block is None else block
                block[filled:filled + len(y)] = y
                filled += len(y)
            else:
                feats.append(y)
            labels.append(label.to(device))
            indices.append(index.to(device))
            bar.update(len(label))
        if block is not None:
            feats.append(block[:filled])
        if not feats:  # an empty block still takes part in the gathers, with the right width
            feats.append(torch.zeros(0, _feature_dim(model, loader, device, device_transform), device=device))
            labels.append(torch.zeros(0, dtype=torch.long, device=device))
            indices.append(torch.zeros(0, dtype=torch.long, device=device))
    finally:
        bar.close()
        if was_training is not None:
            model.train(was_training)
    feats_t = feats[0] if len(feats) == 1 else torch.cat(feats)
    labels_t, index_t = torch.cat(labels).long(), torch.cat(indices).long()
    if not gather:
        return _own_block(feats_t, labels_t, loader)
    if isinstance(loader.sampler, ShardSampler):
        # Slots, not returned indices: a corrupt image the dataset replaced by the next one keeps its slot.
        index_t = torch.arange(loader.sampler.start, loader.sampler.stop, device=device)[: len(feats_t)]
    feats_t = cd.all_gather_variable(feats_t)
    labels_t = cd.all_gather_variable(labels_t)
    index_t = cd.all_gather_variable(index_t)
    if index_t.numel() != n or not torch.equal(torch.sort(index_t).values, torch.arange(n, device=device)):
        raise RuntimeError(f"feature extraction covered {index_t.numel()} items with "
                           f"{torch.unique(index_t).numel()} distinct indices, expected each of 0..{n - 1} once")
    order = torch.argsort(index_t)
    return feats_t[order], labels_t[order]


def _own_block(feats: torch.Tensor, labels: torch.Tensor, loader: DataLoader) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's block as extracted, after checking it has one row per item of the block."""
    sampler = loader.sampler
    if not isinstance(sampler, ShardSampler):
        if cd.get_world_size() > 1:
            raise ValueError("extract_features(gather=False) on several ranks needs a ShardSampler loader")
        sampler = ShardSampler(len(loader.dataset), 0, 1)
    if len(feats) != len(sampler):
        raise RuntimeError(f"feature extraction covered {len(feats)} items of the block "
                           f"[{sampler.start}, {sampler.stop}), expected {len(sampler)}")
    return feats, labels


@torch.no_grad()
def _feature_dim(model, loader: DataLoader, device: torch.device, device_transform: Optional[nn.Module]) -> int:
    """Width of ``model``'s output, measured on the dataset's first item."""
    sample, _, _ = loader.dataset[0]
    sample = [s.unsqueeze(0) for s in sample] if isinstance(sample, (list, tuple)) else sample.unsqueeze(0)
    return int(model(_as_batch(sample, device, device_transform)).flatten(1).shape[1])


# ----------------------------------------------------------------------------- checkpoints
def backbone_spec(ckpt: Checkpoint, arch: Optional[str] = None, stem: Optional[str] = None) -> Tuple[str, str]:
    """``(arch, stem)``: the explicit values, else those recorded in the checkpoint's config."""
    arch = arch or ckpt.config.get("arch")
    if arch is None:
        raise CheckpointError(f"{ckpt.path}: no 'arch' in the checkpoint's config; pass --arch")
    return arch, stem or stem_of(ckpt.config)


def backbone_from_checkpoint(path: str, arch: Optional[str] = None, stem: Optional[str] = None,
                             ) -> Tuple[nn.Module, int, Checkpoint]:
    """Build the backbone a pretraining checkpoint was trained with and load its weights (strict).

    Returns ``(backbone, feat_dim, checkpoint)``. ``arch``/``stem`` override the checkpoint's
    config; a ViT's patch size, image size and pooling are the checkpoint's. Errors (:class:`contrast.checkpoint.CheckpointError`) name the file and what it holds.
    """
    ckpt = read_checkpoint(path)
    arch, stem = backbone_spec(ckpt, arch, stem)
    backbone = make_backbone(backbone_config_of(ckpt.config, arch=arch, stem=stem))
    load_model_state(backbone, ckpt.backbone_state(), path, ckpt.config)
    return backbone, backbone.feat_dim, ckpt
