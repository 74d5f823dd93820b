"""Dataset indexes built once and shared by every process (see ``docs/data.md``).

An index file holds a JSON header and flat numpy arrays. Per-sample access reads single rows with
``os.pread`` (:class:`RowReader`), bulk work memory-maps the file (:func:`read_index`); either way
all DataLoader workers of all ranks on a machine share one copy through the page cache (no
per-worker parse, no per-worker Python objects, no per-worker growth). Index files are written
atomically (temporary name, ``os.replace``) under an advisory lock, so concurrent ranks build an
index once and never read a partial one. Each index lists its sources (files or folders with
size and mtime); a source that changed makes the index stale and it is rebuilt (with a warning).

Building blocks, all vectorised over numpy arrays rather than per-line Python objects:

* :func:`parse_map` reads a ``<path><TAB><label>`` map file (falls back to a line-by-line parser
  for unusual files and for exact error messages),
* :func:`hash_strings` / :func:`equal_strings` / :func:`match_strings` hash, compare and join
  byte strings (map paths against zip names) 8 bytes a step; every hash match is verified byte
  by byte,
* :func:`build_zip_index` and :func:`build_folder_index` produce the arrays the datasets use.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import re
import uuid
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS

from contrast.data.zipformat import (DEFLATED, FLAG_ENCRYPTED, STORED, TAIL_MASKS, BadZip, PaddedBytes,
                                     find_pattern, masked_words, read_central_directory)
from contrast.logger import Progress

INDEX_VERSION = 1
_MAGIC = b"CTRXIDX\x01"
_ALIGN = 64
_FNV_OFFSET, _FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3

# One record per map entry of a zip layout (40 bytes): where the local header is, how to read and
# check the entry, its label and shard, and where its name is in the map file (for messages).
ZIP_RECORD = np.dtype([("offset", "<i8"), ("name_off", "<i8"), ("comp", "<u4"), ("size", "<u4"), ("crc", "<u4"),
                       ("label", "<i4"), ("shard", "<u2"), ("hdr", "<u2"), ("name_len", "<u2"), ("method", "u1"),
                       ("pad", "u1")])


class DatasetError(ValueError):
    """Bad dataset input; the message always names the offending file or folder."""


# ------------------------------------------------------------------------------------------------
# Index files
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# Byte strings as (buffer, start, length) arrays
# ------------------------------------------------------------------------------------------------

def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic): a bijective bit mixer."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _by_length(length: np.ndarray, step: int = 1) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Order by decreasing length; for each ``j = 0, step, 2 step, ...`` below the longest length the
    number of strings longer than ``j`` and of those at least ``j + step`` long (prefixes of that
    order: at step j, ``[:full]`` need no end mask and ``[full:active]`` do)."""
    key = -length
    if len(length) and length.max() < 2 ** 15:
        key = key.astype(np.int16)  # numpy sorts 16-bit integers stably by radix sort
    order = np.argsort(key, kind="stable")
    desc = length[order]
    longest = int(desc[0]) if len(order) else 0
    j = np.arange(0, longest, step)
    return order, np.searchsorted(-desc, -j, side="left"), np.searchsorted(-desc, -(j + step), side="right")


def _word_steps(words: np.ndarray, start: np.ndarray, length: np.ndarray, full: int, k: int, j: int) -> np.ndarray:
    """Words at ``start[:k] + j``, the bytes past each string's end zeroed (only ``[full:k]`` can
    end inside this word)."""
    w = words[start[:k] + j]
    if full < k:
        w[full:] &= TAIL_MASKS[np.minimum(length[full:k] - j, 8)]
    return w


def hash_strings(text: PaddedBytes, start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """64-bit hash (uint64) of every string ``text[start_i: start_i + length_i]``, 8 bytes a step."""
    order, active, full = _by_length(length, 8)
    s, n = start[order], length[order]
    h = mix64(np.uint64(_FNV_OFFSET) ^ n.astype(np.uint64))
    for step, (k, f) in enumerate(zip(active.tolist(), full.tolist())):
        h[:k] = mix64((h[:k] ^ _word_steps(text.words, s, n, f, k, 8 * step)) * np.uint64(_FNV_PRIME))
    out = np.empty_like(h)
    out[order] = h
    return out


def equal_strings(a: PaddedBytes, a_start: np.ndarray, a_len: np.ndarray, b: PaddedBytes,
                  b_start: np.ndarray, b_len: np.ndarray) -> np.ndarray:
    """Element-wise byte equality of two equally long lists of strings (bool array)."""
    ok = np.asarray(a_len == b_len).copy()
    idx = np.flatnonzero(ok)
    if not len(idx):
        return ok
    order, active, full = _by_length(a_len[idx], 8)
    idx = idx[order]
    sa, sb, n = a_start[idx], b_start[idx], a_len[idx]
    same = np.ones(len(idx), dtype=bool)
    for step, (k, f) in enumerate(zip(active.tolist(), full.tolist())):
        j = 8 * step
        same[:k] &= _word_steps(a.words, sa, n, f, k, j) == _word_steps(b.words, sb, n, f, k, j)
    ok[idx] = same
    return ok


def match_strings(q: PaddedBytes, q_start: np.ndarray, q_len: np.ndarray, keys: PaddedBytes,
                  k_start: np.ndarray, k_len: np.ndarray, prefix: bytes = b"") -> np.ndarray:
    """For each query string, the index of the key equal to ``prefix + query`` (the last one if
    several are equal, as ``zipfile`` keeps the last entry of a name), or -1.

    A query list in the keys' order is recognised by one comparison. Otherwise keys are hashed
    without their first ``len(prefix)`` bytes (checked separately) and joined by sorted hashes;
    every hit is verified byte by byte (a collision falls back to exact comparison).
    """
    p = len(prefix)
    if len(q_start) == len(k_start) and (k_len >= p).all():
        same = equal_strings(q, q_start, q_len, keys, k_start + p, k_len - p)
        if same.all() and _has_prefix(keys, k_start, prefix).all():
            return np.arange(len(q_start), dtype=np.int64)
    k_hash = hash_strings(keys, k_start + p, np.maximum(k_len - p, 0))
    q_hash = hash_strings(q, q_start, q_len)
    order = np.argsort(k_hash, kind="stable")
    sorted_hash = k_hash[order]
    del k_hash
    q_order = np.argsort(q_hash)
    pos = np.empty(len(q_hash), dtype=np.int64)
    pos[q_order] = np.searchsorted(sorted_hash, q_hash[q_order], side="right") - 1
    del q_order
    hit = (pos >= 0) & (sorted_hash[np.maximum(pos, 0)] == q_hash)
    found = np.where(hit, order[np.maximum(pos, 0)], -1)
    del pos
    rows = np.flatnonzero(hit)
    cand = found[rows]
    ok = (k_len[cand] == q_len[rows] + p) & _has_prefix(keys, k_start[cand], prefix)
    ok &= equal_strings(q, q_start[rows], q_len[rows], keys, k_start[cand] + p, k_len[cand] - p)
    for r in rows[~ok].tolist():  # hash collisions: compare every key of that hash exactly
        want = prefix + q.take(q_start[r], q_len[r])
        lo, hi = np.searchsorted(sorted_hash, q_hash[r], "left"), np.searchsorted(sorted_hash, q_hash[r], "right")
        same = [int(c) for c in order[lo:hi] if keys.take(k_start[c], k_len[c]) == want]
        found[r] = max(same) if same else -1
    return found


def _has_prefix(text: PaddedBytes, start: np.ndarray, prefix: bytes) -> np.ndarray:
    n = np.full(len(start), len(prefix), dtype=np.int64)
    return equal_strings(text, start, n, PaddedBytes.of(prefix), np.zeros(len(start), dtype=np.int64), n)


# ------------------------------------------------------------------------------------------------
# Map files
# ------------------------------------------------------------------------------------------------

@dataclass
class MapFile:
    """A parsed map file: ``text`` holds the file's bytes; entry i's path is ``text.data[start[i]:
    start[i] + length[i]]`` (UTF-8) and its label ``labels[i]``; ``lines`` are 1-based line numbers
    when the line-by-line parser ran (else computed on demand)."""

    path: str
    text: PaddedBytes
    start: np.ndarray
    length: np.ndarray
    labels: np.ndarray
    lines: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.start)

    @property
    def buf(self) -> np.ndarray:
        return self.text.data

    def path_at(self, i: int) -> str:
        return self.text.take(self.start[i], self.length[i]).decode("utf-8", "replace")

    def line_of(self, i: int) -> int:
        if self.lines is not None:
            return int(self.lines[i])
        return 1 + int(np.count_nonzero(self.buf[: self.start[i]] == 10))


_LINE = re.compile(rb"([^\r\n]*)(\r\n|\n|\r|$)")
_SCAN = 1 << 26  # bytes per vectorised pass over a map file


def _parse_int(text: str) -> Optional[int]:
    try:
        return int(text)
    except ValueError:
        return None


def _parse_map_lines(path: str, text: PaddedBytes) -> MapFile:
    """Line-by-line parser: the reference semantics (universal newlines, blank lines skipped,
    ``int()`` labels) and the exact error messages."""
    starts, lengths, labels, lines = [], [], [], []
    lineno = 0
    data = text.data.tobytes()
    for m in _LINE.finditer(data):
        if m.start() == len(data) and not m.group(0):
            break
        lineno += 1
        line = m.group(1).decode("utf-8")
        if not line.strip():
            continue
        parts = line.split("\t")
        label = _parse_int(parts[1]) if len(parts) == 2 and parts[0] else None
        if label is None:
            raise DatasetError(f"{path}:{lineno}: expected '<relative path><TAB><integer label>', got {line!r}")
        if label < 0:
            raise DatasetError(f"{path}:{lineno}: negative label {label} (labels must be >= 0)")
        starts.append(m.start(1))
        lengths.append(len(parts[0].encode("utf-8")))
        labels.append(label)
        lines.append(lineno)
    return MapFile(path, text, np.array(starts, dtype=np.int64),
                   np.array(lengths, dtype=np.int64), np.array(labels, dtype=np.int64),
                   np.array(lines, dtype=np.int64))


def _parse_map_fast(path: str, text: PaddedBytes) -> Optional[MapFile]:
    """Vectorised parser for regular files (every non-empty line ``path<TAB>digits``, ``\\n`` or
    ``\\r\\n`` endings); None when anything is irregular (the line parser then decides)."""
    buf = text.data
    n = len(buf)
    ctl = np.concatenate([np.flatnonzero(buf[lo: lo + _SCAN] < 14) + lo for lo in range(0, n, _SCAN)] or
                         [np.zeros(0, dtype=np.int64)])  # one pass finds \t, \n and \r
    kind = buf[ctl]
    nl, tabs, cr = ctl[kind == 10], ctl[kind == 9], ctl[kind == 13]
    del ctl, kind
    if n and buf[-1] != 10:
        nl = np.append(nl, n)
    begin = np.concatenate([[0], nl[:-1] + 1]).astype(np.int64)
    end = nl.astype(np.int64)
    if len(cr):
        if cr[-1] + 1 >= n or not (buf[cr + 1] == 10).all():
            return None
        end = end - (buf[np.maximum(end - 1, 0)] == 13) * (end > begin)
    keep = end > begin
    begin, end = begin[keep], end[keep]
    first = np.searchsorted(tabs, begin)
    if not np.array_equal(np.searchsorted(tabs, end) - first, np.ones(len(begin), dtype=np.int64)):
        return None
    tab = tabs[first]
    digits = end - tab - 1
    if not len(begin) or (tab == begin).any() or digits.min() < 1 or digits.max() > 18:
        return None
    labels = np.zeros(len(begin), dtype=np.int64)
    order, active, _ = _by_length(digits)
    at = tab[order] + 1
    value = np.zeros(len(begin), dtype=np.int64)
    for j, k in enumerate(active.tolist()):
        d = buf[at[:k] + j].astype(np.int64) - 48
        if ((d < 0) | (d > 9)).any():
            return None
        value[:k] = value[:k] * 10 + d
    labels[order] = value
    return MapFile(path, text, begin, tab - begin, labels)


def parse_map(path: str) -> MapFile:
    """Parse an ImageNet-Zip map file (one ``relative/path<TAB>label`` per line, blank lines
    skipped); raises :class:`DatasetError` naming the file and line for bad input."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: map file does not exist")
    text = PaddedBytes.read(path)
    parsed = _parse_map_fast(path, text) or _parse_map_lines(path, text)
    if not len(parsed):
        raise DatasetError(f"{path}: map file lists no images")
    return parsed


# ------------------------------------------------------------------------------------------------
# Zip layouts (one zip or shards)
# ------------------------------------------------------------------------------------------------

def _split_shards(root: str, split: str, m: MapFile) -> Tuple[List[str], np.ndarray, np.ndarray, np.ndarray]:
    """``(shard names, shard id per entry, entry name start, entry name length)``.

    One zip ``root/<split>.zip`` when it exists; else every map path is ``<shard>.zip/<entry>``
    with ``<shard>.zip`` relative to ``root`` (shard ids follow the sorted shard names).
    """
    single = f"{split}.zip"
    if os.path.isfile(os.path.join(root, single)):
        return [single], np.zeros(len(m), dtype=np.int64), m.start, m.length
    occ = find_pattern(m.buf, b".zip/")
    at = np.searchsorted(occ, m.start)
    hit = at < len(occ)
    cut = np.where(hit, occ[np.minimum(at, max(len(occ) - 1, 0))] if len(occ) else 0, 0)
    hit &= cut + 5 < m.start + m.length
    zip_path = os.path.join(root, single)
    if not hit.any():
        raise DatasetError(f"{zip_path}: zip file does not exist")
    if not hit.all():
        i = int(np.flatnonzero(~hit)[0])
        raise DatasetError(f"{m.path}:{m.line_of(i)}: path '{m.path_at(i)}' names no shard ('<shard>.zip/<entry>') "
                          f"and {zip_path} does not exist")
    shard_len = cut + 4 - m.start
    h = hash_strings(m.text, m.start, shard_len)
    uniq, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    names = [m.text.take(m.start[i], shard_len[i]).decode("utf-8") for i in first.tolist()]
    rep = first[inverse]
    if not equal_strings(m.text, m.start, shard_len, m.text, m.start[rep], shard_len[rep]).all():
        raise DatasetError(f"{m.path}: shard names collide in the 64-bit hash; rename the shards")  # never seen
    order = np.argsort(names)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return [names[i] for i in order], rank[inverse.ravel()], cut + 5, m.start + m.length - cut - 5


def _detect_prefix(cd, entry: bytes) -> List[int]:
    """Zip entries named ``entry`` exactly, else those ending in ``'/' + entry`` (indices)."""
    target = PaddedBytes.of(entry)
    exact = np.flatnonzero(cd.name_len == len(entry))
    head = target.words[0] & TAIL_MASKS[min(len(entry), 8)]  # cheap first filter: the first 8 bytes
    exact = exact[masked_words(cd.names.words, cd.name_start[exact], cd.name_len[exact]) == head]
    exact = exact[equal_strings(cd.names, cd.name_start[exact], cd.name_len[exact], target,
                                np.zeros(len(exact), dtype=np.int64), np.full(len(exact), len(entry)))]
    if len(exact):
        return [int(exact[-1])]
    suffix = np.frombuffer(b"/" + entry, dtype=np.uint8)
    cand = np.flatnonzero(cd.name_len >= len(suffix))
    tail = cd.name_start[cand] + cd.name_len[cand]
    for j in range(1, len(suffix) + 1):
        keep = cd.names.data[tail - j] == suffix[-j]
        cand, tail = cand[keep], tail[keep]
    return cand.tolist()


def build_zip_index(root: str, split: str) -> Tuple[dict, Dict[str, np.ndarray]]:
    """Index of the ImageNet-Zip layout ``root/<split>_map.txt`` + ``<split>.zip`` or shards.

    Raises :class:`DatasetError` (message naming the file) for every bad input the datasets report.
    """
    map_path = os.path.join(root, f"{split}_map.txt")
    train_map = os.path.join(root, "train_map.txt")
    sources = [[os.path.basename(map_path), file_stamp(map_path)]] if os.path.isfile(map_path) else []
    m = parse_map(map_path)
    if split == "train":
        num_classes = int(m.labels.max()) + 1
    else:
        if os.path.isfile(train_map):
            sources.append(["train_map.txt", file_stamp(train_map)])
        num_classes = int(parse_map(train_map).labels.max()) + 1
    bad = np.flatnonzero(m.labels >= num_classes)
    if len(bad):
        i = int(bad[0])
        raise DatasetError(f"{map_path}: label {int(m.labels[i])} of '{m.path_at(i)}' is out of range "
                          f"[0, {num_classes}) (num_classes = 1 + max label of {train_map})")
    if num_classes > 2 ** 31 - 1:
        raise DatasetError(f"{map_path}: labels must be < 2^31")
    shards, shard_of, e_start, e_len = _split_shards(root, split, m)
    if len(shards) > 65535:
        raise DatasetError(f"{map_path}: {len(shards)} shards (at most 65535 are supported)")
    if e_len.max() > 65535:
        raise DatasetError(f"{map_path}:{m.line_of(int(e_len.argmax()))}: path longer than 65535 bytes")
    rec = np.zeros(len(m), dtype=ZIP_RECORD)
    rec["label"], rec["shard"], rec["name_off"], rec["name_len"] = m.labels, shard_of, e_start, e_len
    members_of = np.argsort(shard_of, kind="stable")
    bounds = np.searchsorted(shard_of[members_of], np.arange(len(shards) + 1))
    prefixes = []
    for s, name in enumerate(shards):
        members = members_of[bounds[s]: bounds[s + 1]]
        path = os.path.join(root, name)
        first = int(members[0])
        if not os.path.isfile(path):
            if len(shards) == 1 and name == f"{split}.zip":
                raise DatasetError(f"{path}: zip file does not exist")
            raise DatasetError(f"{path}: shard listed in {map_path} (line {m.line_of(first)}) does not exist")
        sources.append([name, file_stamp(path)])
        try:
            cd = read_central_directory(path)
        except (BadZip, OSError) as e:
            raise DatasetError(f"{path}: not a readable zip file ({e})") from e
        entry0 = m.text.take(e_start[first], e_len[first])
        hits = _detect_prefix(cd, entry0)
        if len(hits) != 1:
            what = "is missing from" if not hits else f"matches {len(hits)} entries of"
            raise DatasetError(f"{path}: entry '{entry0.decode('utf-8', 'replace')}' (first line of {map_path}"
                              f"{'' if len(shards) == 1 else ' in this shard'}) {what} the zip")
        prefix = cd.name(hits[0])[: len(cd.name(hits[0])) - len(entry0.decode("utf-8"))]
        prefixes.append(prefix)
        z = match_strings(m.text, e_start[members], e_len[members], cd.names, cd.name_start, cd.name_len,
                          prefix.encode("utf-8"))
        missing = np.flatnonzero(z < 0)
        if len(missing):
            i = int(members[missing[0]])
            raise DatasetError(f"{path}: {len(missing)} entries of {map_path} are missing from the zip (entry prefix "
                              f"'{prefix}'), first: '{m.text.take(e_start[i], e_len[i]).decode()}'")
        for what, bad in (("is encrypted (not supported)", (cd.flags[z] & FLAG_ENCRYPTED) != 0),
                          ("uses an unsupported compression method (only stored and deflated entries are read; "
                           "rewrite the zip with tools/make_zip_dataset.py)",
                           (cd.method[z] != STORED) & (cd.method[z] != DEFLATED)),
                          ("is 4 GiB or larger", (cd.file_size[z] > 0xFFFFFFFF) | (cd.comp_size[z] > 0xFFFFFFFF))):
            if bad.any():
                raise DatasetError(f"{path}:{cd.name(int(z[np.argmax(bad)]))}: entry {what}")
        rec["offset"][members] = cd.header_offset[z]
        rec["hdr"][members] = np.minimum(cd.header_guess[z], 65535)
        rec["comp"][members] = cd.comp_size[z]
        rec["size"][members] = cd.file_size[z]
        rec["crc"][members] = cd.crc[z]
        rec["method"][members] = cd.method[z]
        del cd
    meta = {"version": INDEX_VERSION, "kind": "zip", "split": split, "num_classes": num_classes, "size": len(m),
            "map": os.path.basename(map_path), "shards": shards, "prefixes": prefixes, "sources": sources}
    return meta, {"records": rec}


# ------------------------------------------------------------------------------------------------
# Folder layout
# ------------------------------------------------------------------------------------------------

def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def find_folder_classes(root: str, split: str) -> List[str]:
    """Sorted class folder names that define labels: those of ``root/train`` if it exists."""
    ref = os.path.join(root, "train")
    if not os.path.isdir(ref):
        ref = os.path.join(root, split)
    classes = sorted(e.name for e in os.scandir(ref) if e.is_dir())
    if not classes:
        raise DatasetError(f"{ref}: no class folders found (expected {ref}/<class>/<image>)")
    return classes


def _walk_images(split_dir: str, top: str, stamps: Dict[str, List]) -> List[str]:
    """Image files under ``top`` (following links, as ``os.walk(followlinks=True)``), relative to
    ``split_dir`` with ``/`` separators; each folder is stamped before it is listed."""
    files, stack = [], [top]
    while stack:
        d = stack.pop()
        try:
            stamps[os.path.relpath(d, os.path.dirname(split_dir))] = file_stamp(d)
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if e.is_dir():
                stack.append(e.path)
            elif is_image_file(e.name):
                files.append(os.path.relpath(e.path, split_dir).replace(os.sep, "/"))
    return files


def scan_folder(root: str, split: str) -> Tuple[List[str], List[int], List[str], Dict[str, List]]:
    """``(relative paths '<class>/<file>', labels, classes, folder stamps)`` of ``root/<split>``.

    Raises :class:`DatasetError` naming the folder for a missing root or split, a split with no
    class folders, a class folder with no images, or a ``val`` class unknown to ``train``.
    """
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: dataset root does not exist or is not a folder")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise DatasetError(f"{split_dir}: split folder does not exist (expected {root}/{split}/<class>/<image>)")
    stamps: Dict[str, List] = {}
    ref = os.path.join(root, "train")
    if os.path.isdir(ref):
        stamps["train"] = file_stamp(ref)
    stamps[split] = file_stamp(split_dir)
    classes = find_folder_classes(root, split)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    split_classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not split_classes:
        raise DatasetError(f"{split_dir}: no class folders found (expected {split_dir}/<class>/<image>)")
    paths: List[str] = []
    labels: List[int] = []
    with Progress(f"scanning {split_dir}", total=len(split_classes), unit="class") as bar:
        for c in split_classes:
            class_dir = os.path.join(split_dir, c)
            if c not in class_to_idx:
                raise DatasetError(f"{class_dir}: class '{c}' does not exist in {os.path.join(root, 'train')}")
            files = sorted(_walk_images(split_dir, class_dir, stamps))
            if not files:
                raise DatasetError(f"{class_dir}: class folder contains no images (extensions "
                                   f"{', '.join(IMG_EXTENSIONS)})")
            paths += files
            labels += [class_to_idx[c]] * len(files)
            bar.update()
    return paths, labels, classes, stamps


def build_folder_index(root: str, split: str) -> Tuple[dict, Dict[str, np.ndarray]]:
    """Index of ``root/<split>/<class>/<image>``: the sorted file list as one UTF-8 blob +
    offsets + labels. Its sources are ``root/train`` (the classes) and every folder walked (adding
    or removing a file changes its folder's mtime)."""
    paths, labels, classes, stamps = scan_folder(root, split)
    data = [p.encode("utf-8") for p in paths]
    offsets = np.zeros(len(data) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in data], out=offsets[1:])
    meta = {"version": INDEX_VERSION, "kind": "folder", "split": split, "classes": classes, "size": len(paths),
            "sources": [[rel, stamp] for rel, stamp in sorted(stamps.items())]}
    return meta, {"names": np.frombuffer(b"".join(data), dtype=np.uint8), "name_offsets": offsets,
                  "labels": np.asarray(labels, dtype=np.int32)}
