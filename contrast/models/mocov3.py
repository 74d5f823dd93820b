"""MoCo v3 (Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers",
ICCV 2021), as its official code (facebookresearch/moco-v3, ``moco/builder.py``).

* online: backbone -> projector (``head``: Linear -> BN -> ReLU blocks, then Linear -> BN without
  affine, all Linear without bias) -> ``predictor`` (2 layers); hidden 4096, output 256. The heads
  follow the recipe (``--mocov3-proj-layers``, ``--mocov3-pred-last-bn``): ``MoCo_ResNet``'s 2-layer
  projector and predictor without last BN, ``MoCo_ViT``'s 3-layer projector and predictor with it.
* momentum encoder: a :class:`~contrast.models.momentum.MomentumEncoder` copy of backbone +
  projector, ``m_k = 1 - (1 - m_0)(1 + cos(pi k / K)) / 2`` per iteration (``--contrast-momentum`` = m_0).
  The official code updates it at the start of iteration k, before computing the keys; here it is
  updated after optimiser step k - 1 with ``m_k``, which gives the same keys.
* loss: :func:`~contrast.models.losses.mocov3_loss`, symmetric InfoNCE of each view's queries against
  the other view's keys of the global batch (gathered without gradient), scaled by 2 tau.
* batch norm over the global batch on several ranks (``sync_batchnorm``), as the official code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
from torch import nn

from contrast import distributed as cd
from contrast.config import Flag, MethodConfig
from contrast.models.base import BaseMethod
from contrast.models.bn_mlp import build_bn_mlp
from contrast.models.losses import mocov3_loss
from contrast.models.momentum import MomentumEncoder
from contrast.models.recipe import Recipe
from contrast.models.views import Views


@dataclass(frozen=True)
class MoCov3Recipe(Recipe):
    """:class:`Recipe` with the defaults of MoCo v3's head flags (builder.py ``MoCo_ResNet``)."""

    mocov3_proj_layers: int = 2
    mocov3_pred_last_bn: bool = False


class MoCov3(BaseMethod):
    """Online ``backbone``, ``head`` (projector), ``predictor``; momentum ``key_encoder``."""

    name = "MoCov3"
    views = Views(count=2)
    #: facebookresearch/moco-v3 main_moco.py defaults + CONFIG.md's ResNet-50 100-epoch command
    #: (docs/methods.md cites each value)
    recipe = MoCov3Recipe(aug="BYOL", crop=0.2, mlp_head=True, feature_dim=256, mlp_hidden_dim=4096,
                          contrast_temperature=1.0, contrast_momentum=0.99, optimizer="lars", base_learning_rate=0.6,
                          weight_decay=1e-6, momentum=0.9, lr_scheduler="cosine", warmup_epoch=10,
                          warmup_multiplier=1e6, sync_batchnorm=True)
    #: main_moco.py defaults + CONFIG.md's ViT-Small 300-epoch command (--optimizer=adamw --lr=1.5e-4
    #: --weight-decay=.1 --warmup-epochs=40 --stop-grad-conv1 --moco-m-cos --moco-t=.2; crop-min 0.08) and
    #: builder.py's MoCo_ViT heads (docs/backbones.md cites each value)
    vit_recipe = MoCov3Recipe(aug="BYOL", crop=0.08, mlp_head=True, feature_dim=256, mlp_hidden_dim=4096,
                              contrast_temperature=0.2, contrast_momentum=0.99, optimizer="adamw",
                              base_learning_rate=1.5e-4, lr_scaling="linear", weight_decay=0.1, lr_scheduler="cosine",
                              warmup_epoch=40, warmup_multiplier=1e6, drop_path=0.0, global_pool="token",
                              freeze_patch_embed=True, sync_batchnorm=True, mocov3_proj_layers=3,
                              mocov3_pred_last_bn=True)
    flags = (
        Flag("--mocov3-proj-layers", int, None, "(new) MoCo v3: Linear layers of the projector (recipe: 2, "
             "builder.py MoCo_ResNet; ViT recipe: 3, MoCo_ViT)"),
        Flag("--mocov3-pred-last-bn", bool, None, "(new) MoCo v3: batch norm without affine after the predictor "
             "(recipe: off, MoCo_ResNet; ViT recipe: on, MoCo_ViT)"),
    )

    def __init__(self, backbone: nn.Module, feat_dim: int, feature_dim: int = 256, hidden_dim: int = 4096,
                 temperature: float = 1.0, base_momentum: float = 0.99, view_batching: str = "separate",
                 proj_layers: int = 2, pred_last_bn: bool = False) -> None:
        super().__init__(backbone, feat_dim, view_batching)
        self.head = build_bn_mlp([feat_dim] + [hidden_dim] * (proj_layers - 1) + [feature_dim], last_bn=True)
        self.predictor = build_bn_mlp([feature_dim, hidden_dim, feature_dim], last_bn=pred_last_bn)
        # not "target": TrainModule.target(index, label) is a hook of the loop
        self.key_encoder = MomentumEncoder(self.backbone, self.head, base_momentum)
        self.temperature = temperature

    @classmethod
    def check_config(cls, cfg: MethodConfig) -> None:
        if not cfg.mlp_head:
            raise ValueError(f"{cls.name}'s projector is always an MLP; --no-mlp-head is not supported")
        if not 0.0 <= cfg.momentum <= 1.0:
            raise ValueError(f"--contrast-momentum ({cls.name}'s base key-encoder momentum) must be in [0, 1], "
                             f"got {cfg.momentum}")
        if cfg.temperature <= 0:
            raise ValueError(f"--contrast-temperature must be > 0, got {cfg.temperature}")
        if cfg.option("mocov3_proj_layers") < 2:
            raise ValueError(f"--mocov3-proj-layers must be >= 2, got {cfg.option('mocov3_proj_layers')}")

    @classmethod
    def from_config(cls, cfg: MethodConfig, num_instances: int) -> "MoCov3":
        backbone, feat_dim = cls.build_backbone(cfg)
        return cls(backbone, feat_dim, cfg.feature_dim, cfg.head_hidden_dim, cfg.temperature, cfg.momentum,
                   cfg.view_batching, cfg.option("mocov3_proj_layers"), cfg.option("mocov3_pred_last_bn"))

    def on_train_start(self, total_steps: int, steps_per_epoch: int) -> None:
        self.key_encoder.start(total_steps)

    def training_loss(self, views: List[torch.Tensor], index: torch.Tensor) -> Dict[str, torch.Tensor]:
        q1, q2 = self.encode(lambda x: self.predictor(self.head(self.backbone(x))), views)
        with torch.no_grad():
            k1, k2 = [cd.all_gather_no_grad(k) for k in self.encode(self.key_encoder, views)]
        with torch.autocast(device_type=q1.device.type, enabled=False):
            loss = mocov3_loss(q1, q2, k1, k2, cd.get_rank() * q1.shape[0], self.temperature)
        return {"loss": loss}

    @torch.no_grad()
    def on_train_step_end(self, step: int, lr: float, grad_scale: float = 1.0) -> None:
        self.key_encoder.update(self.backbone, self.head, self.key_encoder.momentum_at(step + 1))
