"""InstDisc: non-parametric instance discrimination with a memory bank
(Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", CVPR 2018), softmax form as in the PIC release.

State kept identical on every rank:

* ``bank`` (N, D): one unit-norm row per instance, initialised from normal
  rows normalised with a generator seeded by ``seed`` (the same on every rank).
* negatives: for a step, K ids per sample are drawn uniformly (with
  replacement, the positive may occur). Draw ``j`` of the sample at global batch
  position ``p = rank * B + i`` in the run's ``d``-th step is a counter-based hash
  (Philox4x32-10, :func:`philox4x32`) of the counter ``(j, p, d)`` under the key
  ``seed``, mapped to ``[0, N)`` (:func:`counter_negatives`). Each rank computes only
  its own (B, K) rows on its device, and the negatives do not depend on the world
  size (requires equal per-rank batches, i.e. drop_last).
* update: ``forward`` gathers the detached embeddings and indices of all ranks;
  ``on_train_step_end`` (after the optimiser step, so skipped steps leave the
  bank alone) applies ``M[i] <- normalize(m M[i] + (1 - m) z_i)``. When an index
  occurs several times in the gathered batch, its last occurrence in rank order
  is used.
* the step counter ``d`` is the buffer ``neg_draws`` (in the checkpoint, kept on the bank's
  device and read there, never on the host), so a resumed run draws the same negatives as an
  uninterrupted one.
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
from contrast.models.recipe import Recipe, vit_recipe_of
from contrast.models.views import Views
from contrast.seeding import MASK32, philox4x32, philox_key


def counter_negatives(seed: int, step: torch.Tensor, positions: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """(len(positions), k) ids in ``[0, n)``: draw ``j`` of global position ``p`` in step ``step``.

    ``step`` is a 0-dim int64 tensor (read on its device, no host sync). Each pair of draws
    ``(2m, 2m + 1)`` is one Philox4x32-10 block of the counter ``(m, p, step_lo, step_hi)``
    under the key ``seed`` (64 bits); a draw is the 64-bit word ``u`` of two output words
    mapped to ``floor(u n / 2^64)``, computed exactly in int64 for ``n < 2^31``.
    """
    if not 0 < n < 2 ** 31:
        raise ValueError(f"counter_negatives needs 0 < n < 2^31, got {n}")
    device = positions.device
    half = (k + 1) // 2
    m = torch.arange(half, device=device, dtype=torch.long)[None, :]
    p = positions.to(torch.long)[:, None]
    step = step.to(device=device, dtype=torch.long)
    w = philox4x32((m, p, step & MASK32, (step >> 32) & MASK32), philox_key(seed))
    draws = []
    for hi, lo in ((w[0], w[1]), (w[2], w[3])):
        carry = (lo * n) >> 32
        draws.append((hi * n + carry) >> 32)
    return torch.stack(draws, dim=2).reshape(p.shape[0], 2 * half)[:, :k]


def last_occurrence(index: torch.Tensor) -> torch.Tensor:
    """For each position of ``index`` (G,), the position of the last occurrence of its value (G,):
    with every repeat of a value given the same source, a write with repeated indices is the same
    in any order (CUDA's is undefined), and no boolean mask (a host read) is needed."""
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    is_last = torch.ones_like(sorted_index, dtype=torch.bool)
    is_last[:-1] = sorted_index[1:] != sorted_index[:-1]
    pos = torch.arange(index.numel(), device=index.device)
    next_last = torch.where(is_last, pos, index.numel()).flip(0).cummin(0).values.flip(0)
    source = torch.empty_like(order)
    source[order] = order[next_last]
    return source


class InstDisc(BaseMethod):
    """Backbone + head + memory bank (see the module docstring for the state)."""

    name = "InstDisc"
    views = Views(count=1)
    #: the release's scripts/InstDisc.sh (docs/methods.md cites each value)
    recipe = Recipe(aug="InstDisc", crop=0.2, mlp_head=True, contrast_temperature=0.07, contrast_momentum=0.5,
                    contrast_num_negative=65536, warmup_divisor=40)
    vit_recipe = vit_recipe_of(recipe)   # no published ViT recipe: MoCo v3's AdamW (docs/backbones.md)

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
        positions = torch.arange(batch_size, device=device) + cd.get_rank() * batch_size
        ids = counter_negatives(self.seed, self.neg_draws, positions, self.num_negative, self.bank.shape[0])
        self.neg_draws += 1
        return ids

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
        z = z[last_occurrence(index)].to(self.bank.dtype)   # repeats of an instance write the same row
        m = self.bank_momentum
        self.bank[index] = F.normalize(m * self.bank[index] + (1.0 - m) * z, dim=1)

    @torch.no_grad()
    def on_train_step_end(self, step: int, lr: float, grad_scale: float = 1.0) -> None:
        if self._pending is not None:
            self.update_bank(*self._pending)
            self._pending = None
