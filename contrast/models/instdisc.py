"""InstDisc: non-parametric instance discrimination with a memory bank
(Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", CVPR 2018), softmax form as in the PIC release.

State kept identical on every rank:

* ``bank`` (N, D): one unit-norm row per instance, initialised from normal
  rows normalised with a generator seeded by ``seed`` (the same on every rank).
* negatives: for a step, K ids per sample are drawn uniformly (with
  replacement, the positive may occur) for the whole global batch (G, K) from a
  ``torch.Generator`` on the bank's device, and each rank takes its own rows. Every rank thus draws the same numbers, and the negatives do
  not depend on the world size (requires equal per-rank batches, i.e. drop_last).
* update: ``forward`` gathers the detached embeddings and indices of all ranks;
  ``on_train_step_end`` (after the optimiser step, so skipped steps leave the
  bank alone) applies ``M[i] <- normalize(m M[i] + (1 - m) z_i)``. When an index
  occurs several times in the gathered batch, its last occurrence in rank order
  is used.
* the negatives of the d-th draw come from a generator seeded by ``(seed, d)``; the draw count
  ``neg_draws`` is a buffer, so a resumed run draws the same negatives as an uninterrupted one.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from contrast import distributed as cd
from contrast.config import MethodConfig
from contrast.models.base import BaseMethod
from contrast.models.heads import MLP_HIDDEN_DIM, build_head, normalize_fp32
from contrast.models.losses import instdisc_loss
from contrast.models.recipe import Recipe
from contrast.models.views import Views


def draw_seed(seed: int, draw: int) -> int:
    """A 63-bit seed for draw ``draw`` of the run seeded ``seed`` (splitmix-style mixing)."""
    x = (seed * 0x9E3779B97F4A7C15 + (draw + 1) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x ^= x >> 31
    return x & ((1 << 63) - 1)


def last_occurrence(index: torch.Tensor) -> torch.Tensor:
    """Positions in ``index`` (G,) of the last occurrence of each distinct value."""
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    is_last = torch.ones_like(sorted_index, dtype=torch.bool)
    is_last[:-1] = sorted_index[1:] != sorted_index[:-1]
    return order[is_last]


class InstDisc(BaseMethod):
    """Backbone + head + memory bank (see the module docstring for the state)."""

    name = "InstDisc"
    views = Views(count=1)
    #: the release's scripts/InstDisc.sh (docs/methods.md cites each value)
    recipe = Recipe(aug="InstDisc", crop=0.2, mlp_head=True, contrast_temperature=0.07, contrast_momentum=0.5,
                    contrast_num_negative=65536, warmup_divisor=40)

    def __init__(self, backbone: nn.Module, feat_dim: int, num_instances: int, feature_dim: int = 128,
                 mlp_head: bool = False, temperature: float = 0.07, num_negative: int = 4096,
                 bank_momentum: float = 0.5, seed: int = 0, view_batching: str = "separate",
                 hidden_dim: int = MLP_HIDDEN_DIM) -> None:
        super().__init__(backbone, feat_dim, view_batching)
        if num_instances <= 0:
            raise ValueError(f"InstDisc needs a non-empty training set, got num_instances={num_instances}")
        if num_negative <= 0:
            raise ValueError(f"--contrast-num-negative must be > 0 for InstDisc, got {num_negative}")
        if not 0.0 <= bank_momentum < 1.0:
            raise ValueError(f"--contrast-momentum (bank momentum) must be in [0, 1), got {bank_momentum}")
        self.head = build_head(feat_dim, feature_dim, mlp_head, hidden_dim)
        self.temperature = temperature
        self.num_negative = num_negative
        self.bank_momentum = bank_momentum
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("bank", F.normalize(torch.randn(num_instances, feature_dim, generator=gen), dim=1))
        self.register_buffer("neg_draws", torch.zeros((), dtype=torch.long))
        self._pending: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    @classmethod
    def check_config(cls, cfg: MethodConfig) -> None:
        if cfg.num_negative < 1:
            raise ValueError(f"--contrast-num-negative must be >= 1 for {cls.name}, got {cfg.num_negative}")
        if not 0.0 <= cfg.momentum < 1.0:
            raise ValueError(f"--contrast-momentum (bank momentum) must be in [0, 1), got {cfg.momentum}")

    @classmethod
    def migrate_state(cls, state: Dict[str, Any], version: int) -> Dict[str, Any]:
        """Version 1 did not count the negative draws: the resumed run starts a fresh sequence."""
        if version == 1 and "bank" in state and "neg_draws" not in state:
            state = {**state, "neg_draws": torch.zeros((), dtype=torch.long)}
        return state

    @classmethod
    def from_config(cls, cfg: MethodConfig, num_instances: int) -> "InstDisc":
        backbone, feat_dim = cls.build_backbone(cfg)
        return cls(backbone, feat_dim, num_instances, cfg.feature_dim, cfg.mlp_head, cfg.temperature,
                   cfg.num_negative, cfg.momentum, cfg.seed, cfg.view_batching, cfg.head_hidden_dim)

    def draw_negatives(self, batch_size: int) -> torch.Tensor:
        """(B, K) uniform negative ids for this rank's B samples (see module docstring)."""
        device = self.bank.device
        gen = torch.Generator(device=device).manual_seed(draw_seed(self.seed, int(self.neg_draws)))
        self.neg_draws += 1
        world = cd.get_world_size()
        ids = torch.randint(self.bank.shape[0], (batch_size * world, self.num_negative), generator=gen,
                            device=device)
        rank = cd.get_rank()
        return ids[rank * batch_size:(rank + 1) * batch_size]

    def training_loss(self, views: List[torch.Tensor], index: torch.Tensor) -> Dict[str, torch.Tensor]:
        z = normalize_fp32(self.head(self.backbone(views[0])))
        neg_idx = self.draw_negatives(z.shape[0])
        with torch.autocast(device_type=z.device.type, enabled=False):
            loss = instdisc_loss(z, self.bank, index, neg_idx, self.temperature)
        with torch.no_grad():
            pos_sim = (z * self.bank[index]).sum(dim=1).mean()
            self._pending = (cd.all_gather_no_grad(z.detach()), cd.all_gather_no_grad(index))
        return {"loss": loss, "pos_sim": pos_sim}

    @torch.no_grad()
    def update_bank(self, z: torch.Tensor, index: torch.Tensor) -> None:
        """``M[i] <- normalize(m M[i] + (1 - m) z)`` for gathered (G, D) ``z`` and (G,) ``index``."""
        keep = last_occurrence(index)
        index, z = index[keep], z[keep].to(self.bank.dtype)
        m = self.bank_momentum
        self.bank[index] = F.normalize(m * self.bank[index] + (1.0 - m) * z, dim=1)

    @torch.no_grad()
    def on_train_step_end(self, step: int, lr: float, grad_scale: float = 1.0) -> None:
        if self._pending is not None:
            self.update_bank(*self._pending)
            self._pending = None
