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
* :func:`build_scheduler`: a per-step :class:`ProgressLR` whose lr is a closed-form function of the
  training progress, samples seen / total samples (exact after resume, no drift, and the same
  curve when a run is resumed with another world size or batch): linear warm-up from
  ``lr / warmup_multiplier`` to ``lr`` over the warm-up epochs (the release's
  ``GradualWarmupScheduler``; multiplier 100 gives the paper's "warm-up from lr/100"), then cosine
  (``cosine_form``, see :func:`progress_factor`) with floor ``eta_min`` (1e-6), or step decay
  by ``decay_rate`` at each epoch of ``decay_epochs``. With ``weight_decay_end`` it also sets the weight
  decay of every group whose decay is not 0 each step: cosine from the group's decay to
  ``weight_decay_end`` over the run (DINO's ``wd_schedule``, :func:`cosine_value`).
* :func:`clip_grad_per_param_`: DINO's ``clip_gradients`` (each parameter's gradient norm on its own).
"""
from __future__ import annotations

import math
from typing import AbstractSet, Callable, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

ETA_MIN = 1e-6
LARS_FORMS = ("release", "fold-lr")
#: ``--optimizer`` choices.
OPTIMIZERS = ("sgd", "lars", "adamw")
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
        """One update of every group, with multi-tensor (``torch._foreach_*``) kernels: a handful of
        launches per group instead of several per tensor."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, d = group["lr"], [p.grad for p in params]
            if not group.get("lars_exclude", False):
                if group["weight_decay"] != 0:
                    d = torch._foreach_add(d, params, alpha=group["weight_decay"])
                w_norm, d_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(d))
                ratio = torch.where((w_norm > 0) & (d_norm > 0),
                                    group["trust_coefficient"] * w_norm / (d_norm + group.get("eps", 0.0)),
                                    torch.ones_like(w_norm))
                d = torch._foreach_mul(d, list(ratio.unbind()))
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, group["momentum"])
            if self.form == "release":
                torch._foreach_add_(bufs, d)
                torch._foreach_add_(params, bufs, alpha=-lr)
            else:
                torch._foreach_add_(bufs, d, alpha=lr)
                torch._foreach_sub_(params, bufs)
        return loss


def split_decay_groups(params: Union[nn.Module, Sequence[dict]]) -> List[dict]:
    """Each group split in two: weights of rank >= 2 (conv/linear kernels, PIC's W), and the rest
    (biases, BN: no decay, ``lars_exclude``). A module counts as one group of its trainable parameters,
    so it gives ``[decay, rest]``; a group's own keys (``lr``, ``constant_lr``, ...) go to both halves."""
    out = []
    for group in param_groups_of(params):
        decay = [p for p in group["params"] if p.ndim >= 2]
        rest = [p for p in group["params"] if p.ndim < 2]
        out += [{**group, "params": decay}, {**group, "params": rest, "weight_decay": 0.0, "lars_exclude": True}]
    return out


def param_groups_of(params: Union[nn.Module, Sequence[dict]]) -> List[dict]:
    """``params`` as optimiser groups: a module is one group of its trainable parameters."""
    if isinstance(params, nn.Module):
        return [{"params": [p for p in params.parameters() if p.requires_grad]}]
    return [dict(group, params=list(group["params"])) for group in params]


def split_no_decay(params: Union[nn.Module, Sequence[dict]], no_decay: AbstractSet[nn.Parameter]) -> List[dict]:
    """Each group split in two: the parameters not in ``no_decay``, and those in it with weight decay 0
    (AdamW's groups; a group's own keys go to both halves, empty halves are dropped)."""
    out = []
    for group in param_groups_of(params):
        decay = [p for p in group["params"] if p not in no_decay]
        rest = [p for p in group["params"] if p in no_decay]
        out += [g for g in ({**group, "params": decay}, {**group, "params": rest, "weight_decay": 0.0}) if g["params"]]
    return out


def layer_decay_groups(named_params: Iterable, layer_of: Callable[[str], int], num_layers: int,
                       decay: float) -> List[dict]:
    """Layer-wise lr decay (MAE's ``param_groups_lrd``, after BEiT/ELECTRA): a trainable parameter of
    layer ``i`` (0 .. ``num_layers + 1``, ``layer_of(name)``) gets ``lr_scale = decay ** (num_layers + 1 -
    i)``. Groups ``{"params", "names", "lr_scale"}``, one per scale in order of first appearance (one
    group when ``decay`` is 1)."""
    groups: dict = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        layer = layer_of(name)
        if not 0 <= layer <= num_layers + 1:
            raise ValueError(f"layer {layer} of {name} is outside 0..{num_layers + 1}")
        scale = decay ** (num_layers + 1 - layer)
        group = groups.setdefault(scale, {"params": [], "names": [], "lr_scale": scale})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(params: Union[nn.Module, Sequence[dict]], name: str, lr: float, momentum: float,
                    weight_decay: float, lars_form: str = "release", trust_coefficient: float = 0.001,
                    lars_eps: Optional[float] = None, nesterov: bool = False,
                    no_decay: AbstractSet[nn.Parameter] = frozenset()) -> torch.optim.Optimizer:
    """``--optimizer sgd`` (momentum SGD, decay on every parameter, as the release) or ``lars``
    (:class:`LARS` of form ``lars_form``, trust coefficient 0.001 and eps as the release).

    ``params``: a module (one group of all its trainable parameters) or the parameter groups a method
    declares (:meth:`contrast.models.base.BaseMethod.param_groups`); a group's own ``lr`` /
    ``weight_decay`` override ``lr`` / ``weight_decay``, and ``constant_lr=True`` keeps its lr out of
    the schedule (:class:`ProgressLR`); ``nesterov``: Nesterov momentum (sgd only). ``adamw``:
    ``torch.optim.AdamW`` (betas 0.9, 0.999, eps 1e-8, as MoCo v3 and DINO), the parameters of
    ``no_decay`` undecayed (:func:`split_no_decay`)."""
    if name == "sgd":
        return torch.optim.SGD(param_groups_of(params), lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov)
    if name == "lars":
        return LARS(split_decay_groups(params), lr=lr, momentum=momentum, weight_decay=weight_decay,
                    trust_coefficient=trust_coefficient, eps=lars_eps, form=lars_form)
    if name == "adamw":
        return torch.optim.AdamW(split_no_decay(params, no_decay), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"--optimizer {name!r} is not supported; choose one of: {', '.join(OPTIMIZERS)}")


def progress_factor(seen: int, total: int, warmup: int, step: int, warmup_multiplier: float, schedule: str,
                    decay_at: Sequence[int] = (), decay_rate: float = 0.1, eta_min_ratio: float = 0.0,
                    cosine_form: str = "release") -> float:
    """Multiplier of the peak lr for the step taken after ``seen`` training samples.

    Every argument is a count of samples (over all ranks): ``total`` in the whole run, ``warmup`` in
    the warm-up, ``step`` in one optimiser step (the total batch), ``decay_at`` the step schedule's
    milestones. The schedule is thus a function of the training progress ``seen / total``: a run
    resumed with another world size or batch continues the same curve over the remaining samples.

    * warm-up (``seen < warmup``, and ``seen == warmup`` in the release form, where it gives 1 anyway):
      ``(1 + (warmup_multiplier - 1) * seen / warmup) / warmup_multiplier``;
    * ``"cosine"``, ``r = eta_min_ratio``: ``r + (1 - r) * (1 + cos(pi * p)) / 2`` with

      - ``cosine_form="release"`` (default): ``p = (seen - warmup) / (total - warmup)``: the
        release's ``GradualWarmupScheduler`` around ``CosineAnnealingLR(T_max=(epochs - warmup) *
        iters, eta_min=1e-6)`` stepped once per iteration; the last step uses ``p = 1 - step /
        (total - warmup)``, so the lr never reaches the floor (it ends just above it);
      - ``cosine_form="reach-min"``: ``p = (seen - warmup) / (total - warmup - step)``, so the last
        step uses exactly the floor ``eta_min`` -- the schedule the paper describes ("cosine to
        1e-6"); it differs from the release by at most one step's worth of decay;

      ``p`` is clamped to 1 past the end of the run;
    * ``"step"``: ``decay_rate ** #{m in decay_at : seen >= m}`` (the release's ``MultiStepLR``).

    Counts are integers and every ratio is an integer division (correctly rounded), so with a
    constant batch the values equal those of :func:`lr_factor` at ``it = seen / step`` bit for bit.
    """
    if cosine_form not in COSINE_FORMS:
        raise ValueError(f"cosine form {cosine_form!r} is not supported; choose one of: {', '.join(COSINE_FORMS)}")
    release = cosine_form == "release"
    if warmup > 0 and (seen < warmup or (release and seen == warmup)):
        return (1.0 + (warmup_multiplier - 1.0) * seen / warmup) / warmup_multiplier
    if schedule == "cosine":
        span = max(total - warmup - (0 if release else step), step)
        progress = min((seen - warmup) / span, 1.0)
        return eta_min_ratio + (1.0 - eta_min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return decay_rate ** sum(seen >= m for m in decay_at)
    raise ValueError(f"--lr-scheduler {schedule!r} is not supported; choose cosine or step")


def lr_factor(it: int, total_iters: int, iters_per_epoch: int, warmup_epochs: int, warmup_multiplier: float,
              schedule: str, decay_epochs: Sequence[int] = (), decay_rate: float = 0.1,
              eta_min_ratio: float = 0.0, cosine_form: str = "release") -> float:
    """Multiplier of the peak lr at iteration ``it`` (0-based) of a run with a constant batch:
    :func:`progress_factor` counting one sample per iteration (``Wi = warmup_epochs *
    iters_per_epoch`` warm-up iterations, ``T = total_iters``, step milestones at
    ``m * iters_per_epoch`` for ``m`` in ``decay_epochs``)."""
    return progress_factor(it, total_iters, warmup_epochs * iters_per_epoch, 1, warmup_multiplier, schedule,
                           [m * iters_per_epoch for m in decay_epochs], decay_rate, eta_min_ratio, cosine_form)


def cosine_value(seen: int, total: int, start: float, end: float) -> float:
    """``end + (start - end) * (1 + cos(pi * seen / total)) / 2`` (progress clamped to [0, 1]): DINO's
    ``utils.cosine_scheduler`` without warm-up, counted in samples."""
    progress = min(max(seen / max(total, 1), 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def clip_grad_per_param_(params: Iterable[torch.Tensor], max_norm: float) -> None:
    """Scale each gradient ``g`` by ``max_norm / (||g|| + 1e-6)`` where that is < 1, every parameter on
    its own (DINO's ``utils.clip_gradients``; not the total norm of ``clip_grad_norm_``). No host read."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, [c.to(g.dtype) for c, g in zip(coef.unbind(), grads)])


class ProgressLR(LRScheduler):
    """Learning rate ``base_lr * factor(samples_seen)``, stepped once per optimiser step; a parameter
    group with ``constant_lr=True`` keeps its ``base_lr`` throughout.

    ``samples_seen`` is ``samples_per_step`` (the total batch of *this* run) per step since the
    last :meth:`load_state_dict`, added to the samples the loaded state had seen, so a run resumed
    with another total batch continues the curve where it stopped. ``last_epoch`` counts steps as
    in torch's schedulers. Loading a state keeps this run's peak lrs (``base_lrs``) and sets the
    optimiser's lrs at once, so the lr of the first step after a resume is already this run's.

    ``weight_decay_end`` (None: constant decay): each step also sets the ``weight_decay`` of every
    group whose decay at construction (``base_weight_decays``, this run's) is not 0 to
    :func:`cosine_value` of the samples seen, so the decay resumes with the lr.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, factor: Callable[[int], float], samples_per_step: int,
                 total_samples: int, warmup_samples: int, weight_decay_end: Optional[float] = None) -> None:
        self.factor, self.samples_per_step = factor, int(samples_per_step)
        self.total_samples, self.warmup_samples = int(total_samples), int(warmup_samples)
        self._seen_base, self._step_base = 0, 0
        self.weight_decay_end = weight_decay_end
        self.base_weight_decays = [float(g.get("weight_decay", 0.0)) for g in optimizer.param_groups]
        super().__init__(optimizer)

    def step(self, epoch=None) -> None:
        super().step(epoch)
        self._set_weight_decays()

    def weight_decay_at(self, seen: int, base: float) -> float:
        """The decay of a group of initial decay ``base`` for the step after ``seen`` samples."""
        if self.weight_decay_end is None or base == 0:
            return base
        return cosine_value(seen, self.total_samples, base, self.weight_decay_end)

    def _set_weight_decays(self) -> None:
        if self.weight_decay_end is None:
            return
        seen = self.samples_seen
        for group, base in zip(self.optimizer.param_groups, self.base_weight_decays):
            group["weight_decay"] = self.weight_decay_at(seen, base)

    @property
    def samples_seen(self) -> int:
        """Training samples (over all ranks) consumed by the steps taken so far."""
        return self._seen_base + (self.last_epoch - self._step_base) * self.samples_per_step

    def _lrs(self) -> List[float]:
        f = self.factor(self.samples_seen)
        return [base if group.get("constant_lr", False) else base * f
                for base, group in zip(self.base_lrs, self.optimizer.param_groups)]

    def get_lr(self) -> List[float]:
        return self._lrs()

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "samples_seen": self.samples_seen, "base_lrs": list(self.base_lrs),
                "_step_count": self._step_count, "_last_lr": list(self._last_lr),
                "samples_per_step": self.samples_per_step, "total_samples": self.total_samples}

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue from ``state_dict`` (also a ``LambdaLR`` state of an older checkpoint, whose
        ``samples_seen`` is taken as ``last_epoch`` steps of this run's batch)."""
        self.last_epoch = self._step_base = int(state_dict["last_epoch"])
        self._seen_base = int(state_dict.get("samples_seen", self.last_epoch * self.samples_per_step))
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        self._last_lr = self._lrs()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr
        self._set_weight_decays()


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int, iters_per_epoch: int,
                    warmup_epochs: int = 0, warmup_multiplier: float = 100.0, decay_epochs: Sequence[int] = (),
                    decay_rate: float = 0.1, eta_min: float = ETA_MIN, cosine_form: str = "release",
                    samples_per_step: int = 1, weight_decay_end: Optional[float] = None) -> ProgressLR:
    """Per-step schedule over ``epochs * iters_per_epoch`` steps of ``samples_per_step`` samples
    (call ``.step()`` after every optimiser step), as a function of the samples seen
    (:func:`progress_factor`, :class:`ProgressLR`).

    ``epochs``, ``warmup_epochs`` and ``decay_epochs`` are loop epochs (window-epochs with the
    sliding-window sampler; the caller maps them). Warm-up longer than the run is clamped to
    ``epochs - 1``. ``cosine_form``: see :func:`progress_factor`. ``eta_min`` is absolute for the
    scheduled group with the largest lr (the release's groups all share one lr). Groups with
    ``constant_lr=True`` keep their lr (:class:`ProgressLR`). ``samples_per_step``: the
    total batch over all ranks (1 counts steps instead of samples; the lrs are the same).
    ``weight_decay_end``: cosine weight-decay schedule (see :class:`ProgressLR`; None: constant).
    """
    if iters_per_epoch < 1 or epochs < 1 or samples_per_step < 1:
        raise ValueError(f"build_scheduler needs epochs >= 1, iters_per_epoch >= 1 and samples_per_step >= 1, "
                         f"got {epochs}, {iters_per_epoch}, {samples_per_step}")
    scheduled = [g["lr"] for g in optimizer.param_groups if not g.get("constant_lr", False)]
    peak = max(scheduled, default=0.0)
    per_epoch = iters_per_epoch * samples_per_step
    total = epochs * per_epoch
    warmup = (min(warmup_epochs, epochs - 1) if epochs > 1 else 0) * per_epoch
    ratio = min(eta_min / peak, 1.0) if peak > 0 else 0.0
    decay_at = [m * per_epoch for m in decay_epochs]
    # validates the schedule name and the cosine form
    progress_factor(0, total, warmup, samples_per_step, warmup_multiplier, schedule, cosine_form=cosine_form)

    def factor(seen: int) -> float:
        return progress_factor(seen, total, warmup, samples_per_step, warmup_multiplier, schedule, decay_at,
                               decay_rate, ratio, cosine_form)

    return ProgressLR(optimizer, factor, samples_per_step, total, warmup, weight_decay_end)
