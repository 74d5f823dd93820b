"""The DataLoader and the training model of a run: loader, iteration check, placement, DDP."""
from __future__ import annotations

import inspect
import logging

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from contrast import distributed as cd
from contrast.data.workers import Loader
from contrast.placement import place
from contrast.seeding import mix_seed


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
