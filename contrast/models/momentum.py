"""Momentum (EMA) encoders: MoCo's key encoder, BYOL's target network.

:class:`MomentumEncoder` holds frozen copies of an online backbone and head and follows them with
``xi <- m xi + (1 - m) theta`` after each optimiser step (He et al., CVPR 2020, Eq. 2; Grill et al.,
NeurIPS 2020, Sec. 3.1). Batch-norm buffers are the copy's own, as in both papers' code.
:func:`cosine_momentum` is BYOL's schedule ``m_k = 1 - (1 - m_base) (cos(pi k / K) + 1) / 2``, which
:meth:`MomentumEncoder.momentum_at` follows once :meth:`MomentumEncoder.start` gave K (BYOL, MoCo v3,
DINO); MoCo v1/v2 pass their constant momentum to :meth:`MomentumEncoder.update` directly.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


class MomentumEncoder(nn.Module):
    """Frozen copies ``backbone`` and ``head`` of the online modules; ``forward = head(backbone(x))``."""

    def __init__(self, backbone: nn.Module, head: nn.Module, base_momentum: float = 0.0) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(backbone)
        self.head = copy.deepcopy(head)
        self.requires_grad_(False)
        self.base_momentum = base_momentum
        self.total_steps = 0

    def start(self, total_steps: int) -> None:
        """Run the cosine momentum schedule over ``total_steps`` (called from a method's ``on_train_start``)."""
        self.total_steps = total_steps

    def momentum_at(self, step: int) -> float:
        """The scheduled momentum at ``step``: ``base_momentum`` until :meth:`start` gave the run's length."""
        if self.total_steps <= 0:
            return self.base_momentum
        return cosine_momentum(step, self.total_steps, self.base_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    @torch.no_grad()
    def update(self, backbone: nn.Module, head: nn.Module, momentum: float) -> None:
        """``xi <- m xi + (1 - m) theta`` for every parameter of the copies (theta: the online modules)."""
        online = list(backbone.parameters()) + list(head.parameters())
        mine = list(self.backbone.parameters()) + list(self.head.parameters())
        if len(online) != len(mine):
            raise ValueError(f"momentum update: {len(online)} online parameters but {len(mine)} in the copy")
        torch._foreach_mul_(mine, momentum)
        torch._foreach_add_(mine, [p.detach() for p in online], alpha=1.0 - momentum)


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """BYOL's target decay at ``step`` of ``total_steps``: from ``base`` (step 0) to ``final`` (last step)."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
