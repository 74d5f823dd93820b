"""Weighted k-nearest-neighbour evaluation (InstDisc, Wu et al. 2018, Sec. 3.4) and an online monitor.

A query ``q`` votes with its ``k`` most similar training features ``f_i`` (cosine
similarity ``s_i = q . f_i`` of L2-normalised features); neighbour ``i`` adds
``exp(s_i / T)`` to the score of its class, and the class scores are ranked for
top-1/top-5. InstDisc uses ``k = 200, T = 0.07`` on ImageNet.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from contrast import distributed as cd
from contrast.data import build_dataset
from contrast.data.transforms import VAL_CROP_FRACTION, build_augmentation
from contrast.eval.features import build_eval_loader, extract_features
from contrast.logger import Progress
from contrast.placement import place


def _vote(sim: torch.Tensor, idx: torch.Tensor, train_labels: torch.Tensor, temperature: float,
          num_classes: int) -> torch.Tensor:
    """Class scores (m, C) from the similarities ``sim`` (m, k) of neighbours ``idx`` (m, k).

    ``exp((s - s_max) / T)`` equals ``exp(s / T)`` up to a per-row factor, which the
    normalisation to a distribution removes; it cannot overflow for small ``T``.
    """
    weights = torch.exp((sim - sim[:, :1]) / temperature)
    scores = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=weights.dtype)
    scores.scatter_add_(1, train_labels[idx], weights)
    return scores / scores.sum(dim=1, keepdim=True)


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor,
                k: int, temperature: float, num_classes: int, chunk_size: int = 1024) -> torch.Tensor:
    """Weighted kNN class distribution (M, C) of the queries.

    Args:
        train_feats: (N, D) training features (L2-normalised here).
        train_labels: (N,) int labels in ``[0, num_classes)``.
        query_feats: (M, D) query features (L2-normalised here).
        k: neighbours per query (at most N are used).
        temperature: ``T`` of the ``exp(s / T)`` weights.
        num_classes: C.
        chunk_size: queries per (chunk, N) similarity block, bounding memory.

    Returns:
        (M, C) scores summing to 1 per row, proportional to the summed ``exp(s / T)``
        of each class among the ``k`` neighbours.
    """
    return next(iter(knn_predict_multi(train_feats, train_labels, query_feats, [k], temperature,
                                       num_classes, chunk_size).values()))


@torch.no_grad()
def knn_predict_multi(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor,
                      ks: Sequence[int], temperature: float, num_classes: int,
                      chunk_size: int = 1024, progress: str = "") -> Dict[int, torch.Tensor]:
    """:func:`knn_predict` for several ``k`` at once (one similarity pass): ``{k: (M, C) scores}``.
    ``progress``: a name to show the progress over the queries under (empty: silent)."""
    if train_feats.shape[0] != train_labels.shape[0]:
        raise ValueError(f"{train_feats.shape[0]} training features but {train_labels.shape[0]} labels")
    if train_feats.shape[0] == 0:
        raise ValueError("kNN needs at least one training feature")
    if min(ks) < 1 or temperature <= 0:
        raise ValueError(f"kNN needs k >= 1 and T > 0, got k={list(ks)} T={temperature}")
    train = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.long().to(train.device)
    k_max = min(max(ks), train.shape[0])
    out: Dict[int, list] = {k: [] for k in ks}
    with Progress(progress, total=query_feats.shape[0], unit="query", enabled=bool(progress)) as bar:
        for query in torch.split(query_feats, chunk_size):
            sim = F.normalize(query.float().to(train.device), dim=1) @ train.T
            top_sim, top_idx = sim.topk(k_max, dim=1, largest=True, sorted=True)
            for k in ks:
                kk = min(k, k_max)
                out[k].append(_vote(top_sim[:, :kk], top_idx[:, :kk], labels, temperature, num_classes))
            bar.update(query.shape[0])
    return {k: torch.cat(v) if v else torch.zeros(0, num_classes, device=train.device) for k, v in out.items()}


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, topk: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """``{"top1": %, "top5": %}`` of (M, C) ``scores`` against (M,) ``labels``.

    Top-k with k >= C counts every query as correct.
    """
    labels = labels.to(scores.device).long()
    pred = scores.topk(min(max(topk), scores.shape[1]), dim=1).indices
    hit = pred == labels[:, None]
    return {f"top{k}": 100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in topk}


@torch.no_grad()
def knn_evaluate(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor,
                 query_labels: torch.Tensor, ks: Sequence[int], temperature: float, num_classes: int,
                 chunk_size: int = 1024, progress: str = "") -> Dict[int, Dict[str, float]]:
    """Top-1/top-5 accuracy (%) of weighted kNN for each ``k``: ``{k: {"top1", "top5"}}``
    (``progress``: see :func:`knn_predict_multi`)."""
    scores = knn_predict_multi(train_feats, train_labels, query_feats, ks, temperature, num_classes, chunk_size,
                               progress)
    return {k: topk_accuracy(s, query_labels) for k, s in scores.items()}


class KNNMonitor:
    """Online kNN accuracy of a backbone during pretraining (solo-learn / lightly style).

    Each call encodes the (un-augmented, ``val`` transform) training and
    validation sets with the backbone in eval mode, sharded over ranks (every
    rank gets the same result), classifies the validation set by weighted kNN and
    remembers the best top-1. The backbone's train/eval mode is restored.

    Usage in a training loop (the caller logs the returned values)::

        monitor = KNNMonitor.from_data_dir(data_dir, device, k=20)   # once
        if epoch % knn_freq == 0:
            acc = monitor(model_without_ddp.backbone)      # {"top1": %, "top5": %}
    """

    def __init__(self, train_set: Dataset, val_set: Dataset, device: torch.device, k: int = 200,
                 temperature: float = 0.07, batch_size: int = 256, num_workers: int = 0,
                 device_transform: Optional[nn.Module] = None, num_classes: Optional[int] = None) -> None:
        self.train_set, self.val_set = train_set, val_set
        self.device = torch.device(device)
        self.k, self.temperature = k, temperature
        self.batch_size, self.num_workers = batch_size, num_workers
        self.device_transform = place(device_transform, self.device)
        self.num_classes = num_classes if num_classes is not None else _num_classes(train_set)
        self.best: Dict[str, float] = {"top1": float("-inf"), "top5": float("-inf")}

    @classmethod
    def from_data_dir(cls, data_dir: str, device: torch.device, zip_mode: bool = False, cache_mode: str = "no",
                      image_size: int = 224, val_crop_fraction: float = VAL_CROP_FRACTION,
                      index_dir: Optional[str] = None, **kwargs) -> "KNNMonitor":
        """Build both splits of ``data_dir`` with the ``val`` transform (``build_dataset``).

        ``cache_mode="part"`` is read as ``"no"``: its rank shards do not match the
        contiguous evaluation blocks.
        """
        aug = build_augmentation("val", num_views=1, image_size=image_size, val_crop_fraction=val_crop_fraction)
        cache = "no" if cache_mode == "part" else cache_mode
        sets = [build_dataset(data_dir, split, zip_mode, cache, aug.cpu, 0, 1, index_dir=index_dir)
                for split in ("train", "val")]
        return cls(sets[0], sets[1], device, device_transform=aug.device, **kwargs)

    def _features(self, backbone: nn.Module, dataset: Dataset, split: str):
        loader = build_eval_loader(dataset, self.batch_size, self.num_workers)
        return extract_features(backbone, loader, self.device, device_transform=self.device_transform,
                                normalize=True, progress=f"knn monitor: {split} features")

    @torch.no_grad()
    def __call__(self, backbone: nn.Module) -> Dict[str, float]:
        """``{"top1": %, "top5": %}`` of the current ``backbone`` (mode restored afterwards)."""
        train_feats, train_labels = self._features(backbone, self.train_set, "train")
        val_feats, val_labels = self._features(backbone, self.val_set, "val")
        acc = knn_evaluate(train_feats, train_labels, val_feats, val_labels, [self.k], self.temperature,
                           self.num_classes, progress="knn monitor: kNN" if cd.get_rank() == 0 else "")[self.k]
        if acc["top1"] > self.best["top1"]:
            self.best = dict(acc)
        return acc


def _num_classes(dataset: Dataset) -> int:
    """``dataset.num_classes``, else ``len(dataset.classes)``, else ``1 + max(dataset.targets)``."""
    if hasattr(dataset, "num_classes"):
        return int(dataset.num_classes)
    if hasattr(dataset, "classes"):
        return len(dataset.classes)
    return int(max(dataset.targets)) + 1
