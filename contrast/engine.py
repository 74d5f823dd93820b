"""The training loop and the pieces the entry scripts share.

``main_pretrain.py`` and ``main_linear.py`` are thin: they parse flags, build data and model, and
use :func:`setup_run`, :func:`build_loader`, :func:`wrap_ddp`,
:class:`Trainer` and :func:`save_epoch` from here.

One iteration of :meth:`Trainer.train_epoch` (``module`` is the :class:`TrainModule`)::

    views -> device -> aug.device (batched colour ops) -> [channels_last]
    target = module.target(index, label)
    out = model(views, target)                   # under autocast; out["loss"] is fp32
    if the loss is non-finite on any rank: skip the step everywhere, count it,
        stop after --max-nonfinite consecutive ones (NonFiniteLossError)
    backward [GradScaler, unscale] -> module.on_before_optimizer_step(step) -> optimizer.step
    -> module.on_train_step_end(step, lr, grad_scale) (real steps only) -> scheduler.step
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from contrast import distributed as cd
from contrast.checkpoint import CURRENT, CheckpointError, save_training_checkpoint
from contrast.data import DatasetError
from contrast.logger import AverageMeter, TensorBoard, format_eta, peak_memory_mb, setup_logger
from contrast.models.base import TrainModule
from contrast.precision import Precision


class NonFiniteLossError(RuntimeError):
    """Too many consecutive iterations with a NaN/inf loss."""


@dataclass
class Run:
    """Per-process context: distributed environment, logger, TensorBoard, output directory."""

    env: cd.DistEnv
    logger: logging.Logger
    tb: TensorBoard
    output_dir: str


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


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: numpy and random follow the worker's torch seed
    (``base_seed + worker_id``, the base drawn from the main process's restored RNG)."""
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def setup_run(name: str, output_dir: str, device: str = "auto", local_rank: int = -1, seed: int = 0,
              tensorboard: bool = True) -> Run:
    """Initialise distributed, seeds (``seed`` + rank), output dir, logger and TensorBoard."""
    env = cd.init_distributed(device, local_rank)
    seed_everything(seed + env.rank)
    os.makedirs(output_dir, exist_ok=True)
    logger = setup_logger(output_dir, env.rank)
    tb = TensorBoard(output_dir, tensorboard and env.is_main, logger)
    where = f"rank {env.rank} of {env.world_size} ({env.backend})" if env.world_size > 1 else "single process"
    logger.info(f"{name}: {where}, device {env.device}")
    return Run(env, logger, tb, output_dir)


def write_config(run: Run, flags: Dict[str, Any], **resolved: Any) -> Dict[str, Any]:
    """The resolved configuration (``flags`` + ``resolved`` values), saved as ``config.json`` by rank 0."""
    config = {**flags, "world_size": run.env.world_size, "device": str(run.env.device), **resolved}
    if run.env.is_main:
        path = os.path.join(run.output_dir, "config.json")
        with open(path + ".tmp", "w") as f:
            json.dump(config, f, indent=2, sort_keys=True, default=str)
        os.replace(path + ".tmp", path)
        run.logger.info("config: " + json.dumps(config, sort_keys=True, default=str))
    return config


def build_loader(dataset, sampler: Sampler, batch_size: int, num_workers: int, device: torch.device,
                 train: bool) -> DataLoader:
    """DataLoader: pinned memory on CUDA, persistent seeded workers, ``drop_last`` when training."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=device.type == "cuda", drop_last=train, persistent_workers=num_workers > 0,
                      worker_init_fn=seed_worker)


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
    """Move to ``device``; cross-rank batch norm when ``sync_batchnorm`` and distributed;
    ``--channels-last``; ``--compile`` compiles the backbone in place (``nn.Module.compile`` keeps
    state-dict keys, so checkpoints stay portable)."""
    if sync_batchnorm:
        model = cd.convert_sync_batchnorm(model, device)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_backbone:
        model.backbone.compile()
    return model


def check_iters(loader: DataLoader, batch_size: int, world_size: int) -> int:
    n = len(loader)
    if n == 0:
        raise ValueError(f"--batch-size {batch_size} per process is larger than the {len(loader.sampler)} images "
                         f"each of the {world_size} process(es) gets per epoch; lower the batch size")
    return n


def _scalar(v) -> float:
    return float(v.detach().float().item()) if torch.is_tensor(v) else float(v)


@dataclass(frozen=True)
class LoopOptions:
    """How the loop runs and reports (``--print-freq``, ``--max-nonfinite``, ``--channels-last``)."""

    print_freq: int = 100
    max_nonfinite: int = 10
    channels_last: bool = False


class Trainer:
    """Drives a :class:`~contrast.models.base.TrainModule` through epochs.

    ``model`` is what runs the forward pass (the module, or its ``DistributedDataParallel`` wrapper);
    every hook of ``module`` is called at its point of the step (see ``contrast.models.base``).
    """

    def __init__(self, model: nn.Module, module: TrainModule, optimizer: torch.optim.Optimizer, scheduler,
                 precision: Precision, run: Run, options: LoopOptions, device_aug: Optional[nn.Module] = None,
                 state: Optional[TrainState] = None) -> None:
        self.model, self.module = model, module
        self.optimizer, self.scheduler, self.precision = optimizer, scheduler, precision
        self.run, self.options, self.device_aug = run, options, device_aug
        self.state = state if state is not None else TrainState()

    def start(self, total_steps: int, steps_per_epoch: int) -> None:
        """Tell the module the schedule's length (once per process, also after a resume)."""
        self.module.on_train_start(total_steps, steps_per_epoch)

    def _inputs(self, views, index: torch.Tensor, label: torch.Tensor):
        device = self.run.env.device
        views = [v.to(device, non_blocking=True) for v in (views if isinstance(views, (list, tuple)) else [views])]
        if self.device_aug is not None:
            with torch.no_grad():
                views = self.device_aug(views)
        if self.options.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        return views, self.module.target(index, label).to(device, non_blocking=True)

    def _skip_nonfinite(self, epoch: int, it: int) -> None:
        state, opts = self.state, self.options
        self.optimizer.zero_grad(set_to_none=True)
        state.nonfinite_run += 1
        state.nonfinite_total += 1
        self.run.logger.warning(f"non-finite loss at epoch {epoch} iteration {it + 1}: step skipped on all ranks "
                                f"({state.nonfinite_run} in a row, {state.nonfinite_total} in total)")
        if state.nonfinite_run >= opts.max_nonfinite:
            raise NonFiniteLossError(
                f"stopping: {state.nonfinite_run} consecutive non-finite losses (--max-nonfinite "
                f"{opts.max_nonfinite}) at epoch {epoch} iteration {it + 1}; the last good checkpoint is "
                f"{os.path.join(self.run.output_dir, CURRENT)} (lower the lr, use --amp-opt-level O0 or resume)")

    def _step(self, loss: torch.Tensor) -> None:
        """backward, the module's pre-step hook, optimiser step; the post-step hook on real steps only."""
        scaler, step = self.precision.scaler, self.state.step
        grad_scale, stepped = 1.0, True
        if scaler is not None:
            grad_scale = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.unscale_(self.optimizer)
            self.module.on_before_optimizer_step(step)
            scaler.step(self.optimizer)
            scaler.update()
            stepped = scaler.get_scale() >= grad_scale   # the scale only drops on a skipped step
        else:
            loss.backward()
            self.module.on_before_optimizer_step(step)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if stepped:
            self.module.on_train_step_end(step, self.optimizer.param_groups[0]["lr"], grad_scale)
        self.scheduler.step()
        self.state.step += 1

    def train_epoch(self, loader: Iterable, epoch: int, num_epochs: int) -> Dict[str, float]:
        """One epoch; returns its mean loss, throughput and the mean of every logged scalar."""
        run, opts = self.run, self.options
        device, logger = run.env.device, run.logger
        self.model.train()
        num_iters = len(loader)
        loss_meter, time_meter, data_meter = AverageMeter(), AverageMeter(), AverageMeter()
        extras: Dict[str, AverageMeter] = {}
        images = 0
        end = time.perf_counter()
        for it, (views, index, label) in enumerate(loader):
            data_time = time.perf_counter() - end
            views, target = self._inputs(views, index, label)
            lr = self.optimizer.param_groups[0]["lr"]
            with self.precision.autocast(device):
                out = self.model(views, target)
            loss = out["loss"]
            if not cd.all_ranks_true(bool(torch.isfinite(loss).item()), device):
                self._skip_nonfinite(epoch, it)
                end = time.perf_counter()
                continue
            self.state.nonfinite_run = 0
            self._step(loss)

            batch = views[0].shape[0]
            images += batch
            loss_meter.update(loss.item(), batch)
            for k, v in out.items():
                if k != "loss":
                    extras.setdefault(k, AverageMeter()).update(_scalar(v), batch)
            time_meter.update(time.perf_counter() - end)
            data_meter.update(data_time)
            if (it + 1) % opts.print_freq == 0 or it + 1 == num_iters:
                ips = batch * run.env.world_size / max(time_meter.avg, 1e-9)
                eta = time_meter.avg * ((num_iters - it - 1) + (num_epochs - epoch) * num_iters)
                logger.info(f"train epoch [{epoch}/{num_epochs}] iter [{it + 1}/{num_iters}] lr {lr:.4g} "
                            f"loss {loss_meter.val:.4f} ({loss_meter.avg:.4f}) images/s {ips:.1f} "
                            f"data {100 * data_meter.sum / max(time_meter.sum, 1e-9):.0f}% "
                            f"mem {peak_memory_mb(device):.0f}MB eta {format_eta(eta)}"
                            + "".join(f" {k} {m.val:.4g}" for k, m in extras.items()))
                run.tb.scalars({"loss": loss_meter.val, "lr": lr, "images_per_s": ips,
                                **{k: m.val for k, m in extras.items()}}, self.state.step, prefix="train/")
            end = time.perf_counter()
        corrupt = getattr(getattr(loader, "dataset", None), "num_corrupt", 0)
        if corrupt:
            logger.warning(f"{corrupt} corrupt image(s) replaced so far (see the warnings above for the files)")
        return {"loss": loss_meter.avg, "images_per_s": images * run.env.world_size / max(time_meter.sum, 1e-9),
                **{k: m.avg for k, m in extras.items()}}


def save_epoch(run: Run, epoch: int, save_freq: int, last_epoch: int, **kwargs) -> None:
    """``current.pth`` every epoch, ``ckpt_epoch_<e>.pth`` every ``save_freq`` epochs and at the end
    (collective; ``kwargs`` go to :func:`contrast.checkpoint.save_training_checkpoint`)."""
    save_training_checkpoint(os.path.join(run.output_dir, CURRENT), epoch=epoch, **kwargs)
    if epoch % save_freq == 0 or epoch == last_epoch:
        path = os.path.join(run.output_dir, f"ckpt_epoch_{epoch}.pth")
        save_training_checkpoint(path, epoch=epoch, **kwargs)
        run.logger.info(f"saved {path}")


#: Set by ``python -m contrast.launch`` for the processes it starts: it reports their errors itself.
LAUNCHER_ENV = "CONTRAST_LAUNCHER"
#: User errors reported in one line (bad flags, data, checkpoints, files, non-finite losses).
USER_ERRORS = (CheckpointError, NonFiniteLossError, DatasetError, ValueError, OSError)


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
    """Run an entry point; a user error (bad input, bad checkpoint, non-finite loss, a missing file, ...)
    ends with one clear line and exit code 1, its traceback only in the log file (and on the console
    with ``--debug``).

    Under torchrun the line also goes to the agent's error file; rank 0 prints it at once, another rank
    after a 1 s pause (an error every rank meets is then reported by rank 0, whose exit makes torchrun
    stop the others). Under ``python -m contrast.launch`` the launcher prints the line instead.
    """
    args = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except USER_ERRORS as e:
        if "--debug" in args:
            raise
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
        sys.exit(1)
    finally:
        cd.cleanup()
