"""MoCo v1 / v2 (He et al., "Momentum Contrast for Unsupervised Visual Representation Learning",
CVPR 2020; Chen et al., "Improved Baselines with Momentum Contrastive Learning", arXiv 2003.04297).

v1 and v2 differ only in flags: v2 = ``--mlp-head``, tau 0.2 and the MoCov2 augmentation. The loss
is asymmetric, as in both papers: ``views[0]`` gives the queries, ``views[1]`` the keys.

* key encoder: a :class:`~contrast.models.momentum.MomentumEncoder` of backbone + head, updated
  after each optimiser step (the same sequence as MoCo's update at the start of the next forward).
* shuffling BN: keys are encoded on a batch shuffled across ranks and unshuffled afterwards. In one
  process (where a shuffle alone changes no batch-norm statistic) the backbone's batch norms are
  :class:`~contrast.models.split_bn.SplitBatchNorm` over ``--bn-splits`` groups (default 8, as the
  MoCo authors' one-GPU demo, fewer for small batches), so the shuffled keys see other groups than the queries.
* queue (K, D): ``forward`` gathers the keys of all ranks in rank order; ``on_train_step_end``
  writes them (wrapping around modulo K), so every rank keeps the same queue.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import nn

from contrast import distributed as cd
from contrast.config import Flag, MethodConfig
from contrast.models.base import BaseMethod
from contrast.models.heads import MLP_HIDDEN_DIM, build_head, normalize_fp32
from contrast.models.losses import moco_loss
from contrast.models.momentum import MomentumEncoder
from contrast.models.queue import FeatureQueue
from contrast.models.split_bn import convert_split_batchnorm
from contrast.models.recipe import Recipe, replace, vit_recipe_of
from contrast.models.views import Views


#: The MoCo authors' one-GPU demo emulates 8 GPUs.
DEMO_BN_SPLITS = 8


def default_bn_splits(batch: int) -> int:
    """The demo's 8 groups, or the largest divisor of ``batch`` below 8 leaving >= 2 images per group
    (batch-norm statistics of a 1x1 feature map need two images)."""
    return max(s for s in range(1, DEMO_BN_SPLITS + 1) if batch % s == 0 and (batch // s >= 2 or s == 1))


class MoCo(BaseMethod):
    """Query encoder (``backbone``, ``head``), key encoder (``key_encoder``), ``queue``."""

    name = "MoCo"
    views = Views(count=2)
    #: MoCo v1: the release's scripts/MoCov1.sh (docs/methods.md cites each value)
    recipe = Recipe(aug="InstDisc", crop=0.2, contrast_temperature=0.07, contrast_momentum=0.999,
                    contrast_num_negative=65536, lr_scheduler="step", warmup_divisor=40)
    vit_recipe = vit_recipe_of(recipe)   # no published ViT recipe: MoCo v3's AdamW (docs/backbones.md)
    flags = (
        Flag("--bn-splits", int, None, "(new) MoCo in one process: batch norm over this many groups of the batch "
             "(SplitBatchNorm of the MoCo authors' one-GPU demo), so that shuffling BN has an effect; 1 turns it "
             "off; default: the demo's 8, or the largest divisor of the batch below it that leaves >= 2 images "
             "per group; ignored with several processes (the shuffle crosses ranks)"),
    )

    def __init__(self, backbone: nn.Module, feat_dim: int, feature_dim: int = 128, mlp_head: bool = False,
                 temperature: float = 0.07, momentum: float = 0.999, num_negative: int = 65536,
                 seed: int = 0, view_batching: str = "separate", hidden_dim: int = MLP_HIDDEN_DIM,
                 bn_splits: int = 1) -> None:
        super().__init__(convert_split_batchnorm(backbone, bn_splits), feat_dim, view_batching)
        if num_negative <= 0:
            raise ValueError(f"--contrast-num-negative (MoCo queue length) must be > 0, got {num_negative}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"--contrast-momentum must be in [0, 1], got {momentum}")
        self.head = build_head(feat_dim, feature_dim, mlp_head, hidden_dim)
        self.key_encoder = MomentumEncoder(self.backbone, self.head)
        self.queue = FeatureQueue(num_negative, (feature_dim,), seed=seed)
        self.temperature = temperature
        self.momentum = momentum
        self._pending_keys: Optional[torch.Tensor] = None

    @classmethod
    def check_config(cls, cfg: MethodConfig) -> None:
        if cfg.num_negative < 1:
            raise ValueError(f"--contrast-num-negative (queue length) must be >= 1 for {cls.name}, "
                             f"got {cfg.num_negative}")
        if not 0.0 <= cfg.momentum <= 1.0:
            raise ValueError(f"--contrast-momentum must be in [0, 1], got {cfg.momentum}")

    @classmethod
    def migrate_state(cls, state: Dict[str, Any], version: int) -> Dict[str, Any]:
        """Version 1 kept the key encoder as ``backbone_k.``/``head_k.`` and the queue as ``queue``/``queue_ptr``."""
        if version != 1:
            return state
        out = {}
        for k, v in state.items():
            for old, new in (("backbone_k.", "key_encoder.backbone."), ("head_k.", "key_encoder.head.")):
                if k.startswith(old):
                    k = new + k[len(old):]
            out[k] = v
        if "queue_ptr" in out and "queue" in out:
            out["queue.features"], out["queue.ptr"] = out.pop("queue"), out.pop("queue_ptr")
        return out

    @classmethod
    def from_config(cls, cfg: MethodConfig, num_instances: int) -> "MoCo":
        world = cd.get_world_size()
        batch = cfg.total_batch_size // world
        splits = cfg.option("bn_splits")
        if splits is None:
            splits = default_bn_splits(batch)
        if splits < 1:
            raise ValueError(f"MoCo: --bn-splits must be >= 1, got {splits}")
        splits = splits if world == 1 else 1   # several processes: the shuffle crosses ranks
        if batch % splits:
            raise ValueError(f"MoCo: --batch-size {batch} is not divisible by --bn-splits {splits} (one process "
                             f"emulates the batch norm of {splits} GPUs; --bn-splits 1 turns it off)")
        backbone, feat_dim = cls.build_backbone(cfg)
        return cls(backbone, feat_dim, cfg.feature_dim, cfg.mlp_head, cfg.temperature, cfg.momentum,
                   cfg.num_negative, cfg.seed, cfg.view_batching, cfg.head_hidden_dim, splits)

    @torch.no_grad()
    def encode_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (B, D) keys of images (B, 3, H, W) with shuffling BN."""
        shuffled, unshuffle = cd.batch_shuffle(x)
        return cd.batch_unshuffle(normalize_fp32(self.key_encoder(shuffled)), unshuffle)

    def training_loss(self, views: List[torch.Tensor], index: torch.Tensor) -> Dict[str, torch.Tensor]:
        q = normalize_fp32(self.head(self.backbone(views[0])))
        k = self.encode_keys(views[1])
        with torch.autocast(device_type=q.device.type, enabled=False):
            loss = moco_loss(q, k, self.queue.features, self.temperature)
        with torch.no_grad():
            pos_sim = (q * k).sum(dim=1).mean()
            self._pending_keys = cd.all_gather_no_grad(k)
        return {"loss": loss, "pos_sim": pos_sim}

    @torch.no_grad()
    def on_train_step_end(self, step: int, lr: float, grad_scale: float = 1.0) -> None:
        self.key_encoder.update(self.backbone, self.head, self.momentum)
        if self._pending_keys is not None:
            self.queue.enqueue(self._pending_keys)
            self._pending_keys = None


class MoCoV2(MoCo):
    """MoCo v2: the same model with the release's scripts/MoCov2.sh recipe (MLP head, tau 0.2, the
    MoCov2 augmentation, cosine schedule)."""

    name = "MoCov2"
    recipe = replace(MoCo.recipe, aug="MoCov2", mlp_head=True, contrast_temperature=0.2, lr_scheduler="cosine")
    vit_recipe = vit_recipe_of(recipe)   # no published ViT recipe: MoCo v3's AdamW (docs/backbones.md)
