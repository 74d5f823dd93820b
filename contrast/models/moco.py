"""MoCo v1 / v2 (He et al., "Momentum Contrast for Unsupervised Visual
Representation Learning", CVPR 2020; Chen et al., "Improved Baselines with
Momentum Contrastive Learning", arXiv 2003.04297).

v1 and v2 differ only in flags: v2 = ``--mlp-head``, tau 0.2 and the MoCov2
augmentation. The loss is asymmetric, as in both papers: ``views[0]`` gives the
queries, ``views[1]`` the keys.

* key encoder: a deep copy of backbone + head, never trained by gradients;
  after each optimiser step ``xi <- m xi + (1 - m) theta`` (``on_train_step_end``,
  which is the same sequence as MoCo's update at the start of the next forward).
* shuffling BN: keys are encoded on a batch shuffled across ranks
  (``contrast.distributed.batch_shuffle``) and unshuffled afterwards.
* queue (K, D): ``forward`` gathers the keys of all ranks in rank order;
  ``on_train_step_end`` writes them at ``queue_ptr`` (wrapping around modulo K).
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from contrast import distributed as cd
from contrast.models.base import BaseMethod
from contrast.models.heads import build_head, normalize_fp32
from contrast.models.losses import moco_loss


class MoCo(BaseMethod):
    """Query encoder (``backbone``, ``head``), key encoder (``backbone_k``, ``head_k``), queue."""

    def __init__(self, backbone: nn.Module, feat_dim: int, feature_dim: int = 128, mlp_head: bool = False,
                 temperature: float = 0.07, momentum: float = 0.999, num_negative: int = 65536,
                 seed: int = 0) -> None:
        super().__init__()
        if num_negative <= 0:
            raise ValueError(f"--contrast-num-negative (MoCo queue length) must be > 0, got {num_negative}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"--contrast-momentum must be in [0, 1], got {momentum}")
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.head = build_head(feat_dim, feature_dim, mlp_head)
        self.backbone_k = copy.deepcopy(backbone)
        self.head_k = copy.deepcopy(self.head)
        for p in list(self.backbone_k.parameters()) + list(self.head_k.parameters()):
            p.requires_grad_(False)
        self.temperature = temperature
        self.momentum = momentum
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("queue", F.normalize(torch.randn(num_negative, feature_dim, generator=gen), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._pending_keys: Optional[torch.Tensor] = None

    def _query_and_key_params(self):
        return zip(list(self.backbone.parameters()) + list(self.head.parameters()),
                   list(self.backbone_k.parameters()) + list(self.head_k.parameters()))

    @torch.no_grad()
    def encode_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (B, D) keys of images (B, 3, H, W) with shuffling BN."""
        shuffled, unshuffle = cd.batch_shuffle(x)
        k = normalize_fp32(self.head_k(self.backbone_k(shuffled)))
        return cd.batch_unshuffle(k, unshuffle)

    def forward(self, views: List[torch.Tensor], index: torch.Tensor) -> Dict[str, torch.Tensor]:
        if len(views) != 2:
            raise ValueError(f"MoCo takes two views per image, got {len(views)} (use --aug MoCo or MoCov2)")
        q = normalize_fp32(self.head(self.backbone(views[0])))
        k = self.encode_keys(views[1])
        with torch.autocast(device_type=q.device.type, enabled=False):
            loss = moco_loss(q, k, self.queue, self.temperature)
        with torch.no_grad():
            pos_sim = (q * k).sum(dim=1).mean()
            self._pending_keys = cd.all_gather_no_grad(k)
        return {"loss": loss, "pos_sim": pos_sim}

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``xi <- m xi + (1 - m) theta`` for every key-encoder parameter; BN buffers are the key
        encoder's own (as in MoCo)."""
        for theta, xi in self._query_and_key_params():
            xi.mul_(self.momentum).add_(theta.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write (G, D) gathered ``keys`` at the queue pointer, wrapping modulo K."""
        size = self.queue.shape[0]
        if keys.shape[0] > size:
            raise ValueError(f"MoCo queue (--contrast-num-negative {size}) is shorter than the global batch "
                             f"({keys.shape[0]})")
        pos = (self.queue_ptr + torch.arange(keys.shape[0], device=self.queue.device)) % size
        self.queue[pos] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    @torch.no_grad()
    def on_train_step_end(self, step: int, lr: float, grad_scale: float = 1.0) -> None:
        self.momentum_update()
        if self._pending_keys is not None:
            self.enqueue(self._pending_keys)
            self._pending_keys = None
