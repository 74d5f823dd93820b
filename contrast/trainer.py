"""The training loop: :meth:`Trainer.fit` runs a whole training (pretraining and linear evaluation).

:meth:`Trainer.fit`: restore the checkpoint the run continues (:meth:`Checkpointer.restore
<contrast.checkpointer.Checkpointer.restore>`), then for every epoch: ``sampler.set_epoch``,
:meth:`Trainer.train_epoch`, the entry script's ``after_epoch`` callback (kNN monitor, or validation
and best accuracy, which it keeps in ``checkpointer.extra``), and the epoch's checkpoints.
Between two steps the ranks agree, in the one all-reduce the loop already makes, on a non-finite
loss, a stop request (SIGTERM, SIGUSR1, SIGINT, or the death of the launcher) and a time-based save
(``--save-every-minutes``); a stop saves ``current.pth`` and raises
:class:`~contrast.runtime.Preempted` (``docs/resilience.md``).

One iteration of :meth:`Trainer.train_epoch` (``module`` is the :class:`TrainModule`)::

    views -> device -> aug.device (batched colour ops) -> [channels_last]
    target = module.target(index, label)
    out = model(views, target)                   # under autocast; out["loss"] is fp32
    backward [GradScaler: scaled, then unscale_ and "any gradient non-finite?" on the device]
    agree across ranks: loss finite? gradients overflowed? stop requested? save due?
        (one all-reduce, and the step's only host read of the device)
    if the loss is non-finite on any rank: skip the step everywhere, count it,
        stop after --max-nonfinite consecutive ones (NonFiniteLossError)
    unless the gradients overflowed (GradScaler): [--clip-grad: each gradient's norm clipped]
        -> module.on_before_optimizer_step(step) -> optimizer.step
    [GradScaler.update] -> module.on_train_step_end(step, lr, grad_scale) (real steps only) -> scheduler.step
    monitors.after_step(label): online probe, collapse monitors (contrast.monitors; skipped steps: discard)
    logged values accumulate on the device, read every --print-freq steps (a collapse warning then)
    [save current.pth mid-epoch if due or stopping] [raise Preempted if stopping]
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from contrast import distributed as cd
from contrast.checkpoint import CURRENT
from contrast.checkpointer import Checkpointer, ResumeOptions
from contrast.data.samplers import ResumableSampler
from contrast.divergence import Divergence, RolledBack
from contrast.logger import AverageMeter, DeviceMeters, format_eta, peak_memory_mb
from contrast.models.base import TrainModule
from contrast.monitors.hub import EXTRA_KEY, Monitors
from contrast.optim import clip_grad_per_param_
from contrast.placement import place, place_inputs
from contrast.precision import Precision
from contrast.runtime import NonFiniteLossError, Preempted, Run
from contrast.seeding import mix_seed


@dataclass
class TrainState:
    """Counters that survive across epochs (``step`` is saved in checkpoints)."""

    step: int = 0
    nonfinite_run: int = 0
    nonfinite_total: int = 0



@dataclass(frozen=True)
class LoopOptions:
    """How the loop runs and reports (``--print-freq``, ``--max-nonfinite``, ``--channels-last``;
    ``seed`` seeds the per-step generator of the device-side augmentation; ``--on-divergence``,
    ``--rollback-lr-factor``: see :mod:`contrast.divergence`; ``clip_grad`` > 0: ``--clip-grad``, each
    parameter's gradient norm clipped after unscaling, before the step, :func:`clip_grad_per_param_`)."""

    print_freq: int = 100
    max_nonfinite: int = 10
    channels_last: bool = False
    seed: int = 0
    on_divergence: str = "stop"
    rollback_lr_factor: float = 0.5
    clip_grad: float = 0.0



class Trainer:
    """Drives a :class:`~contrast.models.base.TrainModule` through epochs (:meth:`fit`).

    ``model`` is what runs the forward pass (the module, or its ``DistributedDataParallel`` wrapper);
    every hook of ``module`` is called at its point of the step (see ``contrast.models.base``).
    With a ``checkpointer`` the loop saves between steps when a time-based save is due and when the
    run must stop (a signal, or its torchrun launcher died), then raises :class:`Preempted`.
    An epoch whose sampler was restored mid-epoch continues after the samples it already consumed.
    """

    def __init__(self, model: nn.Module, module: TrainModule, optimizer: torch.optim.Optimizer, scheduler,
                 precision: Precision, run: Run, options: LoopOptions, device_aug: Optional[nn.Module] = None,
                 state: Optional[TrainState] = None, checkpointer: Optional[Checkpointer] = None,
                 monitors: Optional[Monitors] = None) -> None:
        self.model, self.module = model, module
        self.optimizer, self.scheduler, self.precision = optimizer, scheduler, precision
        self.run, self.options, self.device_aug = run, options, device_aug
        self.state = state if state is not None else TrainState()
        self.checkpointer = checkpointer
        self.monitors = monitors if monitors is not None else Monitors.off()
        place(module, run.env.device)
        self.device_aug = place(device_aug, run.env.device)
        self._grad_scale: Any = 1.0
        self.divergence = self._new_divergence()
        # torchrun's workers: a changed parent pid means the launcher died and nobody supervises us
        self._launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        run.signals.arm(checkpointer.path if checkpointer is not None else "")

    def _new_divergence(self) -> Divergence:
        return Divergence(self.options.on_divergence, self.options.rollback_lr_factor, self.checkpointer, self.state,
                          self.run.logger, self.monitors, self.run.env.device)

    def start(self, total_steps: int, steps_per_epoch: int) -> None:
        """Tell the module and the monitors the schedule's length (once per process, also after a resume)."""
        self.module.on_train_start(total_steps, steps_per_epoch)
        self.monitors.start(total_steps)

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
            if self.options.clip_grad > 0:
                clip_grad_per_param_([p for g in self.optimizer.param_groups for p in g["params"]],
                                     self.options.clip_grad)
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

    def _stash_monitors(self) -> None:
        """The monitors' state (the online probe) into the checkpoint's ``extra`` (nothing when off)."""
        state = self.monitors.state_dict()
        if state:
            self.checkpointer.extra[EXTRA_KEY] = state

    def _between_steps(self, epoch: int, it: int, consumed: int, stop: bool, save: bool, last: bool) -> None:
        """Save ``current.pth`` mid-epoch when due or stopping (a time-based save at the ``last`` step
        of the epoch is left to the epoch-end save); raise :class:`Preempted` when stopping."""
        ckpt = self.checkpointer
        if ckpt is not None and (stop or (save and not last)):
            self._stash_monitors()
            ckpt.save_current(epoch - 1, self.state.step, consumed, fatal=stop)
        if stop:
            reason = self.run.signals.requested or "a signal on another rank"
            saved = f"checkpoint {ckpt.path} (step {self.state.step}) saved" if ckpt is not None else "no checkpoint"
            raise Preempted(f"stopped by {reason} at epoch {epoch} iteration {it + 1}: {saved}; resume with "
                            f"--auto-resume")

    def fit(self, loader: DataLoader, num_epochs: int, resume: ResumeOptions = ResumeOptions(), start_epoch: int = 1,
            after_epoch: Callable[[int, Dict[str, float]], None] = lambda epoch, stats: None) -> None:
        """Train epochs ``start_epoch .. num_epochs`` (after a resume: from the checkpoint's next one).

        Restores the checkpoint ``resume`` names (a fresh run with ``start_epoch > 1`` fast-forwards
        the schedule instead), calls :meth:`start`, then per epoch: ``set_epoch`` on the loader's
        :class:`~contrast.data.samplers.ResumableSampler`, :meth:`train_epoch`, its stats to
        TensorBoard (``epoch/``), ``after_epoch(epoch, stats)``, the epoch's checkpoints
        (:meth:`Checkpointer.save_epoch <contrast.checkpointer.Checkpointer.save_epoch>`)."""
        checkpointer, sampler, state = self.checkpointer, loader.sampler, self.state
        if checkpointer is None:
            raise ValueError("Trainer.fit needs a checkpointer")
        if not isinstance(sampler, ResumableSampler):
            raise TypeError(f"Trainer.fit needs a ResumableSampler, not {type(sampler).__name__}")
        iters = len(loader)
        ckpt = checkpointer.restore(resume)
        if ckpt is not None:
            start_epoch, state.step = ckpt.epoch + 1, ckpt.step
            self.divergence = self._new_divergence()   # reads the rollbacks' lr scale and skipped batches
            self.monitors.restore(checkpointer.extra, self.run.env.device)
        elif start_epoch > 1:
            self.scheduler.last_epoch = (start_epoch - 1) * iters - 1
            self.scheduler.step()
            state.step = (start_epoch - 1) * iters
        self.start(num_epochs * iters, iters)
        for epoch in range(start_epoch, num_epochs + 1):
            sampler.set_epoch(epoch)
            stats = self.train_epoch(loader, epoch, num_epochs, sampler, loader.batch_size)
            corrupt = getattr(loader.dataset, "num_corrupt", 0)   # the image datasets count them; others have none
            if corrupt:
                self.run.logger.warning(f"{corrupt} corrupt image(s) replaced so far (see the warnings above for "
                                        f"the files)")
            self.run.tb.scalars(stats, epoch, prefix="epoch/")
            after_epoch(epoch, stats)
            self._stash_monitors()
            checkpointer.save_epoch(epoch, num_epochs, state.step)

    def train_epoch(self, batches: Iterable, epoch: int, num_epochs: int, sampler: Optional[ResumableSampler] = None,
                    batch_size: int = 1) -> Dict[str, float]:
        """One epoch (or its rest, after a mid-epoch resume); returns its mean loss, throughput and the
        mean of every logged scalar (of the part after the last rollback, :mod:`contrast.divergence`).
        ``sampler`` (the one ``batches`` of ``batch_size`` samples come from) tells how far into the
        epoch the batches start: after a mid-epoch resume, or after a rollback."""
        while True:
            try:
                return self._train_pass(batches, epoch, num_epochs, sampler, batch_size)
            except RolledBack:   # the state is the checkpoint's: continue the epoch from its position
                continue

    def _train_pass(self, loader: Iterable, epoch: int, num_epochs: int, sampler: Optional[ResumableSampler],
                    batch_size: int) -> Dict[str, float]:
        run, opts = self.run, self.options
        device, logger = run.env.device, run.logger
        self.model.train()
        num_iters = len(loader)
        offset = len(sampler) - sampler.num_remaining if sampler is not None else 0
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
            self.monitors.before_forward(self.state.step)
            with self.precision.autocast(device):
                out = self.model(views, target)
            loss = out["loss"]
            overflow = self._backward(loss)
            finite, overflow, stop, save = self._agree(loss, overflow)
            consumed = offset + (it - first + 1) * batch_size
            if not finite:   # no time-based save: the forward pass may have changed buffers (queues, BN stats)
                self.monitors.discard()
                self._skip_nonfinite(epoch, it)
                self._between_steps(epoch, it, consumed, stop, False, it + 1 >= num_iters)
                end = time.perf_counter()
                continue
            self.state.nonfinite_run = 0
            self._step(overflow)
            logged = self.monitors.after_step(label)

            batch = views[0].shape[0]
            images += batch
            meters.update({**out, **logged}, batch)   # no host read
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
                warning = self.monitors.warning(last, epoch)
                if warning is not None:
                    logger.warning(warning)
            self._between_steps(epoch, it, consumed, stop, save, it + 1 >= num_iters)
            end = time.perf_counter()
        _, mean = meters.read()
        return {"loss": mean.get("loss", 0.0), "images_per_s": images * run.env.world_size / max(time_meter.sum, 1e-9),
                **{k: v for k, v in mean.items() if k != "loss"}}
