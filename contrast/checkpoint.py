"""Checkpoints: the only module that knows their keys, and all their file IO.

A checkpoint file is a dict written by :func:`save_training_checkpoint` (``version`` =
:data:`VERSION`), readable with a plain ``torch.load``. Everything else reads it through
:func:`read_checkpoint`, which verifies its checksums, checks the version, migrates older files
(:data:`MIGRATIONS`) and returns a :class:`Checkpoint` with typed fields;
:func:`restore_training_state` puts a training run back where it stopped.

A checkpoint ``<name>.pth`` is a set of files committed together (see ``docs/resilience.md``):

* ``<name>.pth``: the main file (rank 0);
* ``<name>.step<S>.rank<r>-of-<w>.pth``: per-rank state of methods that keep some (the sampled
  PIC table), one per rank, named with the step so that a new save never overwrites the files of
  the checkpoint it replaces;
* ``<name>.manifest.json``: names every file of the set with its size, step and SHA-256. It is
  written last; a set is only valid when every file matches it, so a crash mid-save, a shard of
  another save, a truncated or partly overwritten file is reported by name, never trained on.

Every file is written to ``<file>.tmp`` (hashed while written), fsync'ed and moved into place with
``os.replace``; the manifest of a new save is written to ``<name>.manifest.json.tmp`` before the
main file is moved, so :func:`recover_output_dir` can finish a save interrupted between the two
renames. A save that fails (disk full) removes its partial files, leaves the previous checkpoint
untouched and raises :class:`CheckpointSaveError` with one line naming the path and the error.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import random
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from contrast import distributed as cd
from contrast import state_migrations
from contrast.runconfig import flat_config

#: Format version written by this code. 1: the first release. 2: MoCo's key encoder and queue became
#: modules (``key_encoder.*``, ``queue.features``/``queue.ptr``), InstDisc counts its negative draws
#: (``neg_draws``; a version-1 run resumes with a fresh draw sequence), ``kind`` says what wrote the file.
#: 3: a manifest with checksums commits each checkpoint; per-rank shards are named with their step
#: and wrapped with it; ``samples_seen``/``total_batch`` (the lr schedule follows the samples seen),
#: ``mid_epoch`` (saved between two steps of an epoch), the scheduler state holds ``samples_seen``.
VERSION = 3
CURRENT = "current.pth"
PRETRAIN, LINEAR = "pretrain", "linear"
MANIFEST_SUFFIX = ".manifest.json"
EPOCH_PREFIX = "ckpt_epoch_"
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, corrupt, of an unknown version or does not fit the model."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (e.g. disk full); the previous one is untouched."""


# ----------------------------------------------------------------------------------- names
def _stem(path: str) -> str:
    return path[:-4] if path.endswith(".pth") else path


def manifest_path(path: str) -> str:
    """``dir/current.pth`` -> ``dir/current.manifest.json``."""
    return _stem(path) + MANIFEST_SUFFIX


def shard_path(path: str, rank: int, world_size: int, step: Optional[int] = None) -> str:
    """Per-rank state file of checkpoint ``path``: ``<name>.step<S>.rank<r>-of-<w>.pth`` (version 3),
    or the version-2 name ``<name>.rank<r>-of-<w>.pth`` when ``step`` is None."""
    tag = f".step{step}" if step is not None else ""
    return f"{_stem(path)}{tag}.rank{rank}-of-{world_size}.pth"


def _shard_files_of(path: str) -> List[str]:
    """Every per-rank file on disk that belongs to checkpoint name ``path`` (any step, any version)."""
    stem = os.path.basename(_stem(path))
    pattern = re.compile(re.escape(stem) + r"(\.step\d+)?\.rank\d+-of-\d+\.pth$")
    directory = os.path.dirname(os.path.abspath(path))
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if pattern.match(f)) \
        if os.path.isdir(directory) else []


# ----------------------------------------------------------------------------------- test hooks
_save_calls = 0


def _fault(point: str) -> None:
    """Fault-injection points for the fault drill (tests/test_faults.py, benchmarks/fault_drill.py);
    nothing happens unless the environment asks for it:

    * ``CONTRAST_TEST_PAUSE_IN_SAVE=<point>:<n>:<marker>``: on the ``n``-th save of this process,
      at ``point`` (``shards``: per-rank files written; ``main``: half of the main file written;
      ``commit``: main file in place, manifest not yet), create ``marker`` and sleep until killed;
    * ``CONTRAST_TEST_ENOSPC=<n>``: the ``n``-th save fails with ``ENOSPC`` half-way through the
      main file (as a full disk does).
    """
    pause = os.environ.get("CONTRAST_TEST_PAUSE_IN_SAVE")
    if pause:
        where, n, marker = pause.split(":", 2)
        if where == point and int(n) == _save_calls:
            with open(marker, "w") as f:
                f.write(f"{os.getpid()} {point}\n")
            while True:
                time.sleep(1)
    if point == "main" and os.environ.get("CONTRAST_TEST_ENOSPC") == str(_save_calls):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ----------------------------------------------------------------------------------- files
@dataclass(frozen=True)
class FileRecord:
    """One file of a checkpoint set: name (relative to the main file's folder), size, SHA-256."""

    name: str
    bytes: int
    sha256: str

    def as_dict(self, step: int) -> Dict[str, Any]:
        return {"name": self.name, "bytes": self.bytes, "sha256": self.sha256, "step": step}


class _HashingWriter:
    """A binary file wrapper that hashes what it writes (so a file is never read back to hash it).

    ``torch.save`` turns an exception raised by ``write`` into a ``RuntimeError`` without its
    errno; the original is kept in ``error`` so that the caller can report the real cause.
    """

    def __init__(self, f, fault_point: Optional[str] = None) -> None:
        self.f, self.sha, self.count, self.fault_point = f, hashlib.sha256(), 0, fault_point
        self.error: Optional[BaseException] = None

    def write(self, data) -> int:
        try:
            if self.fault_point and self.count > 0:
                point, self.fault_point = self.fault_point, None
                _fault(point)
            self.sha.update(data)
            self.count += len(data)
            return self.f.write(data)
        except BaseException as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _write_tmp(write: Callable[[Any], None], path: str, fault_point: Optional[str] = None) -> Tuple[str, FileRecord]:
    """Write ``<path>.tmp`` through ``write(file)``, hashed and fsync'ed; the partial file is
    removed when writing fails. Returns the temporary path and the record of the final name."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp, writer = f"{path}.tmp", None
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f, fault_point)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        _remove(tmp)
        if writer is not None and writer.error is not None and writer.error is not e:
            raise writer.error from None
        raise
    return tmp, FileRecord(os.path.basename(path), writer.count, writer.sha.hexdigest())


def atomic_save(obj: Any, path: str) -> FileRecord:
    """``torch.save`` to ``path`` via a fsync'ed temporary file and ``os.replace``; returns its record."""
    tmp, record = _write_tmp(lambda f: torch.save(obj, f), path)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    return record


def _atomic_json(obj: Dict[str, Any], path: str) -> None:
    tmp, _ = _write_tmp(lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True).encode()), path)
    os.replace(tmp, path)


def file_digest(path: str) -> Tuple[int, str]:
    """(size, SHA-256 hex) of a file, read in chunks."""
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                return size, sha.hexdigest()
            sha.update(chunk)
            size += len(chunk)


def load_file(path: str, map_location: str | torch.device = "cpu") -> Dict[str, Any]:
    """Read a checkpoint file as a dict, with errors that name the file (no version or checksum handling)."""
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path!r}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a damaged file can fail anywhere in unpickling: name the file, whatever it is
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, found {type(obj).__name__}")
    return obj


# ----------------------------------------------------------------------------------- manifests
def read_manifest(path: str) -> Optional[Dict[str, Any]]:
    """The manifest of checkpoint ``path``, None when it has none (written before version 3, or
    copied without it); ``CheckpointError`` when it is unreadable."""
    mpath = manifest_path(path)
    if not os.path.isfile(mpath):
        return None
    try:
        with open(mpath, "rb") as f:
            manifest = json.loads(f.read().decode())
        files = manifest["files"]
        if not isinstance(files, list) or not files or not all({"name", "bytes", "sha256"} <= set(e) for e in files):
            raise ValueError("no valid 'files' list")
        int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mpath}: unreadable checkpoint manifest ({type(e).__name__}: {e})") from e
    return manifest


def verify_files(path: str, manifest: Dict[str, Any]) -> None:
    """Check every file ``manifest`` names (next to ``path``) against its size and SHA-256;
    ``CheckpointError`` naming the first file that is missing or differs."""
    directory = os.path.dirname(os.path.abspath(path))
    where = f"{os.path.basename(manifest_path(path))} (step {manifest['step']})"
    for entry in manifest["files"]:
        fpath = os.path.join(directory, entry["name"])
        if not os.path.isfile(fpath):
            raise CheckpointError(f"{fpath}: missing; {where} lists it as part of this checkpoint (incomplete set)")
        size, sha = (os.path.getsize(fpath), None)
        if size == entry["bytes"]:
            size, sha = file_digest(fpath)
        if size != entry["bytes"] or sha != entry["sha256"]:
            what = (f"{size} bytes instead of {entry['bytes']} (truncated or replaced)" if size != entry["bytes"]
                    else f"SHA-256 {sha[:12]}... instead of {entry['sha256'][:12]}... (damaged or edited)")
            raise CheckpointError(f"{fpath}: checksum mismatch: {what}{_holds_step(fpath)}; {where} does "
                                  f"not match it, refusing to use this checkpoint")


def _holds_step(path: str) -> str:
    """For error messages: ``", it holds step S"`` when a file still loads and says its step."""
    try:
        step = load_file(path).get("step")
    except CheckpointError:
        return ""
    return f", it holds step {step}" if isinstance(step, int) else ""


def _write_manifest_tmp(path: str, step: int, epoch: int, records: List[FileRecord]) -> str:
    manifest = {"format": 1, "checkpoint": os.path.basename(path), "step": step, "epoch": epoch,
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "pid": os.getpid(),
                "files": [r.as_dict(step) for r in records]}
    tmp, _ = _write_tmp(lambda f: f.write(json.dumps(manifest, indent=1, sort_keys=True).encode()),
                        manifest_path(path))
    return tmp


def _commit(path: str, main_obj: Dict[str, Any], shard_records: List[FileRecord], step: int, epoch: int) -> None:
    """Rank 0's part of a save: main file and manifest to temporary files, then both renamed
    (main first; :func:`recover_output_dir` completes a save stopped between the two)."""
    main_tmp, record = _write_tmp(lambda f: torch.save(main_obj, f), path, fault_point="main")
    try:
        manifest_tmp = _write_manifest_tmp(path, step, epoch, [record] + shard_records)
    except BaseException:
        _remove(main_tmp)
        raise
    os.replace(main_tmp, path)
    _fault("commit")
    os.replace(manifest_tmp, manifest_path(path))
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _drop_stale_shards(path: str, keep: List[str]) -> None:
    """Remove per-rank files of checkpoint name ``path`` that its current set does not list."""
    for f in _shard_files_of(path):
        if os.path.basename(f) not in keep:
            _remove(f)


# ----------------------------------------------------------------------------------- versions
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


def _total_batch(config: Dict[str, Any], world_size: int) -> Optional[int]:
    if config.get("total_batch_size"):
        return int(config["total_batch_size"])
    return int(config["batch_size"]) * int(world_size) if config.get("batch_size") else None


def _v2_to_v3(raw: Dict[str, Any]) -> Dict[str, Any]:
    """Version 2 saved at epoch ends only and scheduled the lr per iteration: the samples seen are
    the steps times the total batch (per-process batch x world size, or the linear total batch)."""
    config = raw.get("config") or {}
    config = config if isinstance(config, dict) else vars(config)
    batch = _total_batch(config, raw.get("world_size") or 1)
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


# ----------------------------------------------------------------------------------- reading
@dataclass
class Checkpoint:
    """A checkpoint file, verified against its manifest and migrated to :data:`VERSION`.

    Attributes:
        path: the file.
        kind: ``"pretrain"`` (a method) or ``"linear"`` (a linear classifier on a frozen backbone).
        config: the configuration of the run that wrote it as one flat dict
            (:func:`~contrast.runconfig.flat_config`; either stored form).
        epoch, step: the last finished (loop) epoch and the number of optimiser steps taken.
        world_size: processes of the run that wrote it.
        effective_lr: its peak learning rate.
        extra: entries added by the entry script (the linear run's ``best``, the kNN monitor's
            ``knn_best``).
        verified: whether a manifest vouched for every file (False for files written before
            version 3 or copied without their manifest).
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
    _state: Dict[str, Any] = field(default_factory=dict, repr=False)

    def backbone_state(self) -> Dict[str, torch.Tensor]:
        """The ``backbone.`` tensors with the prefix removed; ``CheckpointError`` when there are none."""
        weights = extract_backbone(self.model)
        if not weights:
            raise CheckpointError(f"{self.path}: no 'backbone.' tensors in the checkpoint's model state")
        return weights

    @property
    def rank_shards(self) -> bool:
        """Whether per-rank files belong to this checkpoint."""
        return bool(self._state.get("rank_shards"))

    @property
    def shard_files(self) -> List[str]:
        """Paths of the per-rank files of this checkpoint, in rank order (empty when none), named
        after this file (so a copy under another name finds its own copies of them)."""
        shards = self._state.get("rank_shards")
        if not shards:
            return []
        step = None if shards is True else self.step  # version 2 (True): files named without the step
        return [shard_path(self.path, r, self.world_size, step) for r in range(self.world_size)]

    @property
    def sampler_states(self) -> List[Any]:
        """The sampler state of every rank of the run that wrote it (empty when not saved)."""
        return list(self._state.get("sampler") or [])

    @property
    def resumable(self) -> bool:
        """Whether it holds optimiser state (converted weights do not)."""
        return self._state.get("optimizer") is not None

    @property
    def mid_epoch(self) -> bool:
        """Whether it was saved between two steps of epoch ``epoch + 1`` (time-based or on a signal)."""
        return bool(self._state.get("mid_epoch"))

    @property
    def total_batch(self) -> Optional[int]:
        """Images per optimiser step over all ranks, when known."""
        value = self._state.get("total_batch")
        return int(value) if value else _total_batch(self.config, self.world_size)

    @property
    def samples_seen(self) -> Optional[int]:
        """Training samples consumed by the steps taken (what the lr schedule follows)."""
        value = self._state.get("samples_seen")
        return int(value) if value is not None else None

    @property
    def images_seen(self) -> Optional[int]:
        """Training images seen (``samples_seen``; steps x total batch for older files)."""
        if self.samples_seen is not None:
            return self.samples_seen
        batch = self.total_batch
        return int(self.step) * batch if batch else None


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
    raw = migrate(raw, path)
    missing = [k for k in ("model", "epoch", "step") if k not in raw]
    if missing:
        raise CheckpointError(f"{path}: missing {missing}; not a checkpoint written by contrast")
    config = flat_config(raw.get("config"))   # either form; a flat view for the readers
    state = {k: raw.get(k) for k in ("optimizer", "scheduler", "scaler", "sampler", "rng", "rank_shards",
                                     "mid_epoch", "total_batch", "samples_seen")}
    return Checkpoint(path=path, kind=raw.get("kind", PRETRAIN), model=strip_prefix(raw["model"]), config=config,
                      epoch=int(raw["epoch"]), step=int(raw["step"]), world_size=int(raw.get("world_size") or 1),
                      effective_lr=float(raw.get("effective_lr") or 0.0), extra=dict(raw.get("extra") or {}),
                      verified=manifest is not None, _state=state)


def load_shards(ckpt: Checkpoint) -> List[dict]:
    """The per-rank states of ``ckpt`` (version-3 files are unwrapped and their step checked)."""
    shards = []
    for fpath in ckpt.shard_files:
        obj = load_file(fpath)
        if "state" in obj and "step" in obj:
            if obj["step"] != ckpt.step:
                raise CheckpointError(f"{fpath}: holds step {obj['step']}, its checkpoint {ckpt.path} step "
                                      f"{ckpt.step}: refusing to mix them")
            obj = obj["state"]
        shards.append(obj)
    return shards


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
def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"[Errno {e.errno}] {e.strerror}"
    return f"{type(e).__name__}: {e}"


def save_training_checkpoint(path: str, model: nn.Module, optimizer, scheduler, scaler, sampler, epoch: int,
                             step: int, config: Dict[str, Any], effective_lr: float, kind: str = PRETRAIN,
                             extra: Optional[Dict[str, Any]] = None, consumed: Optional[int] = None,
                             samples_seen: Optional[int] = None, total_batch: Optional[int] = None) -> None:
    """Collective: every rank must call it. Writes the set of checkpoint ``path`` (see the module
    docstring).

    ``model`` is the method itself (not a DDP wrapper); ``epoch`` the last finished epoch;
    ``consumed``: None at an epoch end, else the samples this rank already took from the epoch in
    progress (a mid-epoch checkpoint, the sampler resumes there); ``extra``: entries for
    :attr:`Checkpoint.extra`. Raises :class:`CheckpointSaveError` on every rank when any rank could
    not write its part; the previous checkpoint is then untouched and no partial file is left.
    """
    global _save_calls
    _save_calls += 1
    world, rank = cd.get_world_size(), cd.get_rank()
    record, error = None, None
    rank_state = model.rank_state_dict()
    mine = shard_path(path, rank, world, step)
    if rank_state is not None:
        try:
            record = atomic_save({"version": VERSION, "step": step, "rank": rank, "world_size": world,
                                  "state": rank_state}, mine)
        except OSError as e:
            error = f"{mine}: {_one_line(e)}"
    sampler_state = None
    if sampler is not None:
        sampler_state = sampler.state_dict(consumed=consumed) if consumed is not None else sampler.state_dict()
    gathered = cd.all_gather_object((rng_state(), sampler_state, record, error))
    _fault("shards")
    errors = [g[3] for g in gathered if g[3]]
    if rank == 0 and not errors:
        records = [g[2] for g in gathered if g[2] is not None]
        main = {"version": VERSION, "kind": kind, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
                "sampler": [g[1] for g in gathered], "rng": [g[0] for g in gathered], "epoch": epoch, "step": step,
                "config": config, "world_size": world, "effective_lr": effective_lr,
                "rank_shards": [r.name for r in records] if rank_state is not None else False,
                "extra": dict(extra or {}), "mid_epoch": consumed is not None, "samples_seen": samples_seen,
                "total_batch": total_batch}
        try:
            _commit(path, main, records, step, epoch)
            _drop_stale_shards(path, [r.name for r in records])
        except OSError as e:
            errors.append(f"{path}: {_one_line(e)}")
    errors = cd.broadcast_object(errors, src=0)
    if errors:
        if record is not None:
            _remove(mine)
        raise CheckpointSaveError(f"checkpoint not saved: {errors[0]}")


def write_pretrained_checkpoint(path: str, model_state: Dict[str, torch.Tensor], config: Dict[str, Any],
                                epoch: int, step: int = 0, world_size: int = 1, effective_lr: float = 0.0,
                                extra: Optional[Dict[str, Any]] = None) -> None:
    """A pretraining checkpoint without optimiser state (converted weights): readable by
    :func:`read_checkpoint` and every evaluation tool, not resumable. One process writes it."""
    _commit(path, {"version": VERSION, "kind": PRETRAIN, "model": dict(model_state), "optimizer": None,
                   "scheduler": None, "scaler": None, "sampler": None, "rng": None, "epoch": epoch, "step": step,
                   "config": dict(config), "world_size": world_size, "effective_lr": effective_lr,
                   "rank_shards": False, "extra": dict(extra or {}), "mid_epoch": False, "samples_seen": None,
                   "total_batch": None}, [], step, epoch)


def copy_checkpoint(src: str, dst: str) -> None:
    """Copy the whole set of checkpoint ``src`` to name ``dst`` (rank 0 only; e.g. ``current.pth`` ->
    ``ckpt_epoch_<e>.pth``): every file is copied through a hash and checked against ``src``'s
    manifest, then ``dst``'s manifest commits the copy. Raises :class:`CheckpointSaveError`."""
    manifest = read_manifest(src)
    if manifest is None:
        raise CheckpointSaveError(f"checkpoint not saved: {src}: no manifest to copy")
    src_dir, dst_dir = os.path.dirname(os.path.abspath(src)), os.path.dirname(os.path.abspath(dst))
    step, src_stem, dst_stem = int(manifest["step"]), os.path.basename(_stem(src)), os.path.basename(_stem(dst))
    done: List[str] = []
    records: List[FileRecord] = []
    try:
        for i, entry in enumerate(manifest["files"]):
            name = os.path.basename(dst) if i == 0 else dst_stem + entry["name"][len(src_stem):]
            target = os.path.join(dst_dir, name)

            def copy(f, source=os.path.join(src_dir, entry["name"])):
                with open(source, "rb") as s:
                    shutil.copyfileobj(s, f, _CHUNK)
            tmp, record = _write_tmp(copy, target)
            if record.sha256 != entry["sha256"]:
                _remove(tmp)
                raise CheckpointSaveError(f"checkpoint not saved: {dst}: {entry['name']} changed while it was "
                                          f"copied (checksum mismatch)")
            if i > 0:
                os.replace(tmp, target)
                done.append(target)
            else:
                main_tmp = tmp
            records.append(record)
        manifest_tmp = _write_manifest_tmp(dst, step, int(manifest.get("epoch", 0)), records)
        os.replace(main_tmp, dst)
        os.replace(manifest_tmp, manifest_path(dst))
        _fsync_dir(dst_dir)
        _drop_stale_shards(dst, [r.name for r in records[1:]])
    except (OSError, CheckpointSaveError) as e:
        for f in done:
            _remove(f)
        if records:
            _remove(os.path.join(dst_dir, os.path.basename(dst)) + ".tmp")
        if isinstance(e, CheckpointSaveError):
            raise
        raise CheckpointSaveError(f"checkpoint not saved: {dst}: {_one_line(e)}") from e


def remove_checkpoint(path: str) -> None:
    """Delete the set of checkpoint ``path``: manifest first (the set is then invalid), then its files."""
    _remove(manifest_path(path))
    _remove(path)
    for f in _shard_files_of(path):
        _remove(f)


def epoch_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """``(epoch, path)`` of the ``ckpt_epoch_<e>.pth`` files in ``output_dir``, oldest first."""
    out = []
    for p in glob.glob(os.path.join(glob.escape(output_dir), f"{EPOCH_PREFIX}*.pth")):
        m = re.fullmatch(re.escape(EPOCH_PREFIX) + r"(\d+)\.pth", os.path.basename(p))
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def prune_epoch_checkpoints(output_dir: str, keep_last: int) -> List[str]:
    """``--keep-last N``: delete all but the newest ``N`` epoch checkpoints (0 keeps all); returns
    the deleted paths."""
    if keep_last <= 0:
        return []
    old = [p for _, p in epoch_checkpoints(output_dir)[:-keep_last]]
    for p in old:
        remove_checkpoint(p)
    return old


# ----------------------------------------------------------------------------------- recovery
def recover_output_dir(output_dir: str) -> List[str]:
    """Clean up after a crash (one process, while holding the run lock): complete a save that was
    stopped between its two renames (its manifest is still ``.tmp`` but matches the files), remove
    stale temporary files and per-rank files that no manifest lists. Returns what it did, one line
    per action, for the log."""
    notes: List[str] = []
    if not os.path.isdir(output_dir):
        return notes
    for tmp in sorted(glob.glob(os.path.join(glob.escape(output_dir), "*" + MANIFEST_SUFFIX + ".tmp"))):
        final = tmp[:-4]
        main = os.path.join(output_dir, os.path.basename(final)[:-len(MANIFEST_SUFFIX)] + ".pth")
        try:
            with open(tmp, "rb") as f:
                manifest = json.loads(f.read().decode())
            verify_files(main, manifest)
            os.replace(tmp, final)
            notes.append(f"completed the interrupted save of {main} (step {manifest['step']})")
        except (CheckpointError, OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
            _remove(tmp)
    for tmp in sorted(glob.glob(os.path.join(glob.escape(output_dir), "*.tmp"))):
        size = os.path.getsize(tmp) if os.path.isfile(tmp) else 0
        _remove(tmp)
        notes.append(f"removed the stale temporary file {tmp} ({size / 2 ** 20:.1f} MB) of an interrupted save")
    listed = set()
    for mpath in glob.glob(os.path.join(glob.escape(output_dir), "*" + MANIFEST_SUFFIX)):
        try:
            manifest = read_manifest(mpath[:-len(MANIFEST_SUFFIX)] + ".pth")
        except CheckpointError:
            continue
        listed.update(e["name"] for e in (manifest or {}).get("files", []))
    for f in sorted(os.listdir(output_dir)):
        if re.search(r"\.step\d+\.rank\d+-of-\d+\.pth$", f) and f not in listed:
            _remove(os.path.join(output_dir, f))
            notes.append(f"removed {os.path.join(output_dir, f)}: a per-rank file of a save that never completed")
    return notes


def checkpoint_files(output_dir: str) -> List[str]:
    """Every file in ``output_dir`` that belongs to a checkpoint (``current``, ``ckpt_epoch_*``,
    their manifests and per-rank files)."""
    if not os.path.isdir(output_dir):
        return []
    names = re.compile(r"(current|ckpt_epoch_\d+)(\.pth|" + re.escape(MANIFEST_SUFFIX) +
                       r"|(\.step\d+)?\.rank\d+-of-\d+\.pth)$")
    return sorted(os.path.join(output_dir, f) for f in os.listdir(output_dir) if names.match(f))


def set_aside(output_dir: str) -> Optional[str]:
    """``--restart``: move every checkpoint file of ``output_dir`` into ``output_dir/superseded-<time>``
    (nothing is deleted); returns that folder, None when there was nothing to move."""
    files = checkpoint_files(output_dir)
    if not files:
        return None
    target = os.path.join(output_dir, "superseded-" + time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(target, exist_ok=True)
    for f in files:
        os.replace(f, os.path.join(target, os.path.basename(f)))
    return target


@dataclass
class ResumeChoice:
    """What :func:`choose_resume` decided: the checkpoint to resume (None: start fresh) and the
    warnings to log."""

    checkpoint: Optional[Checkpoint]
    warnings: List[str]


def _candidates(output_dir: str) -> List[str]:
    """``current.pth`` (the newest: every save writes it), then the epoch checkpoints, newest first;
    those of which a file or the manifest exists."""
    paths = [os.path.join(output_dir, CURRENT)] + [p for _, p in reversed(epoch_checkpoints(output_dir))]
    return [p for p in paths if os.path.isfile(p) or os.path.isfile(manifest_path(p))]


def choose_resume(output_dir: str, resume: str = "", auto_resume: bool = False, restart: bool = False
                  ) -> ResumeChoice:
    """Pick the checkpoint a run starts from (rank 0, while holding the run lock).

    * ``resume`` (``--resume PATH``): that file, verified; any problem is an error.
    * ``restart`` (``--restart``): the checkpoints in ``output_dir`` are moved aside; fresh start.
    * ``auto_resume``: the newest valid checkpoint of ``output_dir`` (``current.pth``, else the
      newest ``ckpt_epoch_<e>.pth`` that verifies, with a warning naming both); an error when
      checkpoints exist and none is usable.
    * neither: fresh start, but an error when ``output_dir`` already holds checkpoints (a second
      run would overwrite them).
    """
    if resume:
        ckpt = read_checkpoint(resume)
        return ResumeChoice(ckpt, [] if ckpt.verified else
                            [f"{resume}: no manifest (written before version 3 or copied without it): its "
                             f"checksums cannot be verified"])
    if restart:
        moved = set_aside(output_dir)
        return ResumeChoice(None, [f"--restart: the checkpoints of {output_dir} were moved to {moved}"]
                            if moved else [])
    existing = checkpoint_files(output_dir)
    if not auto_resume:
        if existing:
            names = ", ".join(os.path.basename(f) for f in existing if f.endswith(".pth"))[:200]
            raise CheckpointError(f"{output_dir} already holds checkpoints ({names}); pass --auto-resume to "
                                  f"continue from them, or --restart to start over (they are moved to "
                                  f"{output_dir}/superseded-<time>)")
        return ResumeChoice(None, [])
    problems: List[str] = []
    for path in _candidates(output_dir):
        try:
            ckpt = read_checkpoint(path)
            if not ckpt.resumable:
                raise CheckpointError(f"{path}: holds no optimizer state (converted weights); it cannot be resumed")
        except CheckpointError as e:
            problems.append(str(e))
            continue
        warnings = [f"{problems[0]}; resuming from {path} (epoch {ckpt.epoch}, step {ckpt.step}) instead"
                    ] if problems else []
        if len(problems) > 1:
            warnings += [f"also unusable: {p}" for p in problems[1:]]
        if not ckpt.verified:
            warnings.append(f"{path}: no manifest (written before version 3 or copied without it): its checksums "
                            f"cannot be verified")
        return ResumeChoice(ckpt, warnings)
    if existing:
        raise CheckpointError(f"{output_dir} holds checkpoints but none is usable: " + " | ".join(problems or [
            f"{', '.join(os.path.basename(f) for f in existing)} without a main file"]) +
            "; pass --restart to start over (they are moved aside, nothing is deleted)")
    return ResumeChoice(None, [])


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
    grad scaler, sampler and RNG states. ``model`` is the method itself.

    With the world size of the checkpoint every rank gets its own RNG and sampler state. With
    another world size, rank ``r`` gets the RNG state of rank ``r`` when the old run had one, and
    the sampler continues the epoch from the global position the old ranks had reached together
    (``resume_global``); at an epoch end the sampler needs nothing."""
    path, state = ckpt.path, ckpt._state
    load_model_state(model, ckpt.model, path, ckpt.config)
    if state.get("rank_shards"):
        shards = load_shards(ckpt)
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
    rank, same_world = cd.get_rank(), ckpt.world_size == cd.get_world_size()
    samplers = state.get("sampler") or []
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
    rngs = state.get("rng") or []
    if restore_rng and rank < len(rngs) and rngs[rank] is not None:
        set_rng_state(rngs[rank])


def list_state_differences(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> List[str]:
    """Names of tensors that differ (or exist in one dict only) between two state dicts."""
    names = sorted(set(a) | set(b))
    return [k for k in names if k not in a or k not in b or not torch.equal(a[k].cpu(), b[k].cpu())]
