"""VICReg (Bardes, Ponce, LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning", ICLR 2022; facebookresearch/vicreg ``main_vicreg.py``).

* projector ("expander"): 3 layers, Linear -> BatchNorm1d -> ReLU twice, then Linear without bias
  (``--mlp-hidden-dim`` hidden, ``--feature-dim`` output: 8192-8192-8192).
* loss: :func:`~contrast.models.losses.vicreg_loss`. The invariance term is a mean over this rank's
  samples (DDP's average makes it the global mean); the variance and covariance terms are computed
  on the embeddings of all ranks, gathered with autograd (``all_gather_with_grad``, the official
  ``FullGatherLayer``: its backward sums the gradients over ranks), so after DDP's average the
  gradient equals one process's on the whole batch, as in the official code.
* batch norm over the global batch on several ranks (``sync_batchnorm``); LARS leaves biases and
  batch-norm parameters out of decay and adaptation.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from contrast import distributed as cd
from contrast.config import Flag, MethodConfig
from contrast.models.base import BaseMethod
from contrast.models.heads import build_mlp
from contrast.models.losses import vicreg_loss
from contrast.models.recipe import Recipe, vit_recipe_of
from contrast.models.views import Views

_COEFFS = ("vicreg_sim_coeff", "vicreg_std_coeff", "vicreg_cov_coeff")


class VICReg(BaseMethod):
    """``backbone`` and ``head`` (3-layer projector)."""

    name = "VICReg"
    views = Views(count=2)
    #: facebookresearch/vicreg main_vicreg.py, augmentations.py and README (docs/methods.md cites each value)
    recipe = Recipe(aug="BYOL", crop=0.08, mlp_head=True, feature_dim=8192, mlp_hidden_dim=8192, optimizer="lars",
                    base_learning_rate=0.2, weight_decay=1e-6, warmup_epoch=10, warmup_multiplier=1e6,
                    lr_scheduler="cosine", sync_batchnorm=True)
    vit_recipe = vit_recipe_of(recipe)   # no published ViT recipe: MoCo v3's AdamW (docs/backbones.md)
    flags = (
        Flag("--vicreg-sim-coeff", float, 25.0, "(new) VICReg: weight of the invariance (MSE) term"),
        Flag("--vicreg-std-coeff", float, 25.0, "(new) VICReg: weight of the variance (hinge on the std) term"),
        Flag("--vicreg-cov-coeff", float, 1.0, "(new) VICReg: weight of the covariance term"),
    )

    def __init__(self, backbone: nn.Module, feat_dim: int, feature_dim: int = 8192, hidden_dim: int = 8192,
                 sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0,
                 view_batching: str = "separate") -> None:
        super().__init__(backbone, feat_dim, view_batching)
        self.head = build_mlp(feat_dim, hidden_dim, feature_dim, batch_norm=True, last_bias=False, num_layers=3)
        self.coeffs = (sim_coeff, std_coeff, cov_coeff)

    @classmethod
    def check_config(cls, cfg: MethodConfig) -> None:
        if not cfg.mlp_head:
            raise ValueError(f"{cls.name}'s projector is always an MLP; --no-mlp-head is not supported")
        for name in _COEFFS:
            if cfg.option(name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {cfg.option(name)}")

    @classmethod
    def from_config(cls, cfg: MethodConfig, num_instances: int) -> "VICReg":
        backbone, feat_dim = cls.build_backbone(cfg)
        return cls(backbone, feat_dim, cfg.feature_dim, cfg.head_hidden_dim, *[cfg.option(n) for n in _COEFFS],
                   view_batching=cfg.view_batching)

    def training_loss(self, views: List[torch.Tensor], index: torch.Tensor) -> Dict[str, torch.Tensor]:
        z1, z2 = self.encode(lambda x: self.head(self.backbone(x)), views)
        with torch.autocast(device_type=z1.device.type, enabled=False):
            z1, z2 = z1.float(), z2.float()
            loss, invariance, variance, covariance = vicreg_loss(
                z1, z2, cd.all_gather_with_grad(z1), cd.all_gather_with_grad(z2), *self.coeffs)
        return {"loss": loss, "invariance": invariance.detach(), "variance": variance.detach(),
                "covariance": covariance.detach()}
