"""The training loop and the pieces both entry scripts share.

``main_pretrain.py`` and ``main_linear.py`` are thin: they parse flags, build data and model, and
call :func:`setup_run`, :func:`build_loader`, :func:`build_precision`, :func:`wrap_ddp`,
:func:`train_one_epoch`, :func:`save_epoch` from here.

One iteration of :func:`train_one_epoch`::

    views -> device -> aug.device (batched colour ops) -> [channels_last]
    out = model(views, target)                   # under autocast; out["loss"] is fp32
    if the loss is non-finite on any rank: skip the step everywhere, count it,
        stop after --max-nonfinite consecutive ones (NonFiniteLossError)
    backward [GradScaler] -> optimizer.step -> method.on_train_step_end(step, lr) -> scheduler.step
"""
from __future__ import annotations

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
from contrast.checkpoint import CURRENT, CheckpointError, save_checkpoint, unwrap
from contrast.logger import AverageMeter, TensorBoard, format_eta, peak_memory_mb, setup_logger
from contrast.precision import Precision, build_precision  # noqa: F401  (re-exported for the entry scripts)


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


def setup_run(args, name: str) -> Run:
    """Initialise distributed, seeds (``--seed`` + rank), output dir, logger and TensorBoard."""
    env = cd.init_distributed(args.device, args.local_rank)
    seed_everything(args.seed + env.rank)
    os.makedirs(args.output_dir, exist_ok=True)
    logger = setup_logger(args.output_dir, env.rank)
    tb = TensorBoard(args.output_dir, args.tensorboard and env.is_main, logger)
    logger.info(f"{name}: rank {env.rank}/{env.world_size}, device {env.device}, backend {env.backend}")
    return Run(env, logger, tb, args.output_dir)


def write_config(run: Run, args, **resolved: Any) -> Dict[str, Any]:
    """The resolved configuration (flags + ``resolved`` values), saved as ``config.json`` by rank 0."""
    config = {**vars(args), "world_size": run.env.world_size, "device": str(run.env.device), **resolved}
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
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def prepare_model(model: nn.Module, args, device: torch.device) -> nn.Module:
    """Move to ``device``; ``--channels-last``; ``--compile`` compiles the backbone in place
    (``nn.Module.compile`` keeps state-dict keys, so checkpoints stay portable). Methods with
    ``sync_batchnorm`` get cross-rank batch norm when distributed."""
    if getattr(model, "sync_batchnorm", False):
        model = cd.convert_sync_batchnorm(model, device)
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
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


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, scheduler,
                    precision: Precision, run: Run, state: TrainState, epoch: int, num_epochs: int,
                    device_aug: Optional[nn.Module] = None, target: str = "index", channels_last: bool = False,
                    print_freq: int = 100, max_nonfinite: int = 10) -> Dict[str, float]:
    """One epoch; ``target`` picks the second model input: dataset ``index`` (pretraining) or
    class ``label`` (linear evaluation). Returns the epoch's mean loss and throughput."""
    device, logger = run.env.device, run.logger
    method = unwrap(model)
    model.train()
    num_iters = len(loader)
    loss_meter, time_meter, data_meter = AverageMeter(), AverageMeter(), AverageMeter()
    extras: Dict[str, AverageMeter] = {}
    images = 0
    end = time.perf_counter()
    for it, (views, index, label) in enumerate(loader):
        data_time = time.perf_counter() - end
        views = [v.to(device, non_blocking=True) for v in (views if isinstance(views, (list, tuple)) else [views])]
        if device_aug is not None:
            with torch.no_grad():
                views = device_aug(views)
        if channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        key = (index if target == "index" else label).to(device, non_blocking=True)
        with precision.autocast(device):
            out = model(views, key)
        loss = out["loss"]
        if not cd.all_ranks_true(bool(torch.isfinite(loss).item()), device):
            optimizer.zero_grad(set_to_none=True)
            state.nonfinite_run += 1
            state.nonfinite_total += 1
            logger.warning(f"non-finite loss at epoch {epoch} iteration {it + 1}: step skipped on all ranks "
                           f"({state.nonfinite_run} in a row, {state.nonfinite_total} in total)")
            if state.nonfinite_run >= max_nonfinite:
                raise NonFiniteLossError(
                    f"stopping: {state.nonfinite_run} consecutive non-finite losses (--max-nonfinite "
                    f"{max_nonfinite}) at epoch {epoch} iteration {it + 1}; the last good checkpoint is "
                    f"{os.path.join(run.output_dir, CURRENT)} (lower the lr, use --amp-opt-level O0 or resume)")
            end = time.perf_counter()
            continue
        state.nonfinite_run = 0
        grad_scale, stepped = 1.0, True
        if precision.scaler is not None:
            grad_scale = precision.scaler.get_scale()
            precision.scaler.scale(loss).backward()
            precision.scaler.step(optimizer)
            precision.scaler.update()
            stepped = precision.scaler.get_scale() >= grad_scale   # the scale only drops on a skipped step
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = optimizer.param_groups[0]["lr"]
        if stepped and hasattr(method, "on_train_step_end"):
            method.on_train_step_end(state.step, lr, grad_scale)
        scheduler.step()
        state.step += 1

        batch = views[0].shape[0]
        images += batch
        loss_meter.update(loss.item(), batch)
        for k, v in out.items():
            if k != "loss":
                extras.setdefault(k, AverageMeter()).update(_scalar(v), batch)
        time_meter.update(time.perf_counter() - end)
        data_meter.update(data_time)
        if (it + 1) % print_freq == 0 or it + 1 == num_iters:
            ips = batch * run.env.world_size / max(time_meter.avg, 1e-9)
            eta = time_meter.avg * ((num_iters - it - 1) + (num_epochs - epoch) * num_iters)
            logger.info(f"train epoch [{epoch}/{num_epochs}] iter [{it + 1}/{num_iters}] lr {lr:.4g} "
                        f"loss {loss_meter.val:.4f} ({loss_meter.avg:.4f}) images/s {ips:.1f} "
                        f"data {100 * data_meter.sum / max(time_meter.sum, 1e-9):.0f}% "
                        f"mem {peak_memory_mb(device):.0f}MB eta {format_eta(eta)}"
                        + "".join(f" {k} {m.val:.4g}" for k, m in extras.items()))
            run.tb.scalars({"loss": loss_meter.val, "lr": lr, "images_per_s": ips,
                            **{k: m.val for k, m in extras.items()}}, state.step, prefix="train/")
        end = time.perf_counter()
    corrupt = getattr(getattr(loader, "dataset", None), "num_corrupt", 0)
    if corrupt:
        logger.warning(f"{corrupt} corrupt image(s) replaced so far (see the warnings above for the files)")
    return {"loss": loss_meter.avg, "images_per_s": images * run.env.world_size / max(time_meter.sum, 1e-9),
            **{k: m.avg for k, m in extras.items()}}


def save_epoch(run: Run, epoch: int, save_freq: int, last_epoch: int, **kwargs) -> None:
    """``current.pth`` every epoch, ``ckpt_epoch_<e>.pth`` every ``save_freq`` epochs and at the end
    (collective; ``kwargs`` go to :func:`contrast.checkpoint.save_checkpoint`)."""
    save_checkpoint(os.path.join(run.output_dir, CURRENT), epoch=epoch, **kwargs)
    if epoch % save_freq == 0 or epoch == last_epoch:
        path = os.path.join(run.output_dir, f"ckpt_epoch_{epoch}.pth")
        save_checkpoint(path, epoch=epoch, **kwargs)
        run.logger.info(f"saved {path}")


def run_cli(main: Callable[[Optional[List[str]]], Any], argv: Optional[List[str]] = None) -> None:
    """Run an entry point; user errors end with one clear line (full traceback in the log file)."""
    try:
        main(argv)
    except (CheckpointError, NonFiniteLossError, ValueError, FileNotFoundError) as e:
        record = logging.makeLogRecord({"name": "contrast", "levelno": logging.ERROR, "levelname": "ERROR",
                                        "msg": traceback.format_exc()})
        for h in logging.getLogger("contrast").handlers:
            if isinstance(h, logging.FileHandler):
                h.handle(record)
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        cd.cleanup()
