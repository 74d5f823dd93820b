"""When and how a run writes its checkpoints (:class:`Checkpointer`), and where it resumes from."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

from torch import nn

from contrast import distributed as cd
from contrast.checkpoint import (CURRENT, EPOCH_PREFIX, PRETRAIN, Checkpoint, CheckpointError, CheckpointSaveError,
                                 LINEAR, choose_resume, copy_checkpoint, prune_epoch_checkpoints, read_checkpoint,
                                 restore_training_state, save_training_checkpoint)
from contrast.data.samplers import ResumableSampler
from contrast.optim import ProgressLR
from contrast.runconfig import add_facts
from contrast.runtime import Run, SavesFailing


def resume_checkpoint(run: Run, resume: str = "", auto_resume: bool = False, restart: bool = False
                      ) -> Optional[Checkpoint]:
    """The checkpoint this run continues (None: a fresh start), chosen by rank 0 with
    :func:`~contrast.checkpoint.choose_resume` (verified, with fallback to the newest valid one)
    and read by every rank; its warnings are logged; an error on every rank when it refuses."""
    choice, error = None, None
    if run.env.is_main:
        try:
            choice = choose_resume(run.output_dir, resume, auto_resume, restart)
        except CheckpointError as e:
            error = str(e)
    path, warnings, error = cd.broadcast_object(
        (choice.checkpoint.path if choice and choice.checkpoint else None, choice.warnings if choice else [], error))
    if error:
        raise CheckpointError(error)
    for w in warnings:
        run.logger.warning(w)
    if path is None:
        return None
    return choice.checkpoint if run.env.is_main else read_checkpoint(path, verify=False)


def check_total_batch(ckpt: Checkpoint, total_batch: int, world_size: int, allow_change: bool,
                      effective_lr: float, remaining_samples: Optional[int], logger: logging.Logger) -> None:
    """A resumed run continues the lr schedule of ``ckpt`` by samples seen. With the same total batch
    (any world size) it is the same schedule; another total batch changes the optimisation, so it
    is refused unless ``allow_change`` (``--allow-batch-change``), which rescales the peak lr
    (``effective_lr``, linear scaling) and continues over the remaining samples."""
    old = ckpt.total_batch
    if old is None:
        return
    where = f"{ckpt.path} (epoch {ckpt.epoch}, step {ckpt.step})"
    if world_size != ckpt.world_size:
        logger.info(f"resuming {where} on {world_size} process(es) instead of {ckpt.world_size}: same total batch "
                    f"{total_batch}" if old == total_batch else
                    f"resuming {where} on {world_size} process(es) instead of {ckpt.world_size}")
    if old == total_batch:
        return
    message = (f"{where} was trained with a total batch of {old} ({ckpt.world_size} process(es)); this run has "
               f"{total_batch} ({world_size} process(es)), which changes the optimisation")
    if not allow_change:
        raise CheckpointError(f"{message}. Keep the total batch (--batch-size x processes = {old}), or pass "
                              f"--allow-batch-change to continue with the lr rescaled to {effective_lr:.4g} "
                              f"(from {ckpt.effective_lr:.4g}) over the remaining samples")
    left = f" over the remaining {remaining_samples} samples" if remaining_samples is not None else ""
    logger.warning(f"{message}: --allow-batch-change: peak lr rescaled from {ckpt.effective_lr:.4g} to "
                   f"{effective_lr:.4g}; the schedule continues by samples seen{left}")


def write_config(run: Run, config: Dict[str, Any], **resolved: Any) -> Dict[str, Any]:
    """The run's configuration (a :func:`~contrast.runconfig.dump_run_config` dump, or flat flags) in
    the versioned form, its ``run`` facts completed with the world size, the device and ``resolved``;
    saved as ``config.json`` by rank 0."""
    config = add_facts(config, world_size=run.env.world_size, device=str(run.env.device), **resolved)
    if run.env.is_main:
        path = os.path.join(run.output_dir, "config.json")
        with open(path + ".tmp", "w") as f:
            json.dump(config, f, indent=2, sort_keys=True, default=str)
        os.replace(path + ".tmp", path)
        run.logger.info("config: " + json.dumps(config, sort_keys=True, default=str))
    return config


@dataclass(frozen=True)
class CheckpointPolicy:
    """When checkpoints are written (``--save-freq``, ``--keep-last``, ``--save-every-minutes``)."""

    save_freq: int = 10
    keep_last: int = 0
    save_every_minutes: float = 30.0
    max_failed_saves: int = 2
    retry_delay_s: float = 1.0


@dataclass(frozen=True)
class ResumeOptions:
    """Which checkpoint a run continues (``--resume``, ``--auto-resume``, ``--restart``) and whether
    it may change the total batch (``--allow-batch-change``, see :func:`check_total_batch`)."""

    path: str = ""
    auto: bool = False
    restart: bool = False
    allow_batch_change: bool = False


class Checkpointer:
    """Writes the checkpoints of a run (collective: every rank calls every method).

    ``current.pth``: at every epoch end, between two steps every ``save_every_minutes`` (0: never)
    and when the run stops on a signal; ``ckpt_epoch_<e>.pth``: a verified copy of ``current.pth``
    every ``save_freq`` epochs and at the last epoch, the oldest deleted beyond ``keep_last`` (0
    keeps all). ``extra`` (a dict the entry script updates, e.g. the kNN monitor's best) goes into
    every checkpoint.

    A failed save (disk full) leaves no partial file, keeps the previous checkpoint and is retried
    once after ``policy.retry_delay_s``. When the retry fails too, one warning names the path and
    the error and training continues (the next save tries again), unless this is the
    ``policy.max_failed_saves``-th failed save in a row (:class:`SavesFailing`, exit code
    :data:`~contrast.runtime.EXIT_SAVE_FAILED`) or the save at the end of the run or on a stop
    (:class:`~contrast.checkpoint.CheckpointSaveError`, exit code 1); both errors name the last
    good checkpoint.
    """

    def __init__(self, run: Run, model: nn.Module, optimizer, scheduler: ProgressLR, scaler, sampler: ResumableSampler,
                 config: Dict[str, Any],
                 effective_lr: float, total_batch: int, kind: str = PRETRAIN,
                 policy: CheckpointPolicy = CheckpointPolicy(), extra: Optional[Dict[str, Any]] = None) -> None:
        self.run, self.model, self.optimizer, self.scheduler = run, model, optimizer, scheduler
        self.scaler, self.sampler, self.config, self.effective_lr = scaler, sampler, config, effective_lr
        self.total_batch, self.kind, self.policy = total_batch, kind, policy
        self.extra: Dict[str, Any] = dict(extra or {})
        self.last_save = time.monotonic()
        self.last_saved: Optional[tuple] = None
        self.failed_saves = 0
        self.last_good = ""

    def restore(self, options: ResumeOptions) -> Optional[Checkpoint]:
        """Continue the checkpoint :func:`resume_checkpoint` chooses (None: a fresh start): refuse one
        of another kind or, unless allowed, another total batch (:func:`check_total_batch`); put model,
        optimiser, scheduler, grad scaler, sampler and RNGs back and merge its ``extra``."""
        ckpt = resume_checkpoint(self.run, options.path, options.auto, options.restart)
        if ckpt is None:
            return None
        if ckpt.kind != self.kind:
            hint = ("a linear evaluation one; --resume takes the linear run's checkpoint (the backbone comes from "
                    "--pretrained-model)" if self.kind == LINEAR else f"a {self.kind} one")
            raise CheckpointError(f"{ckpt.path}: a {ckpt.kind} checkpoint, not {hint}")
        seen = ckpt.samples_seen if ckpt.samples_seen is not None else ckpt.step * self.total_batch
        check_total_batch(ckpt, self.total_batch, self.run.env.world_size, options.allow_batch_change,
                          self.effective_lr, self.scheduler.total_samples - seen, self.run.logger)
        restore_training_state(ckpt, self.model, self.optimizer, self.scheduler, self.scaler, self.sampler)
        self.extra.update(ckpt.extra)
        done = len(self.sampler) - self.sampler.num_remaining
        where = f", {done} samples into epoch {ckpt.epoch + 1}" if ckpt.mid_epoch else ""
        self.run.logger.info(f"resumed from {ckpt.path} (epoch {ckpt.epoch}, step {ckpt.step}{where}, "
                             f"{self.scheduler.samples_seen} of {self.scheduler.total_samples} samples seen)")
        return ckpt

    @property
    def path(self) -> str:
        return os.path.join(self.run.output_dir, CURRENT)

    def save_due(self) -> bool:
        """Whether a time-based save is due (rank 0's clock decides; the loop shares its answer)."""
        minutes = self.policy.save_every_minutes
        return minutes > 0 and time.monotonic() - self.last_save >= 60.0 * minutes

    def save_current(self, epoch: int, step: int, consumed: Optional[int] = None, fatal: bool = False) -> bool:
        """Write ``current.pth`` (``epoch``: the last finished one; ``consumed``: this rank's samples of
        the epoch in progress, None at an epoch end). Returns whether it was written; a failure
        raises when ``fatal``, else it is logged."""
        position = (epoch, step, consumed)
        if position == self.last_saved:
            return True
        error = None
        for attempt in range(2):
            try:
                save_training_checkpoint(self.path, self.model, self.optimizer, self.scheduler, self.scaler,
                                         self.sampler, epoch, step, self.config, self.effective_lr, self.kind,
                                         self.extra, consumed=consumed,
                                         samples_seen=self.scheduler.samples_seen,
                                         total_batch=self.total_batch)
                error = None
                break
            except CheckpointSaveError as e:
                error = e
                if attempt == 0:
                    self.run.logger.warning(f"{e}; retrying once")
                    time.sleep(self.policy.retry_delay_s)
        self.last_save = time.monotonic()
        if error is None:
            self.failed_saves, self.last_saved = 0, position
            self.last_good = f"{self.path} (epoch {epoch}, step {step})"
            return True
        self.failed_saves += 1
        last_good = self.last_good or (f"{self.path} (written before this launch)" if os.path.exists(self.path)
                                       else "none: nothing was saved yet")
        if fatal:
            raise CheckpointSaveError(f"{error}; the last good checkpoint is {last_good}") from error
        if self.failed_saves >= self.policy.max_failed_saves:
            raise SavesFailing(f"{error}; {self.failed_saves} saves in a row failed (each retried once): stopping "
                               f"instead of training on without checkpoints; the last good checkpoint is "
                               f"{last_good}, resume it with --auto-resume") from error
        self.run.logger.warning(f"{error}; the previous checkpoint is kept and training continues (the run stops "
                                f"if {self.policy.max_failed_saves - self.failed_saves} more save(s) fail in a row)")
        return False

    def save_epoch(self, epoch: int, last_epoch: int, step: int) -> None:
        """``current.pth`` for finished ``epoch``, and ``ckpt_epoch_<epoch>.pth`` when it is due."""
        last = epoch == last_epoch
        if not self.save_current(epoch, step, None, fatal=last):
            return
        if epoch % self.policy.save_freq and not last:
            return
        path = os.path.join(self.run.output_dir, f"{EPOCH_PREFIX}{epoch}.pth")
        error, pruned = None, []
        if self.run.env.is_main:
            try:
                copy_checkpoint(self.path, path)
                pruned = prune_epoch_checkpoints(self.run.output_dir, self.policy.keep_last)
            except CheckpointSaveError as e:
                error = str(e)
        error = cd.broadcast_object(error, src=0)
        if error and last:
            raise CheckpointSaveError(error)
        if error:
            self.run.logger.warning(f"{error}; training continues")
            return
        self.run.logger.info(f"saved {path}" + (f" (--keep-last {self.policy.keep_last}: removed "
                                                f"{', '.join(os.path.basename(p) for p in pruned)})" if pruned else ""))
