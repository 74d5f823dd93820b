"""Which checkpoint a run starts from (:func:`choose_resume`: verified, falling back to the newest
valid one), and the epoch checkpoints kept beside ``current.pth`` (copied, listed, pruned)."""
from __future__ import annotations

import glob
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

from contrast.checkpoint.files import (CHUNK_BYTES, CURRENT, EPOCH_PREFIX, CheckpointError, CheckpointSaveError,
                                       FileRecord, checkpoint_files, drop_stale_shards, fsync_dir, manifest_path,
                                       one_line, read_manifest, remove, shard_files_of, stem_of, write_manifest_tmp,
                                       write_tmp)
from contrast.checkpoint.state import Checkpoint, read_checkpoint


# ----------------------------------------------------------------------------------- epoch checkpoints
def copy_checkpoint(src: str, dst: str) -> None:
    """Copy the whole set of checkpoint ``src`` to name ``dst`` (rank 0 only; e.g. ``current.pth`` ->
    ``ckpt_epoch_<e>.pth``): every file is copied through a hash and checked against ``src``'s
    manifest, then ``dst``'s manifest commits the copy. Raises :class:`CheckpointSaveError`."""
    manifest = read_manifest(src)
    if manifest is None:
        raise CheckpointSaveError(f"checkpoint not saved: {src}: no manifest to copy")
    src_dir, dst_dir = os.path.dirname(os.path.abspath(src)), os.path.dirname(os.path.abspath(dst))
    step, src_stem, dst_stem = int(manifest["step"]), os.path.basename(stem_of(src)), os.path.basename(stem_of(dst))
    done: List[str] = []
    records: List[FileRecord] = []
    try:
        for i, entry in enumerate(manifest["files"]):
            name = os.path.basename(dst) if i == 0 else dst_stem + entry["name"][len(src_stem):]
            target = os.path.join(dst_dir, name)

            def copy(f, source=os.path.join(src_dir, entry["name"])):
                with open(source, "rb") as s:
                    shutil.copyfileobj(s, f, CHUNK_BYTES)
            tmp, record = write_tmp(copy, target)
            if record.sha256 != entry["sha256"]:
                remove(tmp)
                raise CheckpointSaveError(f"checkpoint not saved: {dst}: {entry['name']} changed while it was "
                                          f"copied (checksum mismatch)")
            if i > 0:
                os.replace(tmp, target)
                done.append(target)
            else:
                main_tmp = tmp
            records.append(record)
        manifest_tmp = write_manifest_tmp(dst, step, int(manifest.get("epoch", 0)), records)
        os.replace(main_tmp, dst)
        os.replace(manifest_tmp, manifest_path(dst))
        fsync_dir(dst_dir)
        drop_stale_shards(dst, [r.name for r in records[1:]])
    except (OSError, CheckpointSaveError) as e:
        for f in done:
            remove(f)
        if records:
            remove(os.path.join(dst_dir, os.path.basename(dst)) + ".tmp")
        if isinstance(e, CheckpointSaveError):
            raise
        raise CheckpointSaveError(f"checkpoint not saved: {dst}: {one_line(e)}") from e


def remove_checkpoint(path: str) -> None:
    """Delete the set of checkpoint ``path``: manifest first (the set is then invalid), then its files."""
    remove(manifest_path(path))
    remove(path)
    for f in shard_files_of(path):
        remove(f)


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


# ----------------------------------------------------------------------------------- resume choice
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
