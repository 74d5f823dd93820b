"""SimCLR (Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
ICML 2020).

NT-Xent over the global batch: the embeddings of both views are gathered from all ranks *with*
autograd (``contrast.distributed.all_gather_with_grad``) so the gradient that other ranks' anchors
send to this rank's rows is not lost. Batch norm runs over the global batch on several ranks
(``sync_batchnorm``). The two views are encoded in separate forward passes by default, as in the
PIC release (``--view-batching joint`` concatenates them, as SimCLR's own code does).
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from contrast import distributed as cd
from contrast.config import MethodConfig
from contrast.models.base import BaseMethod
from contrast.models.heads import MLP_HIDDEN_DIM, build_head, normalize_fp32
from contrast.models.losses import nt_xent_loss
from contrast.models.recipe import Recipe, vit_recipe_of
from contrast.models.views import Views


class SimCLR(BaseMethod):
    """Backbone + head trained with NT-Xent (batch norm synchronised across ranks)."""

    name = "SimCLR"
    views = Views(count=2)
    #: the release's scripts/SimCLR.sh (docs/methods.md cites each value)
    recipe = Recipe(aug="SimCLR", crop=0.08, mlp_head=True, contrast_temperature=0.1, optimizer="lars",
                    base_learning_rate=0.3, weight_decay=1e-6, warmup_divisor=40, sync_batchnorm=True)
    vit_recipe = vit_recipe_of(recipe)   # no published ViT recipe: MoCo v3's AdamW (docs/backbones.md)

    def __init__(self, backbone: nn.Module, feat_dim: int, feature_dim: int = 128, mlp_head: bool = True,
                 temperature: float = 0.1, view_batching: str = "separate", hidden_dim: int = MLP_HIDDEN_DIM) -> None:
        super().__init__(backbone, feat_dim, view_batching)
        self.head = build_head(feat_dim, feature_dim, mlp_head, hidden_dim)
        self.temperature = temperature

    @classmethod
    def from_config(cls, cfg: MethodConfig, num_instances: int) -> "SimCLR":
        backbone, feat_dim = cls.build_backbone(cfg)
        return cls(backbone, feat_dim, cfg.feature_dim, cfg.mlp_head, cfg.temperature, cfg.view_batching,
                   cfg.head_hidden_dim)

    def training_loss(self, views: List[torch.Tensor], index: torch.Tensor) -> Dict[str, torch.Tensor]:
        z1, z2 = [normalize_fp32(y) for y in self.encode(lambda x: self.head(self.backbone(x)), views)]
        z1_all = cd.all_gather_with_grad(z1)
        z2_all = cd.all_gather_with_grad(z2)
        with torch.autocast(device_type=z1.device.type, enabled=False):
            loss = nt_xent_loss(z1, z2, z1_all, z2_all, cd.get_rank() * z1.shape[0], self.temperature)
        with torch.no_grad():
            pos_sim = (z1 * z2).sum(dim=1).mean()
        return {"loss": loss, "pos_sim": pos_sim}
