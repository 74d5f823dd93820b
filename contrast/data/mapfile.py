"""ImageNet-Zip map files (``<path><TAB><label>`` per line), parsed into arrays.

:func:`parse_map` runs a vectorised parser and falls back to a line-by-line parser for unusual
files and for exact error messages.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from contrast.data.errors import DatasetError
from contrast.data.strings import by_length
from contrast.data.zipformat import PaddedBytes



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
    order, active, _ = by_length(digits)
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
