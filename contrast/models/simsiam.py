"""SimSiam (Chen, He, "Exploring Simple Siamese Representation Learning", CVPR 2021), as its official
code (facebookresearch/simsiam, ``simsiam/builder.py``, ``main_simsiam.py``).

* encoder: backbone -> projector (``head``, 3 layers): Linear -> BN -> ReLU -> Linear -> BN -> ReLU ->
  Linear -> BN without affine, hidden ``--mlp-hidden-dim`` (2048), output ``--feature-dim`` (2048).
* ``predictor``: bottleneck Linear(2048, 512) -> BN -> ReLU -> Linear(512, 2048) with bias.
* loss: :func:`~contrast.models.losses.simsiam_loss`, symmetric negative cosine between each view's
  prediction and the other view's projection under stop-gradient. No negatives and no momentum
  encoder; each rank's loss is a mean over its samples, DDP averages the gradients.
* ``--simsiam-fix-pred-lr`` (on, as the official ImageNet command): the predictor keeps the peak lr
  (a ``constant_lr`` parameter group), the rest follows the cosine schedule.
* batch norm over the global batch on several ranks (``sync_batchnorm``), as the official code.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from contrast.config import Flag, MethodConfig
from contrast.models.base import BaseMethod
from contrast.models.bn_mlp import build_bn_mlp
from contrast.models.losses import simsiam_loss
from contrast.models.recipe import Recipe, vit_recipe_of
from contrast.models.views import Views


class SimSiam(BaseMethod):
    """``backbone``, ``head`` (projector) and ``predictor``; no target network."""

    name = "SimSiam"
    views = Views(count=2)
    #: facebookresearch/simsiam main_simsiam.py defaults and README's ImageNet command (docs/methods.md cites
    #: each value)
    recipe = Recipe(aug="MoCov2", crop=0.2, mlp_head=True, feature_dim=2048, mlp_hidden_dim=2048, optimizer="sgd",
                    base_learning_rate=0.05, weight_decay=1e-4, momentum=0.9, lr_scheduler="cosine", warmup_epoch=0,
                    sync_batchnorm=True)
    vit_recipe = vit_recipe_of(recipe)   # no published ViT recipe: MoCo v3's AdamW (docs/backbones.md)
    flags = (
        Flag("--simsiam-pred-dim", int, 512, "(new) SimSiam: hidden width of the predictor (its bottleneck)"),
        Flag("--simsiam-fix-pred-lr", bool, True, "(new) SimSiam: the predictor keeps the peak lr throughout "
             "(the official --fix-pred-lr of its ImageNet command)"),
    )

    def __init__(self, backbone: nn.Module, feat_dim: int, feature_dim: int = 2048, hidden_dim: int = 2048,
                 pred_dim: int = 512, fix_pred_lr: bool = True, view_batching: str = "separate") -> None:
        super().__init__(backbone, feat_dim, view_batching)
        self.head = build_bn_mlp([feat_dim, hidden_dim, hidden_dim, feature_dim], last_bn=True)
        self.predictor = build_bn_mlp([feature_dim, pred_dim, feature_dim], last_bias=True)
        self.fix_pred_lr = fix_pred_lr

    @classmethod
    def check_config(cls, cfg: MethodConfig) -> None:
        if not cfg.mlp_head:
            raise ValueError(f"{cls.name}'s projector is always an MLP; --no-mlp-head is not supported")
        if cfg.option("simsiam_pred_dim") <= 0:
            raise ValueError(f"--simsiam-pred-dim must be > 0, got {cfg.option('simsiam_pred_dim')}")

    @classmethod
    def from_config(cls, cfg: MethodConfig, num_instances: int) -> "SimSiam":
        backbone, feat_dim = cls.build_backbone(cfg)
        return cls(backbone, feat_dim, cfg.feature_dim, cfg.head_hidden_dim, cfg.option("simsiam_pred_dim"),
                   cfg.option("simsiam_fix_pred_lr"), cfg.view_batching)

    def param_groups(self, base_lr: float, weight_decay: float) -> List[dict]:
        """With ``--simsiam-fix-pred-lr``: the predictor in its own group at the constant peak lr
        ``base_lr`` (same weight decay), as the official ``fix_lr`` group."""
        if not self.fix_pred_lr:
            return super().param_groups(base_lr, weight_decay)
        pred = {id(p) for p in self.predictor.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in pred]
        return [{"params": rest},
                {"params": list(self.predictor.parameters()), "lr": base_lr, "weight_decay": weight_decay,
                 "constant_lr": True}]

    def training_loss(self, views: List[torch.Tensor], index: torch.Tensor) -> Dict[str, torch.Tensor]:
        z1, z2 = self.encode(lambda x: self.head(self.backbone(x)), views)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with torch.autocast(device_type=p1.device.type, enabled=False):
            loss = simsiam_loss(p1, p2, z1, z2)
        with torch.no_grad():   # collapse monitor: SimSiam paper Fig. 2 (std of the normalised output)
            z_std = torch.nn.functional.normalize(z1.float(), dim=1).std(dim=0).mean()
        return {"loss": loss, "z_std": z_std}
