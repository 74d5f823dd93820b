"""Cheap diagnostics of a dense PIC table (``--pic-diagnostics``).

They measure what explains the long-run instability of dense PIC with the sliding window
(the PIC release's Known Issue: "for longer training ... the loss may become NaN"):

* **staleness** of a row: steps since its instance was last in a batch;
* how a row relates to its own instance's last seen embedding and to the current batch's
  embeddings, split into *fresh* rows (seen within the last ``window_steps`` steps, i.e. still
  inside the sliding window) and *stale* ones (outside it);
* the angle a row turns per step on the unit sphere, and ``lr / ||w||^2``, the step size of a
  scale-invariant row (the loss only sees ``w / ||w||``; its gradient is orthogonal to ``w`` and
  scales with ``1 / ||w||``, so the turn per step is ~ ``lr * |g_u| / ||w||^2``);
* the positive logit (cosine to the own row) against the largest negative one, split into
  instances *returning* to the window after a stale spell and instances revisited within it.

Row statistics use a fixed random subset of ``num_tracked`` instances (all of them for small N)
whose last embedding is kept (``num_tracked x D`` floats); the batch statistics need one extra
``(B, N)`` similarity product. Both are computed every ``every`` steps only; the per-step cost is an
index write of the batch's step numbers, on the embeddings' device (no host copy, no device
synchronisation between measurements). Nothing here changes training, and nothing is saved in
checkpoints (after a resume staleness counts from the resume step).

Scalars (returned by :meth:`PICDiagnostics.observe` on the steps it measures; cosines in [-1, 1]):

==========================  ================================================================
``diag/pos_cos``            mean cos(z_i, u_{y_i}) over the batch
``diag/maxneg_cos``         mean over the batch of max_{j != y_i} cos(z_i, u_j)
``diag/margin_neg_frac``    fraction of the batch whose positive is below its max negative
``diag/pos_cos_return``     ``pos_cos`` over instances whose previous visit is > window_steps ago
``diag/maxneg_cos_return``  the same for the max negative
``diag/pos_cos_revisit``    ``pos_cos`` over instances seen within the last window_steps steps
``diag/feat_cos_return``    tracked returning instances: cos(z_i now, z_i at its last visit), how
                            far the embedding of an image moved while it was outside the window
``diag/row_cos_return``     the same instances: cos(u_i now, z_i at its last visit), how far the
                            row moved from where its last visit left it
``diag/own_cos_fresh``      tracked fresh rows: cos(u_j, last embedding of instance j)
``diag/own_cos_stale``      the same for stale rows (never-seen rows are left out)
``diag/mean_cos_fresh``     cos(u_j, normalised mean of the batch embeddings), fresh rows
``diag/mean_cos_stale``     the same, stale rows
``diag/nn_cos_stale``       stale rows: max cosine to any embedding of the batch
``diag/feat_mean_norm``     ||mean of the batch embeddings|| (1 = all embeddings equal)
``diag/turn_fresh``         radians per step a fresh row turned since the last measurement
``diag/turn_stale``         the same, stale rows
``diag/w_norm_fresh``       mean ||w_j|| of fresh rows
``diag/w_norm_stale``       mean ||w_j|| of stale rows
``diag/lr_over_w``          lr / mean ||w_j|| (all tracked rows)
``diag/lr_over_w2``         lr / mean ||w_j||^2: the step size on the unit sphere
``diag/stale_frac``         fraction of tracked rows that are stale
``diag/staleness_mean``     mean staleness (steps) of tracked rows seen at least once
==========================  ================================================================
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

NEVER = -1


def staleness(last_seen: torch.Tensor, step: int) -> torch.Tensor:
    """Steps since each row's instance was last in a batch; -1 for rows never seen.

    Args:
        last_seen: (R,) int64 step of the last visit, :data:`NEVER` (-1) if none.
        step: the current step.
    Returns:
        (R,) int64.
    """
    return torch.where(last_seen >= 0, step - last_seen, torch.full_like(last_seen, NEVER))


def _mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of ``x[mask]``; NaN when the mask is empty (a scalar with no sample, not a zero)."""
    return float(x[mask].mean()) if bool(mask.any()) else float("nan")


def last_occurrence_rows(slots: torch.Tensor, scratch: int) -> torch.Tensor:
    """Rows to write a batch to: ``slots`` (B,) where a slot is tracked (>= 0) and this is its last
    occurrence in the batch, else the ``scratch`` row. An index write with repeated rows has no
    defined order on CUDA; with every real row written once the last occurrence wins on any device."""
    rows = torch.where(slots >= 0, slots, scratch)
    pos = torch.arange(rows.numel(), device=rows.device)
    last = torch.full((scratch + 1,), -1, dtype=torch.long, device=rows.device).scatter_reduce_(0, rows, pos, "amax")
    return torch.where(last[rows] == pos, rows, scratch)


def window_steps_of(window_size: int, window_stride: int, batch_size: int) -> int:
    """Steps an instance stays inside PIC's sliding window: (W / S) window-epochs of W / B steps."""
    return max(1, -(-window_size // window_stride)) * max(1, -(-window_size // batch_size))


class PICDiagnostics:
    """Staleness counters and periodic geometry measurements of a dense PIC table.

    Args:
        num_instances: N, rows of the table.
        window_steps: rows seen within this many steps count as fresh (in the window), older
            ones as stale; :func:`window_steps_of` gives it for the sliding window.
        every: measure every ``every`` training steps (the counters are updated every step).
        num_tracked: rows followed in detail (a fixed random subset; all rows when N is smaller).
        seed: picks the tracked subset.
    """

    def __init__(self, num_instances: int, window_steps: int, every: int = 10, num_tracked: int = 4096,
                 seed: int = 0) -> None:
        if num_instances < 1 or window_steps < 1 or every < 1 or num_tracked < 1:
            raise ValueError(f"PICDiagnostics needs positive sizes, got num_instances={num_instances}, "
                             f"window_steps={window_steps}, every={every}, num_tracked={num_tracked}")
        self.num_instances, self.window_steps, self.every = num_instances, window_steps, every
        self.step = 0            # training forwards seen so far (= optimiser steps taken before this one)
        self.lr = float("nan")   # lr of the last optimiser step (from on_train_step_end)
        self.last_seen = torch.full((num_instances,), NEVER, dtype=torch.int64)
        g = torch.Generator().manual_seed(seed)
        m = min(num_tracked, num_instances)
        self.tracked = torch.randperm(num_instances, generator=g)[:m].sort().values
        self.slot = torch.full((num_instances,), -1, dtype=torch.int64)
        self.slot[self.tracked] = torch.arange(m)
        # (m + 1, D) last embedding of tracked ids; row m is scratch space for untracked ids
        self.last_feat: Optional[torch.Tensor] = None
        self.prev_rows: Optional[torch.Tensor] = None           # (m, D) normalised rows at last measurement
        self.prev_step = 0

    def set_lr(self, lr: float) -> None:
        self.lr = float(lr)

    @torch.no_grad()
    def observe(self, z: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> Dict[str, float]:
        """Record one training batch; every ``every`` steps also measure (returns the scalars).

        Args:
            z: (B, D) normalised embeddings classified this step (before the optimiser step).
            index: (B,) their instance ids (may repeat, e.g. two views).
            weight: (N, D) the table as the loss saw it.
        Returns:
            ``{name: float}`` on measuring steps (names in the module docstring), else ``{}``.
        """
        z = z.detach().float()
        idx = index.detach().long()
        if self.last_seen.device != z.device:        # bookkeeping lives where the embeddings are
            self.last_seen, self.slot = self.last_seen.to(z.device), self.slot.to(z.device)
        if self.last_feat is None:
            self.last_feat = torch.zeros(self.tracked.numel() + 1, z.shape[1], device=z.device)
        out: Dict[str, float] = {}
        if self.step % self.every == 0:
            before = staleness(self.last_seen[idx], self.step)   # staleness at this visit
            out = self._measure(z, idx, before, weight.detach())
        self.last_seen[idx] = self.step
        self.last_feat[last_occurrence_rows(self.slot[idx], self.tracked.numel())] = z
        self.step += 1
        return out

    def _measure(self, z_dev: torch.Tensor, idx_dev: torch.Tensor, before: torch.Tensor,
                 weight: torch.Tensor) -> Dict[str, float]:
        """One (B, N) product on the training device; the statistics are computed on the CPU."""
        out: Dict[str, float] = {}
        z, before = z_dev.cpu(), before.cpu()
        last_feat = self.last_feat[:-1].cpu()
        last_seen_tracked = self.last_seen[self.tracked.to(self.last_seen.device)].cpu()
        # --- the batch: positive vs largest negative cosine (on the table's device)
        with torch.autocast(device_type=weight.device.type, enabled=False):
            cos = (z_dev @ weight.float().t()) / weight.float().norm(dim=1).clamp_min(1e-12)   # (B, N)
            pos = cos.gather(1, idx_dev[:, None]).squeeze(1).cpu()
            neg = cos.scatter_(1, idx_dev[:, None], float("-inf")).max(dim=1).values.cpu()
            rows_raw = weight[self.tracked.to(weight.device)].float().cpu()
            batch_rows = F.normalize(weight[idx_dev].float(), dim=1).cpu()
        del cos
        ret = before > self.window_steps
        rev = (before >= 0) & ~ret
        out["diag/pos_cos"] = float(pos.mean())
        out["diag/maxneg_cos"] = float(neg.mean())
        out["diag/margin_neg_frac"] = float((pos < neg).float().mean())
        out["diag/pos_cos_return"] = _mean(pos, ret)
        out["diag/maxneg_cos_return"] = _mean(neg, ret)
        out["diag/pos_cos_revisit"] = _mean(pos, rev)
        slots = self.slot[idx_dev].cpu()
        tracked_ret = ret & (slots >= 0)
        then = last_feat[slots.clamp(min=0)]
        out["diag/feat_cos_return"] = _mean((z * then).sum(dim=1), tracked_ret)
        out["diag/row_cos_return"] = _mean((batch_rows * then).sum(dim=1), tracked_ret)
        # --- tracked rows: alignment with their own last embedding and with the batch
        rows = F.normalize(rows_raw, dim=1)
        age = staleness(last_seen_tracked, self.step)
        seen = age >= 0
        fresh, stale = seen & (age <= self.window_steps), seen & (age > self.window_steps)
        own = (rows * last_feat).sum(dim=1)
        out["diag/own_cos_fresh"] = _mean(own, fresh)
        out["diag/own_cos_stale"] = _mean(own, stale)
        zbar = z.mean(dim=0)
        out["diag/feat_mean_norm"] = float(zbar.norm())
        mean_cos = rows @ F.normalize(zbar, dim=0)
        out["diag/mean_cos_fresh"] = _mean(mean_cos, fresh)
        out["diag/mean_cos_stale"] = _mean(mean_cos, stale)
        out["diag/nn_cos_stale"] = _mean((rows @ z.t()).max(dim=1).values, stale)
        if self.prev_rows is not None and self.step > self.prev_step:
            turn = torch.arccos((rows * self.prev_rows).sum(dim=1).clamp(-1.0, 1.0)) / (self.step - self.prev_step)
            out["diag/turn_fresh"] = _mean(turn, fresh)
            out["diag/turn_stale"] = _mean(turn, stale)
        self.prev_rows, self.prev_step = rows.clone(), self.step
        norms = rows_raw.norm(dim=1)
        out["diag/w_norm_fresh"] = _mean(norms, fresh)
        out["diag/w_norm_stale"] = _mean(norms, stale)
        out["diag/lr_over_w"] = self.lr / float(norms.mean())
        out["diag/lr_over_w2"] = self.lr / float((norms ** 2).mean())
        out["diag/stale_frac"] = float(stale.float().mean())
        out["diag/staleness_mean"] = _mean(age.float(), seen)
        return out
