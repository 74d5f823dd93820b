"""MoCo v3 (Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers",
ICCV 2021), the ResNet form of its official code (facebookresearch/moco-v3, ``moco/builder.py``).

* online: backbone -> projector (``head``: 2 layers, Linear -> BN -> ReLU -> Linear -> BN without
  affine, all Linear without bias) -> ``predictor`` (2 layers, no last BN); hidden 4096, output 256.
* momentum encoder: a :class:`~contrast.models.momentum.MomentumEncoder` copy of backbone +
  projector, ``m_k = 1 - (1 - m_0)(1 + cos(pi k / K)) / 2`` per iteration (``--contrast-momentum`` = m_0).
  The official code updates it at the start of iteration k, before computing the keys; here it is
  updated after optimiser step k - 1 with ``m_k``, which gives the same keys.
* loss: :func:`~contrast.models.losses.mocov3_loss`, symmetric InfoNCE of each view's queries against
  the other view's keys of the global batch (gathered without gradient), scaled by 2 tau.
* batch norm over the global batch on several ranks (``sync_batchnorm``), as the official code.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from contrast import distributed as cd
from contrast.config import MethodConfig
from contrast.models.base import BaseMethod
from contrast.models.bn_mlp import build_bn_mlp
from contrast.models.losses import mocov3_loss
from contrast.models.momentum import MomentumEncoder, cosine_momentum
from contrast.models.recipe import Recipe
from contrast.models.views import Views


class MoCov3(BaseMethod):
    """Online ``backbone``, ``head`` (projector), ``predictor``; momentum ``key_encoder``."""

    name = "MoCov3"
    views = Views(count=2)
    #: facebookresearch/moco-v3 main_moco.py defaults + CONFIG.md's ResNet-50 100-epoch command
    #: (docs/methods.md cites each value)
    recipe = Recipe(aug="BYOL", crop=0.2, mlp_head=True, feature_dim=256, mlp_hidden_dim=4096,
                    contrast_temperature=1.0, contrast_momentum=0.99, optimizer="lars", base_learning_rate=0.6,
                    weight_decay=1e-6, momentum=0.9, lr_scheduler="cosine", warmup_epoch=10,
                    warmup_multiplier=1e6, sync_batchnorm=True)

    def __init__(self, backbone: nn.Module, feat_dim: int, feature_dim: int = 256, hidden_dim: int = 4096,
                 temperature: float = 1.0, base_momentum: float = 0.99, view_batching: str = "separate") -> None:
        super().__init__(backbone, feat_dim, view_batching)
        self.head = build_bn_mlp([feat_dim, hidden_dim, feature_dim], last_bn=True)
        self.predictor = build_bn_mlp([feature_dim, hidden_dim, feature_dim])
        # not "target": TrainModule.target(index, label) is a hook of the loop
        self.key_encoder = MomentumEncoder(self.backbone, self.head)
        self.temperature = temperature
        self.base_momentum = base_momentum
        self.total_steps = 0

    @classmethod
    def check_config(cls, cfg: MethodConfig) -> None:
        if not cfg.mlp_head:
            raise ValueError(f"{cls.name}'s projector is always an MLP; --no-mlp-head is not supported")
        if not 0.0 <= cfg.momentum <= 1.0:
            raise ValueError(f"--contrast-momentum ({cls.name}'s base key-encoder momentum) must be in [0, 1], "
                             f"got {cfg.momentum}")
        if cfg.temperature <= 0:
            raise ValueError(f"--contrast-temperature must be > 0, got {cfg.temperature}")

    @classmethod
    def from_config(cls, cfg: MethodConfig, num_instances: int) -> "MoCov3":
        backbone, feat_dim = cls.build_backbone(cfg)
        return cls(backbone, feat_dim, cfg.feature_dim, cfg.head_hidden_dim, cfg.temperature, cfg.momentum,
                   cfg.view_batching)

    def on_train_start(self, total_steps: int, steps_per_epoch: int) -> None:
        self.total_steps = total_steps

    def momentum_at(self, k: int) -> float:
        """m of iteration ``k`` (the constant base before ``on_train_start`` gave K)."""
        if self.total_steps <= 0:
            return self.base_momentum
        return cosine_momentum(k, self.total_steps, self.base_momentum)

    def training_loss(self, views: List[torch.Tensor], index: torch.Tensor) -> Dict[str, torch.Tensor]:
        q1, q2 = self.encode(lambda x: self.predictor(self.head(self.backbone(x))), views)
        with torch.no_grad():
            k1, k2 = [cd.all_gather_no_grad(k) for k in self.encode(self.key_encoder, views)]
        with torch.autocast(device_type=q1.device.type, enabled=False):
            loss = mocov3_loss(q1, q2, k1, k2, cd.get_rank() * q1.shape[0], self.temperature)
        return {"loss": loss}

    @torch.no_grad()
    def on_train_step_end(self, step: int, lr: float, grad_scale: float = 1.0) -> None:
        self.key_encoder.update(self.backbone, self.head, self.momentum_at(step + 1))
