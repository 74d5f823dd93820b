"""Checkpoint files: names, atomic writes with SHA-256 records, manifests and their verification,
recovery of an output folder after a crash.

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
renames.

:class:`SaveHooks` marks the points inside a save where the fault drill injects crashes and full
disks; the installed hooks (:func:`set_save_hooks`, only tests call it) do nothing by default.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

CURRENT = "current.pth"
MANIFEST_SUFFIX = ".manifest.json"
EPOCH_PREFIX = "ckpt_epoch_"
CHUNK_BYTES = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, corrupt, of an unknown version or does not fit the model."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (e.g. disk full); the previous one is untouched."""


# ----------------------------------------------------------------------------------- names
def stem_of(path: str) -> str:
    return path[:-4] if path.endswith(".pth") else path


def manifest_path(path: str) -> str:
    """``dir/current.pth`` -> ``dir/current.manifest.json``."""
    return stem_of(path) + MANIFEST_SUFFIX


def shard_path(path: str, rank: int, world_size: int, step: Optional[int] = None) -> str:
    """Per-rank state file of checkpoint ``path``: ``<name>.step<S>.rank<r>-of-<w>.pth`` (version 3),
    or the version-2 name ``<name>.rank<r>-of-<w>.pth`` when ``step`` is None."""
    tag = f".step{step}" if step is not None else ""
    return f"{stem_of(path)}{tag}.rank{rank}-of-{world_size}.pth"


def shard_files_of(path: str) -> List[str]:
    """Every per-rank file on disk that belongs to checkpoint name ``path`` (any step, any version)."""
    stem = os.path.basename(stem_of(path))
    pattern = re.compile(re.escape(stem) + r"(\.step\d+)?\.rank\d+-of-\d+\.pth$")
    directory = os.path.dirname(os.path.abspath(path))
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if pattern.match(f)) \
        if os.path.isdir(directory) else []


def checkpoint_files(output_dir: str) -> List[str]:
    """Every file in ``output_dir`` that belongs to a checkpoint (``current``, ``ckpt_epoch_*``,
    their manifests and per-rank files)."""
    if not os.path.isdir(output_dir):
        return []
    names = re.compile(r"(current|ckpt_epoch_\d+)(\.pth|" + re.escape(MANIFEST_SUFFIX) +
                       r"|(\.step\d+)?\.rank\d+-of-\d+\.pth)$")
    return sorted(os.path.join(output_dir, f) for f in os.listdir(output_dir) if names.match(f))


# ----------------------------------------------------------------------------------- save hooks
class SaveHooks:
    """Points inside a save where a test can stop or fail it; this default does nothing.

    :meth:`at` is called with ``"start"`` when :func:`~contrast.checkpoint.save_training_checkpoint`
    begins, ``"shards"`` once the per-rank files are written, ``"main"`` half-way through writing
    the main file and ``"commit"`` when the main file is in place but its manifest not yet.
    Raising ``OSError`` there is a failed write; not returning is a process killed mid-save.
    """

    def at(self, point: str) -> None:
        pass


_hooks = SaveHooks()


def set_save_hooks(hooks: Optional[SaveHooks]) -> SaveHooks:
    """Install ``hooks`` (None: the no-op default) for every later save; returns the previous ones."""
    global _hooks
    previous, _hooks = _hooks, hooks if hooks is not None else SaveHooks()
    return previous


def save_point(point: str) -> None:
    """Call the installed hooks at ``point``."""
    _hooks.at(point)


# ----------------------------------------------------------------------------------- writing
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

    def __init__(self, f, save_point_name: Optional[str] = None) -> None:
        self.f, self.sha, self.count, self.point = f, hashlib.sha256(), 0, save_point_name
        self.error: Optional[BaseException] = None

    def write(self, data) -> int:
        try:
            if self.point and self.count > 0:
                point, self.point = self.point, None
                save_point(point)
            self.sha.update(data)
            self.count += len(data)
            return self.f.write(data)
        except BaseException as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: str) -> None:
    """Delete ``path`` if it exists."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def one_line(e: BaseException) -> str:
    """An exception as one line (``[Errno N] text`` for OS errors)."""
    if isinstance(e, OSError) and e.strerror:
        return f"[Errno {e.errno}] {e.strerror}"
    return f"{type(e).__name__}: {e}"


def write_tmp(write: Callable[[Any], None], path: str, point: Optional[str] = None) -> Tuple[str, FileRecord]:
    """Write ``<path>.tmp`` through ``write(file)``, hashed and fsync'ed; the partial file is
    removed when writing fails. ``point``: the save hook called after the first chunk. Returns the
    temporary path and the record of the final name."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp, writer = f"{path}.tmp", None
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f, point)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        remove(tmp)
        if writer is not None and writer.error is not None and writer.error is not e:
            raise writer.error from None
        raise
    return tmp, FileRecord(os.path.basename(path), writer.count, writer.sha.hexdigest())


def atomic_save(obj: Any, path: str) -> FileRecord:
    """``torch.save`` to ``path`` via a fsync'ed temporary file and ``os.replace``; returns its record."""
    tmp, record = write_tmp(lambda f: torch.save(obj, f), path)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return record


def file_digest(path: str) -> Tuple[int, str]:
    """(size, SHA-256 hex) of a file, read in chunks."""
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK_BYTES)
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


def write_manifest_tmp(path: str, step: int, epoch: int, records: List[FileRecord]) -> str:
    """The manifest of checkpoint ``path`` listing ``records``, written to its ``.tmp`` name."""
    manifest = {"format": 1, "checkpoint": os.path.basename(path), "step": step, "epoch": epoch,
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "pid": os.getpid(),
                "files": [r.as_dict(step) for r in records]}
    tmp, _ = write_tmp(lambda f: f.write(json.dumps(manifest, indent=1, sort_keys=True).encode()),
                       manifest_path(path))
    return tmp


def commit(path: str, main_obj: Dict[str, Any], shard_records: List[FileRecord], step: int, epoch: int) -> None:
    """Rank 0's part of a save: main file and manifest to temporary files, then both renamed
    (main first; :func:`recover_output_dir` completes a save stopped between the two)."""
    main_tmp, record = write_tmp(lambda f: torch.save(main_obj, f), path, point="main")
    try:
        manifest_tmp = write_manifest_tmp(path, step, epoch, [record] + shard_records)
    except BaseException:
        remove(main_tmp)
        raise
    os.replace(main_tmp, path)
    save_point("commit")
    os.replace(manifest_tmp, manifest_path(path))
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def drop_stale_shards(path: str, keep: List[str]) -> None:
    """Remove per-rank files of checkpoint name ``path`` that its current set does not list."""
    for f in shard_files_of(path):
        if os.path.basename(f) not in keep:
            remove(f)


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
            remove(tmp)
    for tmp in sorted(glob.glob(os.path.join(glob.escape(output_dir), "*.tmp"))):
        size = os.path.getsize(tmp) if os.path.isfile(tmp) else 0
        remove(tmp)
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
            remove(os.path.join(output_dir, f))
            notes.append(f"removed {os.path.join(output_dir, f)}: a per-rank file of a save that never completed")
    return notes
