"""PIC: parametric instance classification (Cao et al., NeurIPS 2020, arXiv 2006.14618).

Every training image is its own class. The embedding ``z`` (normalised output
of backbone + head) is classified by a cosine softmax over a table W with one
row per instance (see :func:`contrast.models.losses.pic_loss`).

The classifier is a separate sub-module with a small interface, so the dense
table here and the sampled, sharded one of ``contrast.models.pic_sampled``
(recent negative sampling + weight update correction) are interchangeable::

    loss = classifier(z_large, index, z_small)   # (B, D), (B,), list of (B, D)
    classifier.on_train_step_end(step, lr)       # after optimizer.step()
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import nn

from contrast.models.backbones import encode_views
from contrast.models.base import BaseMethod
from contrast.models.heads import build_head, normalize_fp32
from contrast.models.losses import pic_loss


class DenseInstanceClassifier(nn.Module):
    """Full-softmax instance classifier holding W (N, D) as an ``nn.Parameter``.

    W is initialised N(0, 0.01) as in the paper and trained by the optimiser like
    any other parameter (under DDP its gradient is averaged over ranks, so every
    rank keeps the same table).
    """

    def __init__(self, num_instances: int, dim: int, temperature: float) -> None:
        super().__init__()
        if num_instances <= 0:
            raise ValueError(f"PIC needs a non-empty training set, got num_instances={num_instances}")
        self.temperature = temperature
        self.weight = nn.Parameter(torch.randn(num_instances, dim) * 0.01)

    def forward(self, z_large: torch.Tensor, index: torch.Tensor,
                z_small: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Loss of (B, D) ``z_large`` with targets ``index`` (B,); ``z_small`` use a detached W."""
        with torch.autocast(device_type=z_large.device.type, enabled=False):
            return pic_loss(z_large, self.weight, index, self.temperature, z_small)

    @torch.no_grad()
    def positive_similarity(self, z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Mean cosine similarity between (B, D) ``z`` and its own normalised row of W."""
        return (z * normalize_fp32(self.weight[index])).sum(dim=1).mean()

    @torch.no_grad()
    def stats(self) -> Dict[str, torch.Tensor]:
        """Row-norm statistics of W (shrinking norms are a suspected cause of NaNs in long runs)."""
        norms = self.weight.float().norm(dim=1)
        return {"w_norm_mean": norms.mean(), "w_norm_min": norms.min(), "w_norm_max": norms.max()}

    def on_train_step_end(self, step: int, lr: float, grad_scale: float = 1.0) -> None:
        """Nothing to do: W is an ordinary parameter updated by the optimiser."""


def build_instance_classifier(num_instances: int, dim: int, temperature: float, num_negative: int = 0,
                              momentum: float = 0.9, weight_decay: float = 1e-4,
                              weight_correction: bool = True, storage: str = "memory",
                              storage_dir: str | None = None, seed: int = 0) -> nn.Module:
    """Dense classifier when ``num_negative == 0`` (``--pic-num-negative``), otherwise the
    sampled classifier of :mod:`contrast.models.pic_sampled` (recent negative sampling)."""
    if num_negative < 0:
        raise ValueError(f"--pic-num-negative must be >= 0, got {num_negative}")
    if num_negative == 0:
        return DenseInstanceClassifier(num_instances, dim, temperature)
    from contrast.models.pic_sampled import SampledInstanceClassifier
    return SampledInstanceClassifier(num_instances, dim, temperature, num_negative, momentum=momentum,
                                     weight_decay=weight_decay, weight_correction=weight_correction,
                                     storage=storage, storage_dir=storage_dir, seed=seed)


class PIC(BaseMethod):
    """Backbone + head + instance classifier.

    Views: with ``multi_crop=True`` ``views[0]`` is the large crop and the rest are
    small crops (classified against a detached W); otherwise every view (one or
    two) is classified and the loss is averaged over them -- the classifier then
    sees one batch of V x B rows with the indices repeated.
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, num_instances: int, feature_dim: int = 128,
                 mlp_head: bool = True, temperature: float = 0.2, multi_crop: bool = False,
                 classifier: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.head = build_head(feat_dim, feature_dim, mlp_head)
        self.multi_crop = multi_crop
        self.classifier = classifier if classifier is not None else \
            DenseInstanceClassifier(num_instances, feature_dim, temperature)

    def forward(self, views: List[torch.Tensor], index: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.multi_crop and len(views) < 2:
            raise ValueError(f"PIC with --aug MultiCrop expects 1 large + >= 1 small crops, got {len(views)} view(s)")
        zs = [normalize_fp32(y) for y in encode_views(lambda x: self.head(self.backbone(x)), views)]
        if self.multi_crop:
            loss = self.classifier(zs[0], index, zs[1:])
        else:
            loss = self.classifier(torch.cat(zs), index.repeat(len(zs)), [])
        out = {"loss": loss}
        if hasattr(self.classifier, "positive_similarity"):
            out["pos_sim"] = self.classifier.positive_similarity(zs[0].detach(), index)
        if hasattr(self.classifier, "stats"):
            out.update(self.classifier.stats())
        return out

    @torch.no_grad()
    def on_train_step_end(self, step: int, lr: float, grad_scale: float = 1.0) -> None:
        self.classifier.on_train_step_end(step, lr, grad_scale)

    def rank_state_dict(self) -> dict | None:
        fn = getattr(self.classifier, "rank_state_dict", None)
        return fn() if fn is not None else None

    def load_rank_state_dicts(self, shards: List[dict]) -> None:
        fn = getattr(self.classifier, "load_rank_state_dicts", None)
        if fn is None:
            raise ValueError("this PIC classifier keeps no per-rank state; the checkpoint's rank shards "
                             "were written by a run with --pic-num-negative > 0")
        fn(shards)
