"""Checkpoints: the only module that knows their keys.

A checkpoint file is a dict written by :func:`save_training_checkpoint` (keys ``FORMAT_KEYS``,
``version`` = :data:`VERSION`). Everything else reads it through :func:`read_checkpoint`, which
checks the version, migrates older files (:data:`MIGRATIONS`) and returns a :class:`Checkpoint`
with typed fields; :func:`restore_training_state` puts a training run back where it stopped.

Files: the main file is written by rank 0; a method with per-rank state (the sampled PIC table)
also gets ``<name>.rank<r>-of-<w>.pth`` from every rank, written before the main file. Every file
is written to ``<path>.tmp``, fsync'ed and moved into place with ``os.replace``, so a crash never
leaves a truncated checkpoint under the final name.
"""
from __future__ import annotations

import os
import pickle
import random
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from contrast import distributed as cd

#: Format version written by this code. 1: the first release. 2: MoCo's key encoder and queue became
#: modules (``key_encoder.*``, ``queue.features``/``queue.ptr``), InstDisc counts its negative draws
#: (``neg_draws``; a version-1 run resumes with a fresh draw sequence), ``kind`` says what wrote the file.
VERSION = 2
CURRENT = "current.pth"
PRETRAIN, LINEAR = "pretrain", "linear"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, of an unknown version or does not fit the model."""


# ----------------------------------------------------------------------------------- files
def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` via a fsync'ed temporary file and ``os.replace``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shard_path(path: str, rank: int, world_size: int) -> str:
    """``ckpt.pth`` -> ``ckpt.rank<r>-of-<w>.pth`` (per-rank state of sharded methods)."""
    stem = path[:-4] if path.endswith(".pth") else path
    return f"{stem}.rank{rank}-of-{world_size}.pth"


def load_file(path: str, map_location: str | torch.device = "cpu") -> Dict[str, Any]:
    """Read a checkpoint file as a dict, with errors that name the file (no version handling)."""
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path!r}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, found {type(obj).__name__}")
    return obj


# ----------------------------------------------------------------------------------- versions
def _rename_prefix(state: Dict[str, Any], old: str, new: str) -> Dict[str, Any]:
    return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in state.items()}


def _v1_to_v2(raw: Dict[str, Any]) -> Dict[str, Any]:
    model = strip_prefix(raw["model"])
    model = _rename_prefix(_rename_prefix(model, "backbone_k.", "key_encoder.backbone."), "head_k.",
                           "key_encoder.head.")
    if "queue_ptr" in model and "queue" in model:
        model["queue.features"], model["queue.ptr"] = model.pop("queue"), model.pop("queue_ptr")
    if "bank" in model and "neg_draws" not in model:
        model["neg_draws"] = torch.zeros((), dtype=torch.long)
    kind = LINEAR if "fc.weight" in model and not any(k.startswith("head") for k in model) else PRETRAIN
    extra = {"best": raw["best"]} if "best" in raw else {}
    config = dict(raw.get("config") or {})
    if "head.0.weight" in model and "mlp_hidden_dim" not in config:  # version 1: hidden width = backbone width
        config["mlp_hidden_dim"] = int(model["head.0.weight"].shape[0])
    return {**raw, "model": model, "kind": kind, "extra": extra, "config": config, "version": 2}


#: ``MIGRATIONS[v]`` turns a version-``v`` checkpoint dict into version ``v + 1``.
MIGRATIONS: Dict[int, Callable[[Dict[str, Any]], Dict[str, Any]]] = {1: _v1_to_v2}


def migrate(raw: Dict[str, Any], path: str) -> Dict[str, Any]:
    """``raw`` brought to :data:`VERSION`; ``CheckpointError`` for a newer or unknown version."""
    version = raw.get("version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: no format version; not a checkpoint written by contrast (a PIC release "
                              f"checkpoint? convert it with tools/convert_release_checkpoint.py)")
    if version > VERSION:
        raise CheckpointError(f"{path}: format version {version} is newer than this code's ({VERSION}); "
                              f"update contrast")
    while version < VERSION:
        if version not in MIGRATIONS:
            raise CheckpointError(f"{path}: no migration from format version {version}")
        raw = MIGRATIONS[version](raw)
        version = raw["version"]
    return raw


# ----------------------------------------------------------------------------------- reading
@dataclass
class Checkpoint:
    """A checkpoint file, migrated to :data:`VERSION`.

    Attributes:
        path: the file.
        kind: ``"pretrain"`` (a method) or ``"linear"`` (a linear classifier on a frozen backbone).
        model: the model's state dict (no ``module.`` prefix).
        config: the resolved configuration of the run that wrote it (flags, world size, effective lr).
        epoch, step: the last finished (loop) epoch and the number of optimiser steps taken.
        world_size: processes of the run that wrote it.
        effective_lr: its peak learning rate.
        extra: entries added by the entry script (e.g. the linear run's ``best`` accuracy).
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
    _state: Dict[str, Any] = field(default_factory=dict, repr=False)

    def backbone_state(self) -> Dict[str, torch.Tensor]:
        """The ``backbone.`` tensors with the prefix removed; ``CheckpointError`` when there are none."""
        weights = extract_backbone(self.model)
        if not weights:
            raise CheckpointError(f"{self.path}: no 'backbone.' tensors in the checkpoint's model state")
        return weights

    @property
    def rank_shards(self) -> bool:
        """Whether per-rank files (``<name>.rank<r>-of-<w>.pth``) belong to this checkpoint."""
        return bool(self._state.get("rank_shards"))

    @property
    def sampler_states(self) -> List[Any]:
        """The sampler state of every rank of the run that wrote it (empty when not saved)."""
        return list(self._state.get("sampler") or [])

    @property
    def resumable(self) -> bool:
        """Whether it holds optimiser state (converted weights do not)."""
        return self._state.get("optimizer") is not None

    @property
    def images_seen(self) -> Optional[int]:
        """Training images seen (steps x per-process batch x world size), when the config says the batch."""
        batch = self.config.get("batch_size")
        return int(self.step) * int(batch) * int(self.world_size) if batch else None


def read_checkpoint(path: str, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load, version-check and migrate ``path``; errors name the file."""
    raw = migrate(load_file(path, map_location), path)
    missing = [k for k in ("model", "epoch", "step") if k not in raw]
    if missing:
        raise CheckpointError(f"{path}: missing {missing}; not a checkpoint written by contrast")
    config = raw.get("config") or {}
    if not isinstance(config, dict):
        config = vars(config)
    state = {k: raw.get(k) for k in ("optimizer", "scheduler", "scaler", "sampler", "rng", "rank_shards")}
    return Checkpoint(path=path, kind=raw.get("kind", PRETRAIN), model=strip_prefix(raw["model"]), config=config,
                      epoch=int(raw["epoch"]), step=int(raw["step"]), world_size=int(raw.get("world_size") or 1),
                      effective_lr=float(raw.get("effective_lr") or 0.0), extra=dict(raw.get("extra") or {}),
                      _state=state)


def strip_prefix(state: Dict[str, torch.Tensor], prefix: str = "module.") -> Dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


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


def load_pretrained_backbone(backbone: nn.Module, path: str) -> int:
    """Load the backbone of any method's checkpoint into ``backbone``; returns the tensor count.

    Raises :class:`CheckpointError` naming ``path`` (and what the checkpoint holds) when the file
    holds no backbone tensors or when they do not match ``backbone``.
    """
    ckpt = read_checkpoint(path)
    weights = ckpt.backbone_state()
    load_model_state(backbone, weights, path, ckpt.config)
    return len(weights)


# ----------------------------------------------------------------------------------- RNG
def rng_state() -> Dict[str, Any]:
    """torch, CUDA (all devices), numpy and Python random states of this process."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------- writing
def save_training_checkpoint(path: str, model: nn.Module, optimizer, scheduler, scaler, sampler, epoch: int,
                             step: int, config: Dict[str, Any], effective_lr: float, kind: str = PRETRAIN,
                             extra: Optional[Dict[str, Any]] = None) -> None:
    """Collective: every rank must call it. Rank 0 writes ``path``; per-rank shards first.

    ``model`` is the method itself (not a DDP wrapper); ``extra``: entries for :attr:`Checkpoint.extra`.
    """
    world, rank = cd.get_world_size(), cd.get_rank()
    rank_state = model.rank_state_dict()
    if rank_state is not None:
        atomic_save(rank_state, shard_path(path, rank, world))
    rngs = cd.all_gather_object(rng_state())
    samplers = cd.all_gather_object(sampler.state_dict() if sampler is not None else None)
    cd.barrier()
    if rank == 0:
        atomic_save({
            "version": VERSION, "kind": kind, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
            "sampler": samplers, "rng": rngs, "epoch": epoch, "step": step, "config": config,
            "world_size": world, "effective_lr": effective_lr, "rank_shards": rank_state is not None,
            "extra": dict(extra or {})}, path)
    cd.barrier()


def write_pretrained_checkpoint(path: str, model_state: Dict[str, torch.Tensor], config: Dict[str, Any],
                                epoch: int, step: int = 0, world_size: int = 1, effective_lr: float = 0.0,
                                extra: Optional[Dict[str, Any]] = None) -> None:
    """A pretraining checkpoint without optimiser state (converted weights): readable by
    :func:`read_checkpoint` and every evaluation tool, not resumable."""
    atomic_save({"version": VERSION, "kind": PRETRAIN, "model": dict(model_state), "optimizer": None,
                 "scheduler": None, "scaler": None, "sampler": None, "rng": None, "epoch": epoch, "step": step,
                 "config": dict(config), "world_size": world_size, "effective_lr": effective_lr,
                 "rank_shards": False, "extra": dict(extra or {})}, path)


# ----------------------------------------------------------------------------------- resuming
def resume_path(resume: str, auto_resume: bool, output_dir: str) -> Optional[str]:
    """``--resume PATH`` wins; ``--auto-resume`` uses ``<output-dir>/current.pth`` when it exists."""
    if resume:
        return resume
    if auto_resume:
        candidate = os.path.join(output_dir, CURRENT)
        return candidate if os.path.isfile(candidate) else None
    return None


def restore_training_state(ckpt: Checkpoint, model: nn.Module, optimizer=None, scheduler=None, scaler=None,
                           sampler=None, restore_rng: bool = True) -> None:
    """Put a run back where ``ckpt`` was written: model (and per-rank shards), optimiser, scheduler,
    grad scaler, sampler and RNG states. RNG and sampler states are restored per rank when the world
    size matches (rank 0's otherwise). ``model`` is the method itself."""
    path, state = ckpt.path, ckpt._state
    load_model_state(model, ckpt.model, path, ckpt.config)
    if state.get("rank_shards"):
        shards = [load_file(shard_path(path, r, ckpt.world_size)) for r in range(ckpt.world_size)]
        try:
            model.load_rank_state_dicts(shards)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e
    try:
        if optimizer is not None:
            if state.get("optimizer") is None:
                raise CheckpointError(f"{path}: holds no optimizer state (converted weights?); it cannot be "
                                      f"resumed, only evaluated")
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
    except (KeyError, ValueError, RuntimeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: optimizer/scheduler state does not fit this run "
                              f"(different --optimizer or model?): {e}") from e
    mine = cd.get_rank() if ckpt.world_size == cd.get_world_size() else 0
    if sampler is not None and state.get("sampler"):
        sampler_state = state["sampler"][mine]
        if sampler_state is not None:
            try:
                sampler.load_state_dict(sampler_state)
            except ValueError as e:
                raise CheckpointError(f"{path}: {e}") from e
    if restore_rng and state.get("rng"):
        set_rng_state(state["rng"][mine])


def list_state_differences(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> List[str]:
    """Names of tensors that differ (or exist in one dict only) between two state dicts."""
    names = sorted(set(a) | set(b))
    return [k for k in names if k not in a or k not in b or not torch.equal(a[k].cpu(), b[k].cpu())]
