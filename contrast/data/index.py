"""Dataset index files, built once and shared by every process (see ``docs/data.md``).

An index file holds a JSON header and flat numpy arrays. Per-sample access reads single rows with
``os.pread`` (:class:`RowReader`), bulk work memory-maps the file (:func:`read_index`); either way
all DataLoader workers of all ranks on a machine share one copy through the page cache (no
per-worker parse, no per-worker Python objects, no per-worker growth). Index files are written
atomically (temporary name, ``os.replace``) under an advisory lock, so concurrent ranks build an
index once and never read a partial one. Each index lists its sources (files or folders with
size and mtime); a source that changed makes the index stale and it is rebuilt (with a warning).

What goes into an index: :mod:`contrast.data.zip_index` and :mod:`contrast.data.folder_index`.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import uuid
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from contrast.logger import Progress

INDEX_VERSION = 1
_MAGIC = b"CTRXIDX\x01"
_ALIGN = 64


def write_index(path: str, meta: dict, arrays: Dict[str, np.ndarray]) -> None:
    """Write ``meta`` (JSON-able) and ``arrays`` to ``path`` atomically (64-byte aligned arrays)."""
    specs, offset = {}, 0
    for name, a in arrays.items():
        specs[name] = {"dtype": a.dtype.descr if a.dtype.names else a.dtype.str, "shape": list(a.shape),
                       "offset": offset}
        offset += -(-a.nbytes // _ALIGN) * _ALIGN
    header = json.dumps({"meta": meta, "arrays": specs, "end": offset}).encode()
    base = -(-(len(_MAGIC) + 8 + len(header)) // _ALIGN) * _ALIGN
    tmp = f"{path}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(_MAGIC + len(header).to_bytes(8, "little") + header)
            for name, a in arrays.items():
                f.seek(base + specs[name]["offset"])
                f.write(memoryview(np.ascontiguousarray(a)).cast("B"))
            f.seek(base + offset)
            f.write(_MAGIC)  # trailer: a file cut short anywhere fails the size check
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@dataclass
class Index:
    """An index: ``meta`` (JSON header), ``arrays`` (read-only views of a shared memory map of the
    file, or plain arrays when ``path`` is None) and each array's byte offset in the file."""

    meta: dict
    arrays: Dict[str, np.ndarray]
    path: Optional[str] = None
    offsets: Optional[Dict[str, int]] = None


def read_index(path: str) -> Index:
    """Open an index file; its arrays are read-only views of a shared mapping.

    Raises ``ValueError`` for a file that is not a complete index (truncated, foreign, old format).
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < len(_MAGIC) + 8:
            raise ValueError("file too short")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if mm[:len(_MAGIC)] != _MAGIC:
        raise ValueError("not an index file of this format version")
    hlen = int.from_bytes(mm[len(_MAGIC): len(_MAGIC) + 8], "little")
    if len(_MAGIC) + 8 + hlen > size:
        raise ValueError("truncated header")
    header = json.loads(mm[len(_MAGIC) + 8: len(_MAGIC) + 8 + hlen])
    base = -(-(len(_MAGIC) + 8 + hlen) // _ALIGN) * _ALIGN
    if size != base + header["end"] + len(_MAGIC) or mm[size - len(_MAGIC):] != _MAGIC:
        raise ValueError(f"truncated ({size} bytes, {base + header['end'] + len(_MAGIC)} expected)")
    arrays, offsets = {}, {}
    for name, spec in header["arrays"].items():
        d = spec["dtype"]
        dtype = np.dtype([tuple(f) for f in d]) if isinstance(d, list) else np.dtype(d)
        count = int(np.prod(spec["shape"], dtype=np.int64))
        offsets[name] = start = base + spec["offset"]
        arrays[name] = np.frombuffer(mm, dtype=dtype, count=count, offset=start).reshape(spec["shape"])
    return Index(header["meta"], arrays, path, offsets)


class RowReader:
    """Rows of one index array read with ``os.pread`` on demand.

    Reading a few rows this way does not map the file into the process (a memory map faults in
    whole page-cache folios, so a worker's RSS would grow towards the index size); the file's pages
    stay in the shared page cache. Descriptors are per process: inherited across ``fork`` (``pread``
    has no shared offset), reopened after unpickling. An in-memory index is read directly.
    """

    def __init__(self, index: Index, name: str) -> None:
        a = index.arrays[name]
        self.dtype, self.length = a.dtype, len(a)
        self.path = index.path
        self.offset = index.offsets[name] if index.path else 0
        self._array = None if index.path else a
        self._fd: Optional[int] = None

    def raw(self, lo: int, count: int = 1) -> bytes:
        """The bytes of rows ``lo .. lo + count - 1``."""
        if self._array is not None:
            return self._array[lo: lo + count].tobytes()
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        size = self.dtype.itemsize
        data = os.pread(self._fd, count * size, self.offset + lo * size)
        if len(data) != count * size:
            raise OSError(f"{self.path}: index file shorter than expected (changed while in use?)")
        return data

    def __call__(self, lo: int, count: int = 1) -> np.ndarray:
        return np.frombuffer(self.raw(lo, count), dtype=self.dtype)

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def __getstate__(self):
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        self.close()


def file_stamp(path: str) -> List:
    """``[size, mtime_ns]`` of a file, ``[None, mtime_ns]`` of a folder: what marks it changed."""
    st = os.stat(path)
    return [None if os.path.isdir(path) else st.st_size, st.st_mtime_ns]


def stale_reason(meta: dict, root: str, kind: str, split: str) -> Optional[str]:
    """Why the index ``meta`` does not describe ``root`` any more (None when it is fresh)."""
    if meta.get("version") != INDEX_VERSION or meta.get("kind") != kind or meta.get("split") != split:
        return "written by another version or for another layout"
    for rel, stamp in meta["sources"]:
        path = os.path.join(root, rel)
        try:
            now = file_stamp(path)
        except OSError:
            return f"{path} no longer exists"
        if now != stamp:
            return f"{path} was modified after the index was written"
    return None


@contextlib.contextmanager
def _exclusive(lock_path: str) -> Iterator[None]:
    """An advisory lock on ``lock_path`` (an existing file or folder, opened read-only, so no lock
    file is created); a no-op where the file system has no locks."""
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def default_index_dir() -> str:
    """Where indexes go when the data folder is read-only: ``~/.cache/contrast/index``."""
    return os.path.join(os.path.expanduser("~"), ".cache", "contrast", "index")


def index_locations(root: str, name: str, index_dir: Optional[str]) -> List[str]:
    """Candidate index paths: next to the data, then the per-user cache (or ``index_dir`` only)."""
    key = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:16]
    cached = os.path.join(index_dir or default_index_dir(), f"{key}-{name}")
    return [cached] if index_dir else [os.path.join(root, name), cached]


def load_or_build(root: str, name: str, kind: str, split: str, build: Callable[[], Tuple[dict, Dict]],
                  lock_path: str, index_dir: Optional[str] = None) -> Index:
    """A fresh :class:`Index` of ``root`` (its ``path`` is None when it is kept in memory).

    A fresh index file is opened (:func:`read_index`). Otherwise, under a lock on ``lock_path``,
    the index is built (``build()``), written to the first writable location (see
    :func:`index_locations`) and opened; a stale or unreadable one is rebuilt with a
    ``RuntimeWarning`` naming it (emitted before the build, so it precedes a build error).
    """
    paths = index_locations(root, name, index_dir)

    def fresh() -> Tuple[Optional[Index], List[str]]:
        notes = []
        for p in paths:
            if not os.path.exists(p):
                continue
            try:
                index = read_index(p)
            except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
                notes.append(f"{p}: index file is unreadable ({e})")
                continue
            reason = stale_reason(index.meta, root, kind, split)
            if reason is None:
                return index, notes
            notes.append(f"{p}: index is out of date ({reason})")
        return None, notes

    found, _ = fresh()
    if found:
        return found
    with _exclusive(lock_path):
        found, notes = fresh()  # another rank may have built it while we waited
        if found:
            return found
        for note in notes:
            warnings.warn(f"{note}; rebuilding it", RuntimeWarning, stacklevel=3)
        with Progress(f"indexing {root}/{split} ({kind})", unit="step") as bar:
            meta, arrays = build()
            bar.update()
        errors = []
        for p in paths:
            try:
                os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
                write_index(p, meta, arrays)
                return read_index(p)
            except OSError as e:
                errors.append(f"{p}: {e.strerror or e}")
        warnings.warn(f"cannot write a dataset index ({'; '.join(errors)}); keeping it in memory, so every "
                      f"process builds its own", RuntimeWarning, stacklevel=3)
        return Index(meta, arrays)
