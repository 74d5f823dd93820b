"""What a training checkpoint holds and how a run gets it back: :func:`save_training_checkpoint`
(collective), :func:`read_checkpoint` (verified, migrated, typed as a :class:`Checkpoint`),
:func:`restore_training_state`, and the RNG states of a process."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from contrast import distributed as cd
from contrast.checkpoint.files import (CheckpointError, CheckpointSaveError, atomic_save, commit, drop_stale_shards,
                                       load_file, manifest_path, one_line, read_manifest, remove, save_point,
                                       shard_path, verify_files)
from contrast.checkpoint.format import PRETRAIN, Record, migrate, shard_record, strip_prefix, total_batch_of, \
    unwrap_shard
from contrast.runconfig import flat_config


@dataclass
class Checkpoint:
    """A checkpoint file, verified against its manifest and migrated to the current format version.

    Attributes:
        path: the file.
        kind: ``"pretrain"`` (a method) or ``"linear"`` (a linear classifier on a frozen backbone).
        model: the model's state dict (no ``module.`` prefix).
        config: the configuration of the run that wrote it as one flat dict
            (:func:`~contrast.runconfig.flat_config`; either stored form).
        epoch, step: the last finished (loop) epoch and the number of optimiser steps taken.
        world_size: processes of the run that wrote it.
        effective_lr: its peak learning rate.
        extra: entries added by the entry script (the linear run's ``best``, the kNN monitor's
            ``knn_best``).
        verified: whether a manifest vouched for every file (False for files written before
            version 3 or copied without their manifest).
        record: everything the main file holds.
    """

    path: str
    kind: str
    model: Dict[str, torch.Tensor]
    config: Dict[str, Any]
    epoch: int
    step: int
    world_size: int
    effective_lr: float
    extra: Dict[str, Any] = field(default_factory=dict)
    verified: bool = False
    record: Record = field(default_factory=lambda: Record(kind=PRETRAIN, model={}), repr=False)

    def backbone_state(self) -> Dict[str, torch.Tensor]:
        """The ``backbone.`` tensors with the prefix removed; ``CheckpointError`` when there are none."""
        weights = extract_backbone(self.model)
        if not weights:
            raise CheckpointError(f"{self.path}: no 'backbone.' tensors in the checkpoint's model state")
        return weights

    @property
    def rank_shards(self) -> bool:
        """Whether per-rank files belong to this checkpoint."""
        return bool(self.record.rank_shards)

    @property
    def shard_files(self) -> List[str]:
        """Paths of the per-rank files of this checkpoint, in rank order (empty when none), named
        after this file (so a copy under another name finds its own copies of them)."""
        shards = self.record.rank_shards
        if not shards:
            return []
        step = None if shards is True else self.step  # version 2 (True): files named without the step
        return [shard_path(self.path, r, self.world_size, step) for r in range(self.world_size)]

    @property
    def sampler_states(self) -> List[Any]:
        """The sampler state of every rank of the run that wrote it (empty when not saved)."""
        return list(self.record.sampler or [])

    @property
    def resumable(self) -> bool:
        """Whether it holds optimiser state (converted weights do not)."""
        return self.record.optimizer is not None

    @property
    def mid_epoch(self) -> bool:
        """Whether it was saved between two steps of epoch ``epoch + 1`` (time-based or on a signal)."""
        return bool(self.record.mid_epoch)

    @property
    def total_batch(self) -> Optional[int]:
        """Images per optimiser step over all ranks, when known."""
        value = self.record.total_batch
        return int(value) if value else total_batch_of(self.config, self.world_size)

    @property
    def samples_seen(self) -> Optional[int]:
        """Training samples consumed by the steps taken (what the lr schedule follows)."""
        value = self.record.samples_seen
        return int(value) if value is not None else None

    @property
    def images_seen(self) -> Optional[int]:
        """Training images seen (``samples_seen``; steps x total batch for older files)."""
        if self.samples_seen is not None:
            return self.samples_seen
        batch = self.total_batch
        return int(self.step) * batch if batch else None


# ----------------------------------------------------------------------------------- reading
def read_checkpoint(path: str, map_location: str | torch.device = "cpu", verify: bool = True) -> Checkpoint:
    """Verify (against its manifest, unless ``verify`` is False), load, version-check and migrate
    ``path``; every error names the file."""
    manifest = read_manifest(path) if verify else None
    if manifest is not None:
        verify_files(path, manifest)
    raw = load_file(path, map_location)
    if manifest is not None and raw.get("step") != manifest["step"]:
        raise CheckpointError(f"{path}: holds step {raw.get('step')} but its manifest "
                              f"{os.path.basename(manifest_path(path))} says step {manifest['step']}")
    record = Record.from_dict(migrate(raw, path), path)
    return Checkpoint(path=path, kind=record.kind, model=record.model, config=flat_config(record.config), epoch=record.epoch,
                      step=record.step, world_size=record.world_size, effective_lr=record.effective_lr,
                      extra=record.extra, verified=manifest is not None, record=record)


def load_shards(ckpt: Checkpoint) -> List[dict]:
    """The per-rank states of ``ckpt`` (version-3 files are unwrapped and their step checked)."""
    shards = []
    for fpath in ckpt.shard_files:
        state, step = unwrap_shard(load_file(fpath))
        if step is not None and step != ckpt.step:
            raise CheckpointError(f"{fpath}: holds step {step}, its checkpoint {ckpt.path} step "
                                  f"{ckpt.step}: refusing to mix them")
        shards.append(state)
    return shards


def extract_backbone(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The ``backbone.`` tensors of a method's state dict (``module.`` stripped), prefix removed."""
    state = strip_prefix(state)
    return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}


def describe_config(config: Dict[str, Any]) -> str:
    """What a run's config says about its network, for error messages."""
    keys = ("model", "arch", "stem", "mlp_head", "feature_dim", "image_size")
    return ", ".join(f"{k}={config[k]}" for k in keys if k in config) or "no recorded configuration"


def load_model_state(model: nn.Module, state: Dict[str, torch.Tensor], path: str,
                     config: Optional[Dict[str, Any]] = None) -> None:
    """Strict ``load_state_dict`` with an error naming ``path``, the mismatching tensors and what the
    checkpoint's ``config`` says it holds."""
    state = strip_prefix(state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in state and torch.is_tensor(v) and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("shape mismatch", shapes), ("missing", missing), ("unexpected", unexpected)):
            if items:
                parts.append(f"{len(items)} {title} (e.g. {'; '.join(items[:3])})")
        held = f"the checkpoint holds {describe_config(config)}" if config is not None else \
            "different --model/--arch/--stem/--mlp-head/--feature-dim or dataset size?"
        raise CheckpointError(f"{path}: checkpoint does not fit this model ({held}): " + ", ".join(parts))
    model.load_state_dict(state)


def list_state_differences(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> List[str]:
    """Names of tensors that differ (or exist in one dict only) between two state dicts."""
    names = sorted(set(a) | set(b))
    return [k for k in names if k not in a or k not in b or not torch.equal(a[k].cpu(), b[k].cpu())]


# ----------------------------------------------------------------------------------- RNG
def rng_state() -> Dict[str, Any]:
    """torch, CUDA (this process's current device only), numpy and Python random states of this process.

    One CUDA state, not ``get_rng_state_all()``: under torchrun every rank sees all GPUs of the node, and
    a list of them cannot be restored on a node with fewer (an 8 -> 4 GPU requeue)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore :func:`rng_state`; an older checkpoint's list of CUDA states (one per visible GPU) gives
    the state of this process's current device when the list has it, else of its first one."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, (list, tuple)):
        if not cuda:
            return
        current = torch.cuda.current_device()
        cuda = cuda[current] if current < len(cuda) else cuda[0]
    torch.cuda.set_rng_state(cuda)


# ----------------------------------------------------------------------------------- writing
def save_training_checkpoint(path: str, model: nn.Module, optimizer, scheduler, scaler, sampler, epoch: int,
                             step: int, config: Dict[str, Any], effective_lr: float, kind: str = PRETRAIN,
                             extra: Optional[Dict[str, Any]] = None, consumed: Optional[int] = None,
                             samples_seen: Optional[int] = None, total_batch: Optional[int] = None) -> None:
    """Collective: every rank must call it. Writes the set of checkpoint ``path`` (see
    :mod:`contrast.checkpoint.files`).

    ``model`` is the method itself (not a DDP wrapper); ``epoch`` the last finished epoch;
    ``consumed``: None at an epoch end, else the samples this rank already took from the epoch in
    progress (a mid-epoch checkpoint, the sampler resumes there); ``extra``: entries for
    :attr:`Checkpoint.extra`. Raises :class:`CheckpointSaveError` on every rank when any rank could
    not write its part; the previous checkpoint is then untouched and no partial file is left.
    """
    save_point("start")
    world, rank = cd.get_world_size(), cd.get_rank()
    record, error = None, None
    rank_state = model.rank_state_dict()
    mine = shard_path(path, rank, world, step)
    if rank_state is not None:
        try:
            record = atomic_save(shard_record(step, rank, world, rank_state), mine)
        except OSError as e:
            error = f"{mine}: {one_line(e)}"
    sampler_state = None
    if sampler is not None:
        sampler_state = sampler.state_dict(consumed=consumed) if consumed is not None else sampler.state_dict()
    gathered = cd.all_gather_object((rng_state(), sampler_state, record, error))
    save_point("shards")
    errors = [g[3] for g in gathered if g[3]]
    if rank == 0 and not errors:
        records = [g[2] for g in gathered if g[2] is not None]
        main = Record(kind=kind, model=model.state_dict(), optimizer=optimizer.state_dict(),
                      scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler is not None else None,
                      sampler=[g[1] for g in gathered], rng=[g[0] for g in gathered], epoch=epoch, step=step,
                      config=config, world_size=world, effective_lr=effective_lr,
                      rank_shards=[r.name for r in records] if rank_state is not None else False,
                      extra=dict(extra or {}), mid_epoch=consumed is not None, samples_seen=samples_seen,
                      total_batch=total_batch)
        try:
            commit(path, main.to_dict(), records, step, epoch)
            drop_stale_shards(path, [r.name for r in records])
        except OSError as e:
            errors.append(f"{path}: {one_line(e)}")
    errors = cd.broadcast_object(errors, src=0)
    if errors:
        if record is not None:
            remove(mine)
        raise CheckpointSaveError(f"checkpoint not saved: {errors[0]}")


def write_pretrained_checkpoint(path: str, model_state: Dict[str, torch.Tensor], config: Dict[str, Any],
                                epoch: int, step: int = 0, world_size: int = 1, effective_lr: float = 0.0,
                                extra: Optional[Dict[str, Any]] = None) -> None:
    """A pretraining checkpoint without optimiser state (converted weights): readable by
    :func:`read_checkpoint` and every evaluation tool, not resumable. One process writes it."""
    main = Record(kind=PRETRAIN, model=dict(model_state), epoch=epoch, step=step, config=dict(config),
                  world_size=world_size, effective_lr=effective_lr, extra=dict(extra or {}))
    commit(path, main.to_dict(), [], step, epoch)


# ----------------------------------------------------------------------------------- restoring
def restore_training_state(ckpt: Checkpoint, model: nn.Module, optimizer=None, scheduler=None, scaler=None,
                           sampler=None, restore_rng: bool = True) -> None:
    """Put a run back where ``ckpt`` was written: model (and per-rank shards), optimiser, scheduler,
    grad scaler, sampler and RNG states. ``model`` is the method itself.

    With the world size of the checkpoint every rank gets its own RNG and sampler state. With
    another world size, rank ``r`` gets the RNG state of rank ``r`` when the old run had one, and
    the sampler continues the epoch from the global position the old ranks had reached together
    (``resume_global``); at an epoch end the sampler needs nothing."""
    path, state = ckpt.path, ckpt.record
    load_model_state(model, ckpt.model, path, ckpt.config)
    if state.rank_shards:
        shards = load_shards(ckpt)
        try:
            model.load_rank_state_dicts(shards)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e
    try:
        if optimizer is not None:
            if state.optimizer is None:
                raise CheckpointError(f"{path}: holds no optimizer state (converted weights?); it cannot be "
                                      f"resumed, only evaluated")
            optimizer.load_state_dict(state.optimizer)
        if scheduler is not None and state.scheduler is not None:
            scheduler.load_state_dict(state.scheduler)
        if scaler is not None and state.scaler is not None:
            scaler.load_state_dict(state.scaler)
    except (KeyError, ValueError, RuntimeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: optimizer/scheduler state does not fit this run "
                              f"(different --optimizer or model?): {e}") from e
    rank, same_world = cd.get_rank(), ckpt.world_size == cd.get_world_size()
    samplers = state.sampler or []
    if sampler is not None and samplers and samplers[0] is not None:
        try:
            if same_world:
                sampler.load_state_dict(samplers[rank])
            elif ckpt.mid_epoch:
                old = samplers[0]
                sampler.resume_global(old, int(old["consumed"]) * int(old["num_replicas"]))
        except (ValueError, AttributeError) as e:
            raise CheckpointError(f"{path}: cannot continue its epoch on {cd.get_world_size()} process(es) "
                                  f"({e}); resume with {ckpt.world_size} process(es), or from an epoch "
                                  f"checkpoint") from e
    rngs = state.rng or []
    if restore_rng and rank < len(rngs) and rngs[rank] is not None:
        set_rng_state(rngs[rank])
