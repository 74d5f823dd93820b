"""NNCLR (Dwibedi et al., "With a Little Help from My Friends: Nearest-Neighbor Contrastive Learning of
Visual Representations", ICCV 2021).

* network: backbone -> projector (3 Linear layers, hidden 2048, output 256, batch norm after each,
  ReLU after the hidden ones) -> predictor (Linear -> BatchNorm1d -> ReLU -> Linear, hidden 4096).
* support set: a :class:`~contrast.models.queue.FeatureQueue` of normalised projections (98,304 rows),
  identical on every rank: it starts as random unit rows (solo-learn's initialisation) and after each
  optimiser step receives the first view's projections of the global batch, gathered in rank order.
* the positive of a sample is the nearest neighbour (cosine) of its projection in the support set, as
  the set was before this step; the loss is :func:`~contrast.models.losses.nnclr_loss`, InfoNCE between
  the neighbour of one view and the predictions of the other view over the global batch (gathered
  with autograd), plus the paper's transposed term, for both view orders.
* batch norm over the global batch on several ranks (``sync_batchnorm``).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from contrast import distributed as cd
from contrast.config import Flag, MethodConfig
from contrast.models.base import BaseMethod
from contrast.models.heads import build_mlp, normalize_fp32
from contrast.models.losses import nnclr_loss
from contrast.models.queue import FeatureQueue
from contrast.models.recipe import Recipe, vit_recipe_of
from contrast.models.views import Views


def build_projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """(B, in_dim) -> (B, out_dim): [Linear -> BatchNorm1d -> ReLU] x 2 -> Linear -> BatchNorm1d
    (NNCLR Sec. 3.2; solo-learn ``solo/methods/nnclr.py`` lines 53-62)."""
    if min(in_dim, hidden_dim, out_dim) <= 0:
        raise ValueError(f"NNCLR's projector needs positive widths, got {in_dim}, {hidden_dim}, {out_dim}")
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim), nn.BatchNorm1d(out_dim))


@torch.no_grad()
def nearest_neighbours(z: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """The row of (K, D) ``support`` of highest dot product (cosine: both are normalised) with each row
    of (B, D) ``z``; (B, D) fp32, the first such row on a tie."""
    support = support.float()
    return support[(z.float() @ support.t()).argmax(dim=1)]


class NNCLR(BaseMethod):
    """``backbone``, ``head`` (projector), ``predictor``; the support set ``support``."""

    name = "NNCLR"
    views = Views(count=2)
    #: the paper's Sec. 3.2 and Sec. 4 (docs/methods.md cites each value; solo-learn for what it leaves open)
    recipe = Recipe(aug="BYOL", crop=0.08, mlp_head=True, feature_dim=256, mlp_hidden_dim=2048,
                    contrast_temperature=0.1, optimizer="lars", base_learning_rate=0.3, weight_decay=1e-6,
                    warmup_epoch=10, warmup_multiplier=1e6, lr_scheduler="cosine", sync_batchnorm=True)
    vit_recipe = vit_recipe_of(recipe)   # no published ViT recipe: MoCo v3's AdamW (docs/backbones.md)
    flags = (
        Flag("--nnclr-support-size", int, 98304, "(new) NNCLR: rows of the support set (the queue of projections "
             "the nearest neighbours come from), at least the total batch"),
        Flag("--nnclr-pred-hidden-dim", int, 4096, "(new) NNCLR: hidden width of the prediction MLP"),
    )

    def __init__(self, backbone: nn.Module, feat_dim: int, feature_dim: int = 256, hidden_dim: int = 2048,
                 pred_hidden_dim: int = 4096, support_size: int = 98304, temperature: float = 0.1,
                 seed: int = 0, view_batching: str = "separate") -> None:
        super().__init__(backbone, feat_dim, view_batching)
        if support_size < 1 or pred_hidden_dim < 1:
            raise ValueError(f"NNCLR needs --nnclr-support-size >= 1 and --nnclr-pred-hidden-dim >= 1, "
                             f"got {support_size} and {pred_hidden_dim}")
        self.head = build_projector(feat_dim, hidden_dim, feature_dim)
        self.predictor = build_mlp(feature_dim, pred_hidden_dim, feature_dim, batch_norm=True)
        self.support = FeatureQueue(support_size, (feature_dim,), init="random", seed=seed)
        self.temperature = temperature
        self.feature_dim = feature_dim
        self._pending: Optional[torch.Tensor] = None

    @classmethod
    def check_config(cls, cfg: MethodConfig) -> None:
        if not cfg.mlp_head:
            raise ValueError(f"{cls.name}'s projector is always an MLP; --no-mlp-head is not supported")
        size = cfg.option("nnclr_support_size")
        if size < cfg.total_batch_size:
            raise ValueError(f"--nnclr-support-size {size} is smaller than the total batch {cfg.total_batch_size} "
                             f"that is written to it every step")
        if cfg.option("nnclr_pred_hidden_dim") < 1:
            raise ValueError(f"--nnclr-pred-hidden-dim must be >= 1, got {cfg.option('nnclr_pred_hidden_dim')}")

    @classmethod
    def from_config(cls, cfg: MethodConfig, num_instances: int) -> "NNCLR":
        backbone, feat_dim = cls.build_backbone(cfg)
        return cls(backbone, feat_dim, cfg.feature_dim, cfg.head_hidden_dim, cfg.option("nnclr_pred_hidden_dim"),
                   cfg.option("nnclr_support_size"), cfg.temperature, cfg.seed, cfg.view_batching)

    def _project_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2D): the projection and its prediction side by side (one ``encode`` batches both alike)."""
        z = self.head(self.backbone(x))
        return torch.cat([z, self.predictor(z)], dim=1)

    def training_loss(self, views: List[torch.Tensor], index: torch.Tensor) -> Dict[str, torch.Tensor]:
        d = self.feature_dim
        out = self.encode(self._project_and_predict, views)
        z = [normalize_fp32(y[:, :d].detach()) for y in out]
        p = [normalize_fp32(y[:, d:]) for y in out]
        with torch.no_grad():
            nn_local = [nearest_neighbours(zi, self.support.features) for zi in z]
            nn_all = [cd.all_gather_no_grad(x) for x in nn_local]
            nn_sim = (z[0] * nn_local[0]).sum(dim=1).mean()
            self._pending = cd.all_gather_no_grad(z[0])
        p_all = [cd.all_gather_with_grad(x) for x in p]
        with torch.autocast(device_type=p[0].device.type, enabled=False):
            loss = nnclr_loss(nn_local, p, nn_all, p_all, cd.get_rank() * p[0].shape[0], self.temperature)
        return {"loss": loss, "nn_sim": nn_sim}

    @torch.no_grad()
    def on_train_step_end(self, step: int, lr: float, grad_scale: float = 1.0) -> None:
        if self._pending is not None:
            self.support.enqueue(self._pending)
            self._pending = None
