"""Checkpoints: atomic writes, resume, RNG capture, backbone extraction.

Layout (``docs/design.md``, "Checkpoint contract")::

    {"model", "optimizer", "scheduler", "scaler", "sampler", "rng", "epoch", "step", "config",
     "world_size", "effective_lr", "version"}

``sampler`` and ``rng`` are lists with one entry per rank (gathered to rank 0), so a resumed run
with the same world size continues every rank's random streams exactly. A method with
``rank_state_dict()`` also gets ``<name>.rank<r>-of-<w>.pth`` from each rank, written before rank 0
writes the main file. Every file is written to ``<path>.tmp``, fsync'ed and moved into place with
``os.replace``, so a crash never leaves a truncated checkpoint under the final name.
"""
from __future__ import annotations

import os
import pickle
import random
import zipfile
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from contrast import distributed as cd

VERSION = 1
CURRENT = "current.pth"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model."""


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
    """Read a checkpoint dict, with errors that name the file."""
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path!r}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, found {type(obj).__name__}")
    return obj


def strip_prefix(state: Dict[str, torch.Tensor], prefix: str = "module.") -> Dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def load_model_state(model: nn.Module, state: Dict[str, torch.Tensor], path: str) -> None:
    """Strict ``load_state_dict`` with an error naming ``path`` and the mismatching tensors."""
    state = strip_prefix(state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("shape mismatch", shapes), ("missing", missing), ("unexpected", unexpected)):
            if items:
                parts.append(f"{len(items)} {title} (e.g. {'; '.join(items[:3])})")
        raise CheckpointError(f"{path}: checkpoint does not fit this model (different --model/--arch/"
                              f"--stem/--mlp-head/--feature-dim or dataset size?): " + ", ".join(parts))
    model.load_state_dict(state)


def extract_backbone(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The ``backbone.`` tensors of a method's state dict (``module.`` stripped), prefix removed."""
    state = strip_prefix(state)
    return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}


def load_pretrained_backbone(backbone: nn.Module, path: str) -> int:
    """Load the backbone of any method's checkpoint into ``backbone``; returns the tensor count.

    Raises :class:`CheckpointError` naming ``path`` when the file holds no backbone tensors, or
    when they do not match ``backbone`` (another ``--arch`` / ``--stem``).
    """
    ckpt = load_file(path)
    if "model" not in ckpt:
        raise CheckpointError(f"{path}: no 'model' entry; is this a contrast pretraining checkpoint?")
    weights = extract_backbone(ckpt["model"])
    if not weights:
        raise CheckpointError(f"{path}: no 'backbone.' tensors in the checkpoint's model state")
    load_model_state(backbone, weights, path)
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


# ----------------------------------------------------------------------------------- save / load
def unwrap(model: nn.Module) -> nn.Module:
    """The method inside a ``DistributedDataParallel`` wrapper."""
    return model.module if hasattr(model, "module") else model


def save_checkpoint(path: str, model: nn.Module, optimizer, scheduler, scaler, sampler, epoch: int, step: int,
                    config: Dict[str, Any], effective_lr: float, extra: Optional[Dict[str, Any]] = None) -> None:
    """Collective: every rank must call it. Rank 0 writes ``path``; per-rank shards first.

    ``extra``: more entries for the checkpoint dict (e.g. the best accuracy of linear evaluation).
    """
    method = unwrap(model)
    world, rank = cd.get_world_size(), cd.get_rank()
    rank_state = method.rank_state_dict() if hasattr(method, "rank_state_dict") else None
    if rank_state is not None:
        atomic_save(rank_state, shard_path(path, rank, world))
    rngs = cd.all_gather_object(rng_state())
    samplers = cd.all_gather_object(sampler.state_dict() if sampler is not None else None)
    cd.barrier()
    if rank == 0:
        atomic_save({
            "model": method.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
            "sampler": samplers, "rng": rngs, "epoch": epoch, "step": step, "config": config,
            "world_size": world, "effective_lr": effective_lr, "version": VERSION,
            "rank_shards": rank_state is not None, **(extra or {})}, path)
    cd.barrier()


def resume_path(resume: str, auto_resume: bool, output_dir: str) -> Optional[str]:
    """``--resume PATH`` wins; ``--auto-resume`` uses ``<output-dir>/current.pth`` when it exists."""
    if resume:
        return resume
    if auto_resume:
        candidate = os.path.join(output_dir, CURRENT)
        return candidate if os.path.isfile(candidate) else None
    return None


def load_checkpoint(path: str, model: nn.Module, optimizer=None, scheduler=None, scaler=None, sampler=None,
                    restore_rng: bool = True) -> Dict[str, Any]:
    """Restore everything saved by :func:`save_checkpoint`; returns the checkpoint dict.

    RNG and sampler states are restored per rank when the world size matches (rank 0's otherwise).
    """
    ckpt = load_file(path)
    missing = [k for k in ("model", "epoch", "step") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: missing {missing}; not a checkpoint written by contrast")
    method = unwrap(model)
    load_model_state(method, ckpt["model"], path)
    if ckpt.get("rank_shards"):
        shards = [load_file(shard_path(path, r, ckpt["world_size"])) for r in range(ckpt["world_size"])]
        method.load_rank_state_dicts(shards)
    try:
        if optimizer is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: optimizer/scheduler state does not fit this run "
                              f"(different --optimizer or model?): {e}") from e
    mine = cd.get_rank() if ckpt.get("world_size") == cd.get_world_size() else 0
    if sampler is not None and ckpt.get("sampler"):
        state = ckpt["sampler"][mine]
        if state is not None:
            try:
                sampler.load_state_dict(state)
            except ValueError as e:
                raise CheckpointError(f"{path}: {e}") from e
    if restore_rng and ckpt.get("rng"):
        set_rng_state(ckpt["rng"][mine])
    return ckpt


def list_state_differences(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> List[str]:
    """Names of tensors that differ (or exist in one dict only) between two state dicts."""
    names = sorted(set(a) | set(b))
    return [k for k in names if k not in a or k not in b or not torch.equal(a[k].cpu(), b[k].cpu())]
