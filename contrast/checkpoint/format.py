"""The checkpoint format: its version, the entries of a main file (:class:`Record`, the one place
that names them, for the writer and the reader) and the migrations of older versions.

A main file is a dict readable with a plain ``torch.load``: ``version`` plus the fields of
:class:`Record`. A per-rank file is ``{"version", "step", "rank", "world_size", "state"}``
(:func:`shard_record`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional

import torch

from contrast import state_migrations
from contrast.checkpoint.files import CheckpointError

#: Format version written by this code. 1: the first release. 2: MoCo's key encoder and queue became
#: modules (``key_encoder.*``, ``queue.features``/``queue.ptr``), InstDisc counts its negative draws
#: (``neg_draws``; a version-1 run resumes with a fresh draw sequence), ``kind`` says what wrote the file.
#: 3: a manifest with checksums commits each checkpoint; per-rank shards are named with their step
#: and wrapped with it; ``samples_seen``/``total_batch`` (the lr schedule follows the samples seen),
#: ``mid_epoch`` (saved between two steps of an epoch), the scheduler state holds ``samples_seen``.
VERSION = 3
PRETRAIN, LINEAR, FINETUNE = "pretrain", "linear", "finetune"   # what wrote the file


@dataclass
class Record:
    """The entries of a main checkpoint file (version :data:`VERSION`), in the order they are written.

    ``rank_shards``: the names of the per-rank files (version 3), True (version 2: files named
    without the step) or False (none). ``sampler``/``rng``: one state per rank of the writing run.
    ``mid_epoch``: saved between two steps of epoch ``epoch + 1``.
    """

    kind: str
    model: Dict[str, torch.Tensor]
    optimizer: Optional[Dict[str, Any]] = None
    scheduler: Optional[Dict[str, Any]] = None
    scaler: Optional[Dict[str, Any]] = None
    sampler: Optional[List[Any]] = None
    rng: Optional[List[Any]] = None
    epoch: int = 0
    step: int = 0
    config: Dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    effective_lr: float = 0.0
    rank_shards: Any = False
    extra: Dict[str, Any] = field(default_factory=dict)
    mid_epoch: bool = False
    samples_seen: Optional[int] = None
    total_batch: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        """What ``torch.save`` writes."""
        return {"version": VERSION, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_dict(cls, raw: Dict[str, Any], path: str) -> "Record":
        """A main file already migrated to :data:`VERSION`; absent optional entries get their defaults."""
        missing = [k for k in ("model", "epoch", "step") if k not in raw]
        if missing:
            raise CheckpointError(f"{path}: missing {missing}; not a checkpoint written by contrast")
        values = {f.name: raw[f.name] for f in fields(cls) if raw.get(f.name) is not None}
        config = values.get("config") or {}
        values.update(kind=raw.get("kind", PRETRAIN), model=strip_prefix(raw["model"]),
                      config=config if isinstance(config, dict) else vars(config), epoch=int(raw["epoch"]),
                      step=int(raw["step"]), world_size=int(raw.get("world_size") or 1),
                      effective_lr=float(raw.get("effective_lr") or 0.0), extra=dict(raw.get("extra") or {}))
        return cls(**values)


def shard_record(step: int, rank: int, world_size: int, state: Dict[str, Any]) -> Dict[str, Any]:
    """What a per-rank file holds (version 3: the method's state wrapped with its step)."""
    return {"version": VERSION, "step": step, "rank": rank, "world_size": world_size, "state": state}


def unwrap_shard(obj: Dict[str, Any]) -> tuple:
    """``(state, step)`` of a per-rank file; step None for a version-2 file (the bare state)."""
    if "state" in obj and "step" in obj:
        return obj["state"], obj["step"]
    return obj, None


def strip_prefix(state: Dict[str, torch.Tensor], prefix: str = "module.") -> Dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def total_batch_of(config: Dict[str, Any], world_size: int) -> Optional[int]:
    """Images per optimiser step that a run's config implies (files that do not record it)."""
    if config.get("total_batch_size"):
        return int(config["total_batch_size"])
    return int(config["batch_size"]) * int(world_size) if config.get("batch_size") else None


# ----------------------------------------------------------------------------------- migrations
def _method_state(raw: Dict[str, Any], model: Dict[str, Any], version: int) -> Dict[str, Any]:
    """``model`` through the migration its method registered (:mod:`contrast.state_migrations`)."""
    config = raw.get("config") or {}
    name = (config if isinstance(config, dict) else vars(config)).get("model")
    if name is None:   # a linear-evaluation checkpoint: no method state
        return model
    try:
        return state_migrations.migrate_state(name, model, version)
    except KeyError as e:
        raise CheckpointError(f"format version {version} checkpoint of --model {name}: {e.args[0]}") from None


def _v1_to_v2(raw: Dict[str, Any]) -> Dict[str, Any]:
    model = _method_state(raw, strip_prefix(raw["model"]), 1)
    kind = LINEAR if "fc.weight" in model and not any(k.startswith("head") for k in model) else PRETRAIN
    extra = {"best": raw["best"]} if "best" in raw else {}
    config = dict(raw.get("config") or {})
    if "head.0.weight" in model and "mlp_hidden_dim" not in config:  # version 1: hidden width = backbone width
        config["mlp_hidden_dim"] = int(model["head.0.weight"].shape[0])
    return {**raw, "model": model, "kind": kind, "extra": extra, "config": config, "version": 2}


def _v2_to_v3(raw: Dict[str, Any]) -> Dict[str, Any]:
    """Version 2 saved at epoch ends only and scheduled the lr per iteration: the samples seen are
    the steps times the total batch (per-process batch x world size, or the linear total batch)."""
    config = raw.get("config") or {}
    config = config if isinstance(config, dict) else vars(config)
    batch = total_batch_of(config, raw.get("world_size") or 1)
    scheduler = raw.get("scheduler")
    if isinstance(scheduler, dict) and "samples_seen" not in scheduler and batch:
        scheduler = {**scheduler, "samples_seen": int(scheduler.get("last_epoch", raw["step"])) * batch}
    return {**raw, "version": 3, "scheduler": scheduler, "total_batch": batch, "mid_epoch": False,
            "samples_seen": int(raw["step"]) * batch if batch else None}


#: ``MIGRATIONS[v]`` turns a version-``v`` checkpoint dict into version ``v + 1``.
MIGRATIONS: Dict[int, Callable[[Dict[str, Any]], Dict[str, Any]]] = {1: _v1_to_v2, 2: _v2_to_v3}


def migrate(raw: Dict[str, Any], path: str) -> Dict[str, Any]:
    """``raw`` brought to :data:`VERSION`; ``CheckpointError`` for a newer or unknown version."""
    version = raw.get("version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: no format version; not a checkpoint written by contrast (a checkpoint of the "
                              f"release, github.com/bl0/PIC? convert it with tools/convert_release_checkpoint.py)")
    if version > VERSION:
        raise CheckpointError(f"{path}: format version {version} is newer than this code's ({VERSION}); "
                              f"update contrast")
    while version < VERSION:
        if version not in MIGRATIONS:
            raise CheckpointError(f"{path}: no migration from format version {version}")
        raw = MIGRATIONS[version](raw)
        version = raw["version"]
    return raw
