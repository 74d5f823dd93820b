"""BYOL (Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning",
NeurIPS 2020).

* online network: backbone -> projector -> predictor, both MLPs Linear -> BatchNorm1d -> ReLU ->
  Linear (hidden 4096, output 256, no bias on the output layer, as the reference code).
* target network: a :class:`~contrast.models.momentum.MomentumEncoder` copy of backbone +
  projector, updated after each optimiser step with ``tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2``
  (``--contrast-momentum`` = tau_base, K = the run's total number of steps from ``on_train_start``).
* loss: :func:`~contrast.models.losses.byol_loss`, symmetric normalised MSE between the online
  prediction of one view and the target projection of the other; no negatives, so nothing is
  gathered: each rank's loss is a mean over its samples, DDP averages the gradients.
* batch norm over the global batch on several ranks (``sync_batchnorm``), as the paper.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from contrast.config import MethodConfig
from contrast.models.base import BaseMethod
from contrast.models.heads import build_mlp
from contrast.models.losses import byol_loss
from contrast.models.momentum import MomentumEncoder
from contrast.models.recipe import Recipe, vit_recipe_of
from contrast.models.views import Views


class BYOL(BaseMethod):
    """Online ``backbone``, ``head`` (projector), ``predictor``; EMA ``target_encoder``."""

    name = "BYOL"
    views = Views(count=2)
    #: deepmind-research/byol, configs/byol.py at 1000 epochs (docs/methods.md cites each value)
    recipe = Recipe(aug="BYOL", crop=0.08, mlp_head=True, feature_dim=256, mlp_hidden_dim=4096,
                    contrast_momentum=0.996, optimizer="lars", base_learning_rate=0.2, weight_decay=1.5e-6,
                    warmup_epoch=10, warmup_multiplier=1e6, lr_scheduler="cosine", sync_batchnorm=True)
    vit_recipe = vit_recipe_of(recipe)   # no published ViT recipe: MoCo v3's AdamW (docs/backbones.md)

    def __init__(self, backbone: nn.Module, feat_dim: int, feature_dim: int = 256, hidden_dim: int = 4096,
                 base_momentum: float = 0.996, view_batching: str = "separate") -> None:
        super().__init__(backbone, feat_dim, view_batching)
        if not 0.0 <= base_momentum <= 1.0:
            raise ValueError(f"--contrast-momentum (BYOL's base target decay) must be in [0, 1], got {base_momentum}")
        self.head = build_mlp(feat_dim, hidden_dim, feature_dim, batch_norm=True, last_bias=False)
        self.predictor = build_mlp(feature_dim, hidden_dim, feature_dim, batch_norm=True, last_bias=False)
        # not "target": TrainModule.target(index, label) is a hook of the loop
        self.target_encoder = MomentumEncoder(self.backbone, self.head, base_momentum)

    @classmethod
    def check_config(cls, cfg: MethodConfig) -> None:
        if not cfg.mlp_head:
            raise ValueError(f"{cls.name}'s projector is always an MLP; --no-mlp-head is not supported")
        if not 0.0 <= cfg.momentum <= 1.0:
            raise ValueError(f"--contrast-momentum ({cls.name}'s base target decay) must be in [0, 1], "
                             f"got {cfg.momentum}")

    @classmethod
    def from_config(cls, cfg: MethodConfig, num_instances: int) -> "BYOL":
        backbone, feat_dim = cls.build_backbone(cfg)
        return cls(backbone, feat_dim, cfg.feature_dim, cfg.head_hidden_dim, cfg.momentum, cfg.view_batching)

    def on_train_start(self, total_steps: int, steps_per_epoch: int) -> None:
        self.target_encoder.start(total_steps)

    def training_loss(self, views: List[torch.Tensor], index: torch.Tensor) -> Dict[str, torch.Tensor]:
        p1, p2 = self.encode(lambda x: self.predictor(self.head(self.backbone(x))), views)
        with torch.no_grad():
            z1, z2 = self.encode(self.target_encoder, views)
        with torch.autocast(device_type=p1.device.type, enabled=False):
            loss = byol_loss(p1, p2, z1, z2)
        return {"loss": loss}

    @torch.no_grad()
    def on_train_step_end(self, step: int, lr: float, grad_scale: float = 1.0) -> None:
        self.target_encoder.update(self.backbone, self.head, self.target_encoder.momentum_at(step))
