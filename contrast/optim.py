"""Optimisers and learning-rate schedules.

* :class:`LARS` (You et al. 2017, "Large Batch Training of Convolutional Networks"), in the form
  used by SimCLR (Chen et al. 2020): per-tensor trust ratio ``eta * ||w|| / ||g + wd * w||``,
  classic momentum ``v <- m v + lr * ratio * (g + wd * w)``, ``w <- w - v``. Parameter groups with
  ``lars_exclude=True`` (biases and BatchNorm parameters, see :func:`build_optimizer`) get neither
  weight decay nor adaptation.
* :func:`build_scheduler`: per-iteration ``LambdaLR`` with a closed-form factor (exact after resume,
  no drift): linear warm-up from ``lr / warmup_multiplier`` to ``lr`` over the warm-up epochs (the
  release's ``GradualWarmupScheduler``; multiplier 100 gives the paper's "warm-up from lr/100"),
  then cosine to ``eta_min`` (1e-6) at the last iteration, or step decay by ``decay_rate`` at each
  epoch of ``decay_epochs``.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

ETA_MIN = 1e-6


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling with SimCLR's update rule (classic momentum, no Nesterov).

    For each tensor ``w`` with gradient ``g`` in a group that is not ``lars_exclude``::

        d = g + weight_decay * w
        ratio = trust_coefficient * ||w|| / ||d||   (1 if ||w|| == 0 or ||d|| == 0)
        v = momentum * v + lr * ratio * d
        w = w - v

    Excluded groups use ``d = g`` and ``ratio = 1`` (plain momentum SGD).
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(f"LARS: invalid lr={lr}, momentum={momentum}, weight_decay={weight_decay} "
                             f"or trust_coefficient={trust_coefficient}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                scaled_lr = group["lr"]
                if not group["lars_exclude"]:
                    if group["weight_decay"] != 0:
                        d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    ratio = torch.where((w_norm > 0) & (d_norm > 0),
                                        group["trust_coefficient"] * w_norm / d_norm, torch.ones_like(w_norm))
                    d = d * ratio
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(d, alpha=scaled_lr)
                p.sub_(buf)
        return loss


def split_decay_groups(model: nn.Module) -> List[dict]:
    """Two groups: weights of rank >= 2 (conv/linear kernels, PIC's W), and the rest (biases, BN)."""
    decay, rest = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else rest).append(p)
    return [{"params": decay}, {"params": rest, "weight_decay": 0.0, "lars_exclude": True}]


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float
                    ) -> torch.optim.Optimizer:
    """``--optimizer sgd`` (momentum SGD, decay on every parameter, as the release) or ``lars``."""
    if name == "sgd":
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "lars":
        return LARS(split_decay_groups(model), lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"--optimizer {name!r} is not supported; choose sgd or lars")


def lr_factor(it: int, total_iters: int, iters_per_epoch: int, warmup_epochs: int, warmup_multiplier: float,
              schedule: str, decay_epochs: Sequence[int] = (), decay_rate: float = 0.1,
              eta_min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at iteration ``it`` (0-based) -- see the module docstring."""
    warmup = warmup_epochs * iters_per_epoch
    if it < warmup:
        return (1.0 + (warmup_multiplier - 1.0) * it / warmup) / warmup_multiplier
    if schedule == "cosine":
        span = max(total_iters - warmup - 1, 1)
        progress = min((it - warmup) / span, 1.0)
        return eta_min_ratio + (1.0 - eta_min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return decay_rate ** sum(it >= m * iters_per_epoch for m in decay_epochs)
    raise ValueError(f"--lr-scheduler {schedule!r} is not supported; choose cosine or step")


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int, iters_per_epoch: int,
                    warmup_epochs: int = 0, warmup_multiplier: float = 100.0, decay_epochs: Sequence[int] = (),
                    decay_rate: float = 0.1, eta_min: float = ETA_MIN) -> LambdaLR:
    """Per-iteration schedule over ``epochs * iters_per_epoch`` steps (call ``.step()`` every iteration).

    ``epochs``, ``warmup_epochs`` and ``decay_epochs`` are loop epochs (window-epochs with the
    sliding-window sampler; the caller maps them). Warm-up longer than the run is clamped.
    """
    if iters_per_epoch < 1 or epochs < 1:
        raise ValueError(f"build_scheduler needs epochs >= 1 and iters_per_epoch >= 1, got {epochs}, "
                         f"{iters_per_epoch}")
    peak = max(g["lr"] for g in optimizer.param_groups)
    total = epochs * iters_per_epoch
    warmup_epochs = min(warmup_epochs, epochs - 1) if epochs > 1 else 0
    ratio = min(eta_min / peak, 1.0) if peak > 0 else 0.0
    lr_factor(0, total, iters_per_epoch, warmup_epochs, warmup_multiplier, schedule)  # validates the name

    def factor(it: int) -> float:
        return lr_factor(it, total, iters_per_epoch, warmup_epochs, warmup_multiplier, schedule,
                         decay_epochs, decay_rate, ratio)

    return LambdaLR(optimizer, factor)
