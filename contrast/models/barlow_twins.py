"""Barlow Twins (Zbontar, Jing, Misra, LeCun, Deny, "Barlow Twins: Self-Supervised Learning via
Redundancy Reduction", ICML 2021; facebookresearch/barlowtwins ``main.py``).

* projector: 3 layers, Linear -> BatchNorm1d -> ReLU twice, then Linear; no Linear has a bias
  (``--mlp-hidden-dim`` hidden, ``--feature-dim`` output: 8192-8192-8192).
* each view's embedding goes through a batch norm without affine parameters; with several ranks
  the loop makes it a batch norm over the global batch (``sync_batchnorm``), as the official
  ``convert_sync_batchnorm`` does.
* loss: :func:`~contrast.models.losses.barlow_twins_loss`. As the official code, each rank divides
  its cross-correlation by the global batch N and the (D, D) matrices are summed over ranks; the
  sum is autograd-aware (``all_reduce_sum_with_grad``), so after DDP's gradient average the
  gradient equals one process's on the whole batch (the official ``torch.distributed.all_reduce``
  passes no gradient between ranks, which gives 1/world_size of it: docs/methods.md).
* optimiser groups: weights, and biases + batch-norm parameters with their own base lr
  (``--barlow-lr-biases`` x N / 256); LARS leaves the latter out of decay and adaptation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from contrast import distributed as cd
from contrast.config import Flag, MethodConfig
from contrast.models.base import BaseMethod
from contrast.models.heads import build_mlp
from contrast.models.losses import barlow_twins_loss
from contrast.models.recipe import VIT_OPTIMIZER, Recipe, vit_recipe_of
from contrast.models.views import Views


@dataclass(frozen=True)
class BarlowTwinsRecipe(Recipe):
    """:class:`Recipe` with the default of ``--barlow-lr-biases`` (main.py ``--learning-rate-biases``)."""

    barlow_lr_biases: float = 0.0048


class BarlowTwins(BaseMethod):
    """``backbone``, ``head`` (3-layer projector) and ``bn`` (batch norm without affine)."""

    name = "BarlowTwins"
    views = Views(count=2)
    #: facebookresearch/barlowtwins main.py and README (docs/methods.md cites each value)
    recipe = BarlowTwinsRecipe(aug="BYOL", crop=0.08, mlp_head=True, feature_dim=8192, mlp_hidden_dim=8192,
                               optimizer="lars", base_learning_rate=0.2, weight_decay=1e-6, warmup_epoch=10,
                               warmup_multiplier=1e6, lr_scheduler="cosine", sync_batchnorm=True)
    #: no published ViT recipe: MoCo v3's AdamW (docs/backbones.md). The small bias lr belongs to LARS (whose
    #: adaptation the biases skip); under AdamW they take the weights' lr, as in MoCo v3's and DINO's code.
    vit_recipe = vit_recipe_of(recipe, barlow_lr_biases=VIT_OPTIMIZER["base_learning_rate"])
    flags = (
        Flag("--barlow-lambda", float, 0.0051, "(new) Barlow Twins: weight of the off-diagonal terms (lambda)"),
        Flag("--barlow-lr-biases", float, None, "(new) Barlow Twins: base lr of biases and batch-norm "
             "parameters, x total batch / 256 (the weights take --base-learning-rate; recipe: 0.0048, ViT "
             "recipe: 1.5e-4, the weights')"),
    )

    def __init__(self, backbone: nn.Module, feat_dim: int, feature_dim: int = 8192, hidden_dim: int = 8192,
                 lambd: float = 0.0051, bias_lr: Optional[float] = None, view_batching: str = "separate") -> None:
        super().__init__(backbone, feat_dim, view_batching)
        self.head = build_mlp(feat_dim, hidden_dim, feature_dim, batch_norm=True, last_bias=False, num_layers=3,
                              hidden_bias=False)
        self.bn = nn.BatchNorm1d(feature_dim, affine=False)
        self.lambd = lambd
        self.bias_lr = bias_lr

    @classmethod
    def check_config(cls, cfg: MethodConfig) -> None:
        if not cfg.mlp_head:
            raise ValueError(f"{cls.name}'s projector is always an MLP; --no-mlp-head is not supported")
        if cfg.option("barlow_lambda") < 0:
            raise ValueError(f"--barlow-lambda must be >= 0, got {cfg.option('barlow_lambda')}")
        if cfg.option("barlow_lr_biases") < 0:
            raise ValueError(f"--barlow-lr-biases must be >= 0, got {cfg.option('barlow_lr_biases')}")

    @classmethod
    def from_config(cls, cfg: MethodConfig, num_instances: int) -> "BarlowTwins":
        backbone, feat_dim = cls.build_backbone(cfg)
        bias_lr = cfg.option("barlow_lr_biases") * cfg.total_batch_size / 256
        return cls(backbone, feat_dim, cfg.feature_dim, cfg.head_hidden_dim, cfg.option("barlow_lambda"), bias_lr,
                   cfg.view_batching)

    def param_groups(self, base_lr: float, weight_decay: float) -> List[dict]:
        """Weights (ndim >= 2) at the optimiser's lr; biases and batch-norm parameters at ``bias_lr``
        (the optimiser's lr when None), as the official ``param_weights`` / ``param_biases``."""
        params = [p for p in self.parameters() if p.requires_grad]
        biases = {"params": [p for p in params if p.ndim < 2]}
        if self.bias_lr is not None:
            biases["lr"] = self.bias_lr
        return [{"params": [p for p in params if p.ndim >= 2]}, biases]

    def training_loss(self, views: List[torch.Tensor], index: torch.Tensor) -> Dict[str, torch.Tensor]:
        z1, z2 = self.encode(lambda x: self.head(self.backbone(x)), views)
        with torch.autocast(device_type=z1.device.type, enabled=False):
            z1, z2 = self.bn(z1.float()), self.bn(z2.float())
            batch = z1.shape[0] * cd.get_world_size()
            loss = barlow_twins_loss(z1, z2, self.lambd, batch, cd.all_reduce_sum_with_grad)
        return {"loss": loss}
