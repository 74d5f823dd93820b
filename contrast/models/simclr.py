"""SimCLR (Chen et al., "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020).

NT-Xent over the global batch: the embeddings of both views are gathered from
all ranks *with* autograd (``contrast.distributed.all_gather_with_grad``) so the
gradient that other ranks' anchors send to this rank's rows is not lost. Both
views go through the backbone as one batch, as in the SimCLR implementation;
``build_method`` converts BatchNorm to SyncBatchNorm when running on several ranks.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from contrast import distributed as cd
from contrast.models.backbones import encode_views
from contrast.models.base import BaseMethod
from contrast.models.heads import build_head, normalize_fp32
from contrast.models.losses import nt_xent_loss


class SimCLR(BaseMethod):
    """Backbone + head trained with NT-Xent (batch norm synchronised across ranks)."""

    sync_batchnorm = True

    def __init__(self, backbone: nn.Module, feat_dim: int, feature_dim: int = 128, mlp_head: bool = True,
                 temperature: float = 0.1) -> None:
        super().__init__()
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.head = build_head(feat_dim, feature_dim, mlp_head)
        self.temperature = temperature

    def forward(self, views: List[torch.Tensor], index: torch.Tensor) -> Dict[str, torch.Tensor]:
        if len(views) != 2:
            raise ValueError(f"SimCLR takes two views per image, got {len(views)} (use --aug SimCLR)")
        z1, z2 = [normalize_fp32(y) for y in encode_views(lambda x: self.head(self.backbone(x)), views)]
        z1_all = cd.all_gather_with_grad(z1)
        z2_all = cd.all_gather_with_grad(z2)
        with torch.autocast(device_type=z1.device.type, enabled=False):
            loss = nt_xent_loss(z1, z2, z1_all, z2_all, cd.get_rank() * z1.shape[0], self.temperature)
        with torch.no_grad():
            pos_sim = (z1 * z2).sum(dim=1).mean()
        return {"loss": loss, "pos_sim": pos_sim}
