"""Optimisers and learning-rate schedules.

* :class:`LARS` (You et al. 2017, "Large Batch Training of Convolutional Networks"): per-tensor
  trust ratio on ``d = g + wd * w``, in two forms (``form``):

  - ``"release"`` (default): the PIC release's ``LARS`` wrapper around ``torch.optim.SGD``:
    ``ratio = eta * ||w|| / (||d|| + eps)`` (eps 1e-8), then SGD momentum on the scaled step,
    ``v <- m v + ratio * d``, ``w <- w - lr * v``;
  - ``"fold-lr"``: SimCLR's TensorFlow ``LARSOptimizer``, lr folded into the momentum buffer,
    ``v <- m v + lr * ratio * d``, ``w <- w - v`` (eps 0 unless given).

  With a constant lr both give the same iterates; they differ whenever the lr changes (warm-up,
  cosine): in the release form the whole buffer is rescaled by the current lr, in the fold-lr
  form past steps keep the lr they were taken with. Parameter groups with ``lars_exclude=True``
  (biases and BatchNorm parameters, see :func:`split_decay_groups`) get neither weight decay nor
  adaptation in either form, as in the release (``add_weight_decay``, ``ignore=True``).
* :func:`build_scheduler`: per-iteration ``LambdaLR`` with a closed-form factor (exact after resume,
  no drift): linear warm-up from ``lr / warmup_multiplier`` to ``lr`` over the warm-up epochs (the
  release's ``GradualWarmupScheduler``; multiplier 100 gives the paper's "warm-up from lr/100"),
  then cosine (``cosine_form``, see :func:`lr_factor`) with floor ``eta_min`` (1e-6), or step decay
  by ``decay_rate`` at each epoch of ``decay_epochs``.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

ETA_MIN = 1e-6
LARS_FORMS = ("release", "fold-lr")
COSINE_FORMS = ("release", "reach-min")
#: eps of the release's trust ratio ``eta ||w|| / (||d|| + eps)``.
LARS_EPS = 1e-8


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (classic momentum, no Nesterov, no dampening).

    For each tensor ``w`` with gradient ``g`` in a group that is not ``lars_exclude``::

        d = g + weight_decay * w
        ratio = trust_coefficient * ||w|| / (||d|| + eps)   (1 if ||w|| == 0 or ||d|| == 0)
        form "release":  v = momentum * v + ratio * d;       w = w - lr * v
        form "fold-lr":  v = momentum * v + lr * ratio * d;  w = w - v

    Excluded groups use ``d = g`` and ``ratio = 1`` (plain momentum SGD). ``eps`` defaults to
    1e-8 for ``"release"`` (the release's value) and 0 for ``"fold-lr"`` (SimCLR's TF LARS has
    none). The release form is the default because it is what the PIC release ran (``--optimizer
    lars`` of its SimCLR script); ``"fold-lr"`` is kept because it is SimCLR's own update rule.
    The momentum buffer is ``state["momentum_buffer"]`` as in ``torch.optim.SGD``; the form is an
    attribute of the optimiser (not saved in its state dict) and must match on resume, because
    the two forms' buffers differ by a factor lr.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: Optional[float] = None, form: str = "release") -> None:
        if form not in LARS_FORMS:
            raise ValueError(f"LARS form {form!r} is not supported; choose one of: {', '.join(LARS_FORMS)}")
        if eps is None:
            eps = LARS_EPS if form == "release" else 0.0
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0 or eps < 0:
            raise ValueError(f"LARS: invalid lr={lr}, momentum={momentum}, weight_decay={weight_decay}, "
                             f"trust_coefficient={trust_coefficient} or eps={eps}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, lars_exclude=False)
        super().__init__(params, defaults)
        self.form = form

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:   # groups saved before a key existed
            for key in ("eps", "trust_coefficient", "lars_exclude"):
                group.setdefault(key, self.defaults[key])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if not group.get("lars_exclude", False):
                    if group["weight_decay"] != 0:
                        d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    ratio = torch.where((w_norm > 0) & (d_norm > 0),
                                        group["trust_coefficient"] * w_norm / (d_norm + group.get("eps", 0.0)),
                                        torch.ones_like(w_norm))
                    d = d * ratio
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                if self.form == "release":
                    buf.mul_(group["momentum"]).add_(d)
                    p.add_(buf, alpha=-lr)
                else:
                    buf.mul_(group["momentum"]).add_(d, alpha=lr)
                    p.sub_(buf)
        return loss


def split_decay_groups(model: nn.Module) -> List[dict]:
    """Two groups: weights of rank >= 2 (conv/linear kernels, PIC's W), and the rest (biases, BN)."""
    decay, rest = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else rest).append(p)
    return [{"params": decay}, {"params": rest, "weight_decay": 0.0, "lars_exclude": True}]


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float,
                    lars_form: str = "release", trust_coefficient: float = 0.001, lars_eps: Optional[float] = None
                    ) -> torch.optim.Optimizer:
    """``--optimizer sgd`` (momentum SGD, decay on every parameter, as the release) or ``lars``
    (:class:`LARS` of form ``lars_form``, trust coefficient 0.001 and eps as the release)."""
    if name == "sgd":
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "lars":
        return LARS(split_decay_groups(model), lr=lr, momentum=momentum, weight_decay=weight_decay,
                    trust_coefficient=trust_coefficient, eps=lars_eps, form=lars_form)
    raise ValueError(f"--optimizer {name!r} is not supported; choose sgd or lars")


def lr_factor(it: int, total_iters: int, iters_per_epoch: int, warmup_epochs: int, warmup_multiplier: float,
              schedule: str, decay_epochs: Sequence[int] = (), decay_rate: float = 0.1,
              eta_min_ratio: float = 0.0, cosine_form: str = "release") -> float:
    """Multiplier of the peak lr at iteration ``it`` (0-based; the lr the ``it``-th step uses).

    With ``Wi = warmup_epochs * iters_per_epoch`` and ``T = total_iters``:

    * warm-up (``it < Wi``, and ``it == Wi`` in the release form, where it gives 1 anyway):
      ``(1 + (warmup_multiplier - 1) * it / Wi) / warmup_multiplier``;
    * ``"cosine"``, ``r = eta_min_ratio``: ``r + (1 - r) * (1 + cos(pi * p)) / 2`` with

      - ``cosine_form="release"`` (default): ``p = (it - Wi) / (T - Wi)``. This is the release's
        ``GradualWarmupScheduler`` around ``CosineAnnealingLR(T_max=(epochs - warmup) * iters,
        eta_min=1e-6)`` stepped once per iteration: the last step uses ``p = (T - Wi - 1) /
        (T - Wi)``, so the lr never reaches the floor (it ends just above it);
      - ``cosine_form="reach-min"``: ``p = (it - Wi) / (T - Wi - 1)``, so the last step uses
        exactly the floor ``eta_min`` -- the schedule the paper describes ("cosine to 1e-6");
        it differs from the release by at most one iteration's worth of decay;

      ``p`` is clamped to 1 past the end of the run;
    * ``"step"``: ``decay_rate ** #{m in decay_epochs : it >= m * iters_per_epoch}`` (the release's
      ``MultiStepLR`` with milestones ``(m - warmup) * iters`` counted after the warm-up).
    """
    if cosine_form not in COSINE_FORMS:
        raise ValueError(f"cosine form {cosine_form!r} is not supported; choose one of: {', '.join(COSINE_FORMS)}")
    warmup = warmup_epochs * iters_per_epoch
    release = cosine_form == "release"
    if warmup > 0 and (it < warmup or (release and it == warmup)):
        return (1.0 + (warmup_multiplier - 1.0) * it / warmup) / warmup_multiplier
    if schedule == "cosine":
        span = max(total_iters - warmup - (0 if release else 1), 1)
        progress = min((it - warmup) / span, 1.0)
        return eta_min_ratio + (1.0 - eta_min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return decay_rate ** sum(it >= m * iters_per_epoch for m in decay_epochs)
    raise ValueError(f"--lr-scheduler {schedule!r} is not supported; choose cosine or step")


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int, iters_per_epoch: int,
                    warmup_epochs: int = 0, warmup_multiplier: float = 100.0, decay_epochs: Sequence[int] = (),
                    decay_rate: float = 0.1, eta_min: float = ETA_MIN, cosine_form: str = "release") -> LambdaLR:
    """Per-iteration schedule over ``epochs * iters_per_epoch`` steps (call ``.step()`` every iteration).

    ``epochs``, ``warmup_epochs`` and ``decay_epochs`` are loop epochs (window-epochs with the
    sliding-window sampler; the caller maps them). Warm-up longer than the run is clamped to
    ``epochs - 1``. ``cosine_form``: see :func:`lr_factor`. ``eta_min`` is absolute for the group
    with the largest lr (the release's groups all share one lr).
    """
    if iters_per_epoch < 1 or epochs < 1:
        raise ValueError(f"build_scheduler needs epochs >= 1 and iters_per_epoch >= 1, got {epochs}, "
                         f"{iters_per_epoch}")
    peak = max(g["lr"] for g in optimizer.param_groups)
    total = epochs * iters_per_epoch
    warmup_epochs = min(warmup_epochs, epochs - 1) if epochs > 1 else 0
    ratio = min(eta_min / peak, 1.0) if peak > 0 else 0.0
    # validates the schedule name and the cosine form
    lr_factor(0, total, iters_per_epoch, warmup_epochs, warmup_multiplier, schedule, cosine_form=cosine_form)

    def factor(it: int) -> float:
        return lr_factor(it, total, iters_per_epoch, warmup_epochs, warmup_multiplier, schedule,
                         decay_epochs, decay_rate, ratio, cosine_form)

    return LambdaLR(optimizer, factor)
