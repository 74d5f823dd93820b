"""The training loop and the pieces the entry scripts share.

``main_pretrain.py`` and ``main_linear.py`` are thin: they parse flags, build data and model, and
use :func:`setup_run`, :func:`resume_checkpoint`, :func:`build_loader`, :func:`wrap_ddp`,
:class:`Checkpointer`, :class:`Trainer` and :func:`save_epoch` from here.

Long runs (``docs/resilience.md``): :func:`setup_run` takes the output directory's run lock,
cleans up after a crash and installs the signal handlers (:class:`StopSignals`); between two
steps the ranks agree, in the one all-reduce the loop already makes, on a non-finite loss, a stop
request (SIGTERM, SIGUSR1, SIGINT, or the death of the launcher) and a time-based save
(``--save-every-minutes``); a stop saves ``current.pth`` and raises :class:`Preempted`, which
:func:`run_cli` turns into exit code :data:`EXIT_PREEMPTED`.

One iteration of :meth:`Trainer.train_epoch` (``module`` is the :class:`TrainModule`)::

    views -> device -> aug.device (batched colour ops) -> [channels_last]
    target = module.target(index, label)
    out = model(views, target)                   # under autocast; out["loss"] is fp32
    backward [GradScaler: scaled, then unscale_ and "any gradient non-finite?" on the device]
    agree across ranks: loss finite? gradients overflowed? stop requested? save due?
        (one all-reduce, and the step's only host read of the device)
    if the loss is non-finite on any rank: skip the step everywhere, count it,
        stop after --max-nonfinite consecutive ones (NonFiniteLossError)
    unless the gradients overflowed (GradScaler): module.on_before_optimizer_step(step) -> optimizer.step
    [GradScaler.update] -> module.on_train_step_end(step, lr, grad_scale) (real steps only) -> scheduler.step
    logged values accumulate on the device, read every --print-freq steps
    [save current.pth mid-epoch if due or stopping] [raise Preempted if stopping]
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import random
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from contrast import distributed as cd
from contrast.checkpoint import (CURRENT, EPOCH_PREFIX, PRETRAIN, Checkpoint, CheckpointError, CheckpointSaveError,
                                 choose_resume, copy_checkpoint, prune_epoch_checkpoints, read_checkpoint,
                                 recover_output_dir, save_training_checkpoint)
from contrast.data import DatasetError
from contrast.data.workers import STOP_SIGNALS, Loader, kill_workers, shutdown_workers
from contrast.divergence import Divergence, RolledBack
from contrast.logger import AverageMeter, DeviceMeters, TensorBoard, format_eta, peak_memory_mb, setup_logger
from contrast.models.base import TrainModule
from contrast.placement import place, place_inputs
from contrast.precision import Precision
from contrast.runlock import RunLock, RunLockError
from contrast.runconfig import add_facts
from contrast.watchdog import SignalWatchdog

#: Exit code of a run stopped by a signal (or by its launcher's death) after saving a checkpoint:
#: ``EX_TEMPFAIL`` of sysexits.h, "try again": resume it with ``--auto-resume``.
EXIT_PREEMPTED = 75
#: Exit code of a run stopped because its checkpoints cannot be written (two consecutive saves
#: failed, each retried once: ``CheckpointPolicy.max_failed_saves``): ``EX_IOERR`` of sysexits.h.
#: The error line names the last good checkpoint; free space and resume it with ``--auto-resume``.
EXIT_SAVE_FAILED = 74
_MASK64 = (1 << 64) - 1
_DIST_ERRORS = tuple(getattr(torch.distributed, n) for n in ("DistBackendError", "DistNetworkError")
                     if hasattr(torch.distributed, n))


class NonFiniteLossError(RuntimeError):
    """Too many consecutive iterations with a NaN/inf loss."""


class SavesFailing(CheckpointSaveError):
    """Saves keep failing (see :class:`Checkpointer`): :func:`run_cli` exits with :data:`EXIT_SAVE_FAILED`."""

    exit_code = EXIT_SAVE_FAILED


class Preempted(RuntimeError):
    """The run stopped on a signal or on its launcher's death (after saving a checkpoint when it had
    started training); :func:`run_cli` exits with :data:`EXIT_PREEMPTED`."""

    exit_code = EXIT_PREEMPTED


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (SplitMix64 finaliser over the parts)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = ((h ^ (int(p) & _MASK64)) * 0x9E3779B97F4A7C15) & _MASK64
        h ^= h >> 31
        h = (h * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 27
    return h & ((1 << 63) - 1)


class StopSignals:
    """SIGTERM, SIGUSR1 and SIGINT handlers of a run (main thread only).

    Before :meth:`arm` (nothing to save yet) a signal raises :class:`Preempted` at once. Armed, the
    first signal only records a request that the loop turns into "save, then exit" at the next
    step (every rank agrees first); a second signal exits at once with code ``128 + signum`` (rank 0
    prints the line), its DataLoader workers killed. A signal within :attr:`DUPLICATE_S` seconds of
    the first is the same request (a process group's signal that its launcher forwards again). A
    :class:`~contrast.watchdog.SignalWatchdog` enforces both exits while the main thread is blocked in
    C code (a CUDA synchronisation on a dead peer's collective), where this handler cannot run.
    """

    DUPLICATE_S = 2.0

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        self.armed = False
        self.where = ""
        self.first_at = 0.0
        self._previous: Dict[int, Any] = {}
        self.watchdog = SignalWatchdog([getattr(signal, n) for n in STOP_SIGNALS if hasattr(signal, n)],
                                       where=lambda: self.where, duplicate_s=self.DUPLICATE_S,
                                       before_exit=_leave_quietly, quiet=lambda: int(os.environ.get("RANK", "0")) > 0)

    def install(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)
        self.watchdog.start()
        return self

    def uninstall(self) -> None:
        self.watchdog.stop()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def arm(self, where: str) -> None:
        """From now on a first signal asks for a checkpoint (``where``: its path, for messages)."""
        self.armed, self.where = True, where

    def request(self, reason: str) -> None:
        if self.requested is None:
            self.requested = reason

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        self.watchdog.acknowledge()
        if self.requested is not None:
            if time.monotonic() - self.first_at < self.DUPLICATE_S:
                return
            self.watchdog.leave(self.watchdog.second_signal_line(signum), signum)
        self.requested, self.first_at = name, time.monotonic()
        if not self.armed:
            raise Preempted(f"stopped by {name} before training started (nothing to save)")
        logging.getLogger("contrast").warning(f"{name} received: saving a checkpoint after the current step, "
                                              f"then exiting (send it again to exit at once)")


@dataclass
class Run:
    """Per-process context: distributed environment, logger, TensorBoard, output directory,
    run lock and signal handlers (:meth:`close` releases both)."""

    env: cd.DistEnv
    logger: logging.Logger
    tb: TensorBoard
    output_dir: str
    signals: StopSignals = field(default_factory=StopSignals)
    lock: Optional[RunLock] = None

    def close(self) -> None:
        """Release the run lock and restore the signal handlers (idempotent)."""
        if self.lock is not None:
            self.lock.release()
        self.signals.uninstall()


@dataclass
class TrainState:
    """Counters that survive across epochs (``step`` is saved in checkpoints)."""

    step: int = 0
    nonfinite_run: int = 0
    nonfinite_total: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def setup_run(name: str, output_dir: str, device: str = "auto", local_rank: int = -1, seed: int = 0,
              tensorboard: bool = True, lock: bool = False) -> Run:
    """Initialise distributed, seeds (``seed`` + rank), output dir, logger and TensorBoard, and
    install the stop-signal handlers. ``lock`` (a training run): rank 0 takes the output
    directory's run lock (:class:`~contrast.runlock.RunLock`; an error on every rank when another
    run holds it) and cleans up after a crash (:func:`~contrast.checkpoint.recover_output_dir`)."""
    signals, run_lock = StopSignals().install(), None
    try:
        env = cd.init_distributed(device, local_rank)
        seed_everything(seed + env.rank)
        os.makedirs(output_dir, exist_ok=True)
        notes, error = [], None
        if lock and env.is_main:
            run_lock = RunLock(output_dir)
            try:
                taken = run_lock.acquire()
                notes = ([taken] if taken else []) + recover_output_dir(output_dir)
            except RunLockError as e:
                error = str(e)
        if lock:
            error = cd.broadcast_object(error, src=0)
            if error:
                raise RunLockError(error)
    except BaseException:
        if run_lock is not None:
            run_lock.release()
        signals.uninstall()
        raise
    logger = setup_logger(output_dir, env.rank)
    tb = TensorBoard(output_dir, tensorboard and env.is_main, logger)
    where = f"rank {env.rank} of {env.world_size} ({env.backend})" if env.world_size > 1 else "single process"
    logger.info(f"{name}: {where}, device {env.device}")
    for note in notes:
        logger.warning(note)
    return Run(env, logger, tb, output_dir, signals, run_lock)


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


def build_loader(dataset, sampler: Sampler, batch_size: int, num_workers: int, device: torch.device,
                 train: bool, seed: int = 0) -> DataLoader:
    """DataLoader (:class:`~contrast.data.workers.Loader`: its workers end on every exit path): pinned
    memory on CUDA, persistent seeded workers, ``drop_last`` when training.
    Its own generator (seeded by ``seed`` and the rank) draws the workers' base seed, so creating
    an iterator does not consume the global RNG, whose state a checkpoint restores."""
    generator = torch.Generator()
    generator.manual_seed(mix_seed(seed, cd.get_rank(), 0x10AD))
    return Loader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                  pin_memory=device.type == "cuda", drop_last=train, persistent_workers=num_workers > 0,
                  generator=generator)


def wrap_ddp(model: nn.Module, env: cd.DistEnv) -> nn.Module:
    """``DistributedDataParallel`` on several ranks. Buffers are not broadcast: methods keep their
    banks/queues identical from gathered tensors, and a per-step broadcast of a bank is costly."""
    if env.world_size == 1:
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters \
        else {"broadcast_buffers": False}   # torch < 2.13
    return ddp(model, device_ids=ids, **no_sync)


def prepare_model(model: nn.Module, device: torch.device, sync_batchnorm: bool = False,
                  channels_last: bool = False, compile_backbone: bool = False) -> nn.Module:
    """Move to ``device`` (:func:`~contrast.placement.place`); cross-rank batch norm when
    ``sync_batchnorm`` and distributed; ``--channels-last``; ``--compile`` compiles the backbone in
    place (``nn.Module.compile`` keeps state-dict keys, so checkpoints stay portable), except with
    ``SyncBatchNorm`` on several ranks, which graph-breaks at every layer and fails upstream
    (pytorch#107372): a warning, and the backbone runs eagerly."""
    distributed_bn = sync_batchnorm and cd.get_world_size() > 1
    if sync_batchnorm:
        model = cd.convert_sync_batchnorm(model, device)
    model = place(model, device, channels_last)
    if compile_backbone and distributed_bn:
        logging.getLogger("contrast").warning(
            "--compile skipped: this method uses SyncBatchNorm on several ranks, which torch.compile "
            "breaks the graph at and fails on (pytorch#107372); the backbone runs eagerly")
    elif compile_backbone:
        model.backbone.compile()
    return model


def check_iters(loader: DataLoader, batch_size: int, world_size: int, flag: str = "--batch-size") -> int:
    """Iterations per epoch; a one-line error naming ``flag`` when a process gets no full batch."""
    n = len(loader)
    if n == 0:
        raise ValueError(f"{flag} {batch_size} per process is larger than the {len(loader.sampler)} images "
                         f"each of the {world_size} process(es) gets per epoch; lower the batch size")
    return n


@dataclass(frozen=True)
class LoopOptions:
    """How the loop runs and reports (``--print-freq``, ``--max-nonfinite``, ``--channels-last``;
    ``seed`` seeds the per-step generator of the device-side augmentation; ``--on-divergence``,
    ``--rollback-lr-factor``: see :mod:`contrast.divergence`)."""

    print_freq: int = 100
    max_nonfinite: int = 10
    channels_last: bool = False
    seed: int = 0
    on_divergence: str = "stop"
    rollback_lr_factor: float = 0.5


@dataclass(frozen=True)
class CheckpointPolicy:
    """When checkpoints are written (``--save-freq``, ``--keep-last``, ``--save-every-minutes``)."""

    save_freq: int = 10
    keep_last: int = 0
    save_every_minutes: float = 30.0
    max_failed_saves: int = 2
    retry_delay_s: float = 1.0


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
    :data:`EXIT_SAVE_FAILED`) or the save at the end of the run or on a stop
    (:class:`~contrast.checkpoint.CheckpointSaveError`, exit code 1); both errors name the last
    good checkpoint.
    """

    def __init__(self, run: Run, model: nn.Module, optimizer, scheduler, scaler, sampler, config: Dict[str, Any],
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
                                         samples_seen=getattr(self.scheduler, "samples_seen", None),
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


class Trainer:
    """Drives a :class:`~contrast.models.base.TrainModule` through epochs.

    ``model`` is what runs the forward pass (the module, or its ``DistributedDataParallel`` wrapper);
    every hook of ``module`` is called at its point of the step (see ``contrast.models.base``).
    With a ``checkpointer`` the loop saves between steps when a time-based save is due and when the
    run must stop (a signal, or its torchrun launcher died), then raises :class:`Preempted`.
    An epoch whose sampler was restored mid-epoch continues after the samples it already consumed.
    """

    def __init__(self, model: nn.Module, module: TrainModule, optimizer: torch.optim.Optimizer, scheduler,
                 precision: Precision, run: Run, options: LoopOptions, device_aug: Optional[nn.Module] = None,
                 state: Optional[TrainState] = None, checkpointer: Optional[Checkpointer] = None) -> None:
        self.model, self.module = model, module
        self.optimizer, self.scheduler, self.precision = optimizer, scheduler, precision
        self.run, self.options, self.device_aug = run, options, device_aug
        self.state = state if state is not None else TrainState()
        self.checkpointer = checkpointer
        place(module, run.env.device)
        self.device_aug = place(device_aug, run.env.device)
        self._grad_scale: Any = 1.0
        self.divergence = Divergence(options.on_divergence, options.rollback_lr_factor, checkpointer, self.state,
                                     run.logger)
        # torchrun's workers: a changed parent pid means the launcher died and nobody supervises us
        self._launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        run.signals.arm(checkpointer.path if checkpointer is not None else "")

    def start(self, total_steps: int, steps_per_epoch: int) -> None:
        """Tell the module the schedule's length (once per process, also after a resume)."""
        self.module.on_train_start(total_steps, steps_per_epoch)

    def _inputs(self, views, index: torch.Tensor, label: torch.Tensor, epoch: int, it: int):
        device = self.run.env.device
        views = place_inputs(views if isinstance(views, (list, tuple)) else [views], device)
        if self.device_aug is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(mix_seed(self.options.seed, self.run.env.rank, epoch, it))
            with torch.no_grad():
                views = self.device_aug(views, generator=generator)
        if self.options.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        return views, self.module.target(index, label).to(device, non_blocking=True)

    def _agree(self, loss: torch.Tensor, overflow: Optional[torch.Tensor]) -> tuple:
        """(loss finite on every rank, GradScaler overflow on any rank, stop requested on any rank,
        time-based save due): one all-reduce and the step's one host read of the device."""
        signals = self.run.signals
        if self._launcher is not None and signals.requested is None and os.getppid() != self._launcher:
            signals.request("the death of its launcher")
            self.run.logger.warning(f"the launcher (pid {self._launcher}) died: saving a checkpoint after this step, "
                                    f"then exiting")
        save = self.checkpointer is not None and self.run.env.is_main and self.checkpointer.save_due()
        flags = loss.detach().new_zeros(4, dtype=torch.float32)   # filled on the device: no host copy
        flags[0] = (~torch.isfinite(loss.detach())).float()
        if overflow is not None:
            flags[1] = overflow.float()
        if signals.requested is not None:
            flags[2] = 1.0
        if save:
            flags[3] = 1.0
        cd.all_reduce_max(flags)
        nonfinite, overflow, stop, save = (v > 0.5 for v in flags.tolist())
        return not nonfinite, overflow, stop, save

    def _skip_nonfinite(self, epoch: int, it: int) -> None:
        state, opts = self.state, self.options
        self.optimizer.zero_grad(set_to_none=True)
        if self.precision.scaler is not None:
            self.precision.scaler.update()   # consumes this step's unscale_ (the scale backs off)
        state.nonfinite_run += 1
        state.nonfinite_total += 1
        self.run.logger.warning(f"non-finite loss at epoch {epoch} iteration {it + 1}: step skipped on all ranks "
                                f"({state.nonfinite_run} in a row, {state.nonfinite_total} in total)")
        self.divergence.nonfinite(epoch, it, state.nonfinite_run)
        if state.nonfinite_run >= opts.max_nonfinite:
            why_not = self.divergence.try_roll_back(epoch)   # raises RolledBack when it rolled back
            raise NonFiniteLossError(
                f"stopping: {state.nonfinite_run} consecutive non-finite losses (--max-nonfinite "
                f"{opts.max_nonfinite}) at epoch {epoch} iteration {it + 1}; the last good checkpoint is "
                f"{os.path.join(self.run.output_dir, CURRENT)} (lower the lr, use --amp-opt-level O0, "
                f"--on-divergence rollback or resume){why_not}")

    def _backward(self, loss: torch.Tensor) -> Optional[torch.Tensor]:
        """backward; with a GradScaler also unscale the gradients and return whether any is
        non-finite, as a device tensor (no host read: :meth:`_agree` reads it with the rest)."""
        scaler = self.precision.scaler
        if scaler is None:
            loss.backward()
            return None
        self._grad_scale = scaler.scale(torch.ones((), device=loss.device))   # this step's scale, on the device
        scaler.scale(loss).backward()
        scaler.unscale_(self.optimizer)
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        return ~torch.isfinite(torch.nn.utils.get_total_norm(grads)) if grads else None

    def _step(self, overflow: bool) -> None:
        """The module's pre-step hook and the optimiser step, skipped on a GradScaler ``overflow``
        (the scale backs off); the post-step hook on real steps only. ``GradScaler.step`` is not
        used: it reads ``found_inf`` on the host, which :meth:`_agree` already did."""
        scaler, step = self.precision.scaler, self.state.step
        if not overflow:
            self.module.on_before_optimizer_step(step)
            self.optimizer.step()
        grad_scale = self._grad_scale if scaler is not None else 1.0
        if scaler is not None:
            scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if not overflow:
            self.module.on_train_step_end(step, self.optimizer.param_groups[0]["lr"], grad_scale)
        self.scheduler.step()
        self.state.step += 1

    def _between_steps(self, epoch: int, it: int, consumed: int, stop: bool, save: bool, last: bool) -> None:
        """Save ``current.pth`` mid-epoch when due or stopping (a time-based save at the ``last`` step
        of the epoch is left to the epoch-end save); raise :class:`Preempted` when stopping."""
        ckpt = self.checkpointer
        if ckpt is not None and (stop or (save and not last)):
            ckpt.save_current(epoch - 1, self.state.step, consumed, fatal=stop)
        if stop:
            reason = self.run.signals.requested or "a signal on another rank"
            saved = f"checkpoint {ckpt.path} (step {self.state.step}) saved" if ckpt is not None else "no checkpoint"
            raise Preempted(f"stopped by {reason} at epoch {epoch} iteration {it + 1}: {saved}; resume with "
                            f"--auto-resume")

    def train_epoch(self, loader: Iterable, epoch: int, num_epochs: int) -> Dict[str, float]:
        """One epoch (or its rest, after a mid-epoch resume); returns its mean loss, throughput and the
        mean of every logged scalar (of the part after the last rollback, :mod:`contrast.divergence`)."""
        while True:
            try:
                return self._train_pass(loader, epoch, num_epochs)
            except RolledBack:   # the state is the checkpoint's: continue the epoch from its position
                continue

    def _train_pass(self, loader: Iterable, epoch: int, num_epochs: int) -> Dict[str, float]:
        run, opts = self.run, self.options
        device, logger = run.env.device, run.logger
        self.model.train()
        num_iters = len(loader)
        sampler, batch_size = getattr(loader, "sampler", None), getattr(loader, "batch_size", None) or 1
        offset = len(sampler) - sampler.num_remaining if hasattr(sampler, "num_remaining") else 0
        first = offset // batch_size
        meters, time_meter, data_meter = DeviceMeters(), AverageMeter(), AverageMeter()
        images = 0
        end = time.perf_counter()
        for it, (views, index, label) in enumerate(loader, start=first):
            if self.divergence.skip(epoch, it):
                end = time.perf_counter()
                continue
            data_time = time.perf_counter() - end
            views, target = self._inputs(views, index, label, epoch, it)
            lr = self.optimizer.param_groups[0]["lr"]
            with self.precision.autocast(device):
                out = self.model(views, target)
            loss = out["loss"]
            overflow = self._backward(loss)
            finite, overflow, stop, save = self._agree(loss, overflow)
            consumed = offset + (it - first + 1) * batch_size
            if not finite:   # no time-based save: the forward pass may have changed buffers (queues, BN stats)
                self._skip_nonfinite(epoch, it)
                self._between_steps(epoch, it, consumed, stop, False, it + 1 >= num_iters)
                end = time.perf_counter()
                continue
            self.state.nonfinite_run = 0
            self._step(overflow)

            batch = views[0].shape[0]
            images += batch
            meters.update(out, batch)   # no host read
            time_meter.update(time.perf_counter() - end)
            data_meter.update(data_time)
            if (it + 1) % opts.print_freq == 0 or it + 1 == num_iters:
                last, mean = meters.read()   # the logged values: read on print steps only
                ips = batch * run.env.world_size / max(time_meter.avg, 1e-9)
                eta = time_meter.avg * ((num_iters - it - 1) + (num_epochs - epoch) * num_iters)
                extras = {k: v for k, v in last.items() if k != "loss"}
                logger.info(f"train epoch [{epoch}/{num_epochs}] iter [{it + 1}/{num_iters}] lr {lr:.4g} "
                            f"loss {last['loss']:.4f} ({mean['loss']:.4f}) images/s {ips:.1f} "
                            f"data {100 * data_meter.sum / max(time_meter.sum, 1e-9):.0f}% "
                            f"mem {peak_memory_mb(device):.0f}MB eta {format_eta(eta)}"
                            + "".join(f" {k} {v:.4g}" for k, v in extras.items()))
                run.tb.scalars({"loss": last["loss"], "lr": lr, "images_per_s": ips, **extras}, self.state.step,
                               prefix="train/")
            self._between_steps(epoch, it, consumed, stop, save, it + 1 >= num_iters)
            end = time.perf_counter()
        corrupt = getattr(getattr(loader, "dataset", None), "num_corrupt", 0)
        if corrupt:
            logger.warning(f"{corrupt} corrupt image(s) replaced so far (see the warnings above for the files)")
        _, mean = meters.read()
        return {"loss": mean.get("loss", 0.0), "images_per_s": images * run.env.world_size / max(time_meter.sum, 1e-9),
                **{k: v for k, v in mean.items() if k != "loss"}}


def save_epoch(checkpointer: Checkpointer, epoch: int, last_epoch: int, step: int) -> None:
    """``current.pth`` every epoch, ``ckpt_epoch_<e>.pth`` every ``--save-freq`` epochs and at the end
    (collective; see :meth:`Checkpointer.save_epoch`)."""
    checkpointer.save_epoch(epoch, last_epoch, step)




#: Set by ``python -m contrast.launch`` for the processes it starts: it reports their errors itself.
LAUNCHER_ENV = "CONTRAST_LAUNCHER"
#: How a rank reports the loss of a peer (a consequence: the launcher prefers another rank's line).
LOST_CONTACT = "lost contact with another process of the run"
#: User errors :func:`run_cli` reports in one line, exit code 1 (bad flags, data, checkpoints, files,
#: non-finite losses, a locked output dir, a lost peer process).
USER_ERRORS = (CheckpointError, NonFiniteLossError, DatasetError, ValueError, OSError, RunLockError) + _DIST_ERRORS


#: What gloo / NCCL raise (as a plain RuntimeError) when a peer process is gone.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def _peer_lost(e: BaseException) -> bool:
    return cd.is_dist() and isinstance(e, RuntimeError) and any(s in str(e) for s in _PEER_LOST)


def _leave_quietly() -> None:
    """Before an immediate exit: later stop signals change nothing, DataLoader workers are killed."""
    _ignore_stop_signals()
    kill_workers()


def _ignore_stop_signals() -> None:
    """On the way out (the cause and its exit code are known) a stop signal changes nothing: torchrun
    sends SIGTERM to the ranks still running when one exits, and would otherwise replace the exit
    code by -15."""
    if threading.current_thread() is threading.main_thread():
        for name in STOP_SIGNALS:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_IGN)


def _write_error_file(line: str) -> bool:
    """Hand ``line`` to the torchrun agent through its error file (``TORCHELASTIC_ERROR_FILE``, in the
    format of ``torch.distributed.elastic``'s ``ErrorHandler``), so its failure report quotes the line
    where it would put a traceback (the traceback is in the log file)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        return False
    return True


def run_cli(main: Callable[[Optional[List[str]]], Any], argv: Optional[List[str]] = None) -> None:
    """Run an entry point; a user error (bad input, bad checkpoint, non-finite loss, a missing file, a
    locked output dir, a lost peer, ...) ends with one clear line and exit code 1, its traceback only in
    the log file (and on the console with ``--debug``). A run stopped by a signal ends with one line and
    :data:`EXIT_PREEMPTED`; one whose saves keep failing with :data:`EXIT_SAVE_FAILED`. The DataLoader
    workers are ended on every way out (:func:`~contrast.data.workers.shutdown_workers`).

    Under torchrun the line also goes to the agent's error file; rank 0 prints it at once, another rank
    after a 1 s pause (an error every rank meets is then reported by rank 0, whose exit makes torchrun
    stop the others). Under ``python -m contrast.launch`` the launcher prints the line instead.
    """
    args = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except Preempted as e:
        _ignore_stop_signals()
        logging.getLogger("contrast").warning(str(e))
        if (cd.get_rank() if cd.is_dist() else int(os.environ.get("RANK", "0"))) == 0:
            print(f"{os.path.basename(sys.argv[0])}: {e} (exit code {e.exit_code})", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # before the signal handlers were installed
        print(f"{os.path.basename(sys.argv[0])}: interrupted", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)
    except (*USER_ERRORS, RuntimeError) as e:
        lost = isinstance(e, _DIST_ERRORS) or _peer_lost(e)
        if "--debug" in args or not (lost or isinstance(e, USER_ERRORS)):
            raise
        _ignore_stop_signals()
        if lost:
            e = RuntimeError(f"{LOST_CONTACT} (it died or was killed): "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; the last checkpoint is "
                             f"kept, resume with --auto-resume")
        record = logging.makeLogRecord({"name": "contrast", "levelno": logging.ERROR, "levelname": "ERROR",
                                        "msg": traceback.format_exc()})
        for h in logging.getLogger("contrast").handlers:
            if isinstance(h, logging.FileHandler):
                h.handle(record)
        rank = cd.get_rank() if cd.is_dist() else int(os.environ.get("RANK", "0"))
        where = f" (rank {rank})" if rank > 0 else ""
        line = f"{os.path.basename(sys.argv[0])}: error{where}: {e}"
        if rank > 0:
            time.sleep(1.0)
        reported = _write_error_file(line) and os.environ.get(LAUNCHER_ENV) == "1"
        if not reported:
            print(line, file=sys.stderr, flush=True)
        sys.exit(EXIT_SAVE_FAILED if isinstance(e, SavesFailing) else 1)
    finally:
        shutdown_workers()
        cd.cleanup()
