"""What the training loop does when training diverges (``--on-divergence``).

``stop`` (default): ``--max-nonfinite`` consecutive steps with a non-finite loss end the run
(``NonFiniteLossError``, exit code 1; the last checkpoint is kept).

``rollback``: the same condition restores the last good checkpoint (``current.pth``) in the
running process instead: weights and method state (queues, banks, per-rank tables), optimiser,
scheduler, grad scaler, sampler position and RNG states, and the step counter. The batches whose
loss was non-finite are skipped from then on (their positions in the epoch are recorded, also in
later checkpoints, so a resumed run skips them too), every peak lr is multiplied by
``--rollback-lr-factor`` (cumulatively, recorded in later checkpoints as ``lr_scale``), a warning
is logged, and the epoch continues from the checkpoint's position. Every rank rolls back at the
same step (the ranks already agree on a non-finite loss). A rollback needs a checkpoint of the
epoch in progress (``current.pth`` is written at every epoch end, so there is one unless a save
failed); without one the run stops as with ``stop``.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

from contrast import distributed as cd
from contrast.checkpoint import CheckpointError, read_checkpoint, restore_training_state

DIVERGENCE_MODES = ("stop", "rollback")
EXTRA_KEY = "divergence"   # checkpointer.extra[EXTRA_KEY] = {"lr_scale": float, "skipped": {epoch: [it, ...]}}


class RolledBack(Exception):
    """Raised inside an epoch after a rollback: the loop restarts the epoch at the restored position."""


class Divergence:
    """The ``--on-divergence`` policy of a :class:`~contrast.trainer.Trainer`.

    ``checkpointer`` (a :class:`~contrast.checkpointer.Checkpointer`) names the last good checkpoint and
    holds the objects to restore; ``state`` is the loop's ``TrainState``; ``monitors`` (the loop's
    :class:`~contrast.monitors.hub.Monitors`, on ``device``) are restored from the same checkpoint.
    """

    def __init__(self, mode: str = "stop", lr_factor: float = 0.5, checkpointer=None, state=None, logger=None,
                 monitors=None, device=None) -> None:
        if mode not in DIVERGENCE_MODES:
            raise ValueError(f"--on-divergence must be one of {', '.join(DIVERGENCE_MODES)}, got {mode!r}")
        if not 0.0 < lr_factor <= 1.0:
            raise ValueError(f"--rollback-lr-factor must be in (0, 1], got {lr_factor}")
        self.mode, self.lr_factor = mode, lr_factor
        self.checkpointer, self.state, self.logger = checkpointer, state, logger
        self.monitors, self.device = monitors, device
        self.rollbacks = 0
        self._configured = list(checkpointer.scheduler.base_lrs) if checkpointer is not None else []
        self._nonfinite: List[Tuple[int, int]] = []
        saved = dict(checkpointer.extra.get(EXTRA_KEY, {})) if checkpointer is not None else {}
        self.lr_scale = float(saved.get("lr_scale", 1.0))
        self.skipped: Dict[int, set] = {int(e): set(its) for e, its in saved.get("skipped", {}).items()}
        if self.lr_scale != 1.0:   # a resumed run keeps the lr its rollbacks lowered
            self._scale_lr(self.lr_scale)

    # -- called by the loop ---------------------------------------------------------------------
    def skip(self, epoch: int, it: int) -> bool:
        """Whether iteration ``it`` of ``epoch`` is a batch that diverged before (not trained on again)."""
        return it in self.skipped.get(epoch, ())

    def nonfinite(self, epoch: int, it: int, run_length: int) -> None:
        """Note a non-finite step (``run_length``: consecutive ones so far, this one included)."""
        self._nonfinite = self._nonfinite[-(run_length - 1):] if run_length > 1 else []
        self._nonfinite.append((epoch, it))

    def try_roll_back(self, epoch: int) -> str:
        """At the ``--max-nonfinite``-th consecutive non-finite step of ``epoch``: with ``rollback``, restore
        the last good checkpoint, skip the diverged batches, lower the lr and raise :class:`RolledBack`.
        Returns (when the run must stop instead) why it did not roll back ("" with ``stop``)."""
        if self.mode != "rollback":
            return ""
        why = self._why_not(epoch)
        if why:
            return f"; --on-divergence rollback is not possible: {why}"
        self._roll_back(epoch)
        raise RolledBack()

    def _why_not(self, epoch: int) -> Optional[str]:
        if self.checkpointer is None:
            return "this loop writes no checkpoints"
        path, error = self.checkpointer.path, None
        if cd.get_rank() == 0:
            try:
                ckpt = read_checkpoint(path) if os.path.exists(path) else None
                if ckpt is None:
                    error = f"{path} does not exist yet"
                elif ckpt.epoch != epoch - 1:
                    error = f"{path} is of epoch {ckpt.epoch + 1}, not of the epoch in progress ({epoch})"
            except CheckpointError as e:
                error = str(e)
        return cd.broadcast_object(error, src=0)

    def _roll_back(self, epoch: int) -> None:
        ck = self.checkpointer
        ckpt = read_checkpoint(ck.path, verify=False)   # rank 0 verified it in _why_not
        restore_training_state(ckpt, ck.model, ck.optimizer, ck.scheduler, ck.scaler, ck.sampler)
        if self.monitors is not None:   # the online probe kept training after the checkpoint too
            self.monitors.restore(ckpt.extra, self.device)
        ck.sampler.set_epoch(epoch)   # from an epoch-end checkpoint the epoch in progress starts over
        bad = [it for e, it in self._nonfinite if e == epoch]
        self.skipped.setdefault(epoch, set()).update(bad)
        before = self.state.step
        self.state.step, self.state.nonfinite_run = ckpt.step, 0
        self._nonfinite = []
        self.lr_scale *= self.lr_factor
        self._scale_lr(self.lr_scale)
        ck.extra[EXTRA_KEY] = {"lr_scale": self.lr_scale,
                               "skipped": {str(e): sorted(its) for e, its in self.skipped.items()}}
        self.rollbacks += 1
        if self.logger is not None:
            self.logger.warning(
                f"rollback {self.rollbacks}: {len(bad)} consecutive non-finite losses at epoch {epoch} "
                f"(step {before}); restored {ck.path} (epoch {ckpt.epoch}, step {ckpt.step}); iterations "
                f"{', '.join(str(it + 1) for it in sorted(bad))} of epoch {epoch} are skipped; peak lr x "
                f"{self.lr_factor:g} (now x {self.lr_scale:g} of the configured one)")

    # -- helpers --------------------------------------------------------------------------------
    def _scale_lr(self, scale: float) -> None:
        """Peak lrs = configured x ``scale``; the optimiser's current lrs follow."""
        scheduler, groups = self.checkpointer.scheduler, self.checkpointer.optimizer.param_groups
        for group, old, conf in zip(groups, scheduler.base_lrs, self._configured):
            group["lr"] = group["lr"] * scale * conf / old if old else 0.0
        scheduler.base_lrs = [scale * b for b in self._configured]
        scheduler._last_lr = [g["lr"] for g in groups]
