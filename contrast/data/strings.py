"""Byte strings as ``(buffer, start, length)`` arrays: hashing, comparison and joins, vectorised
over numpy arrays 8 bytes a step rather than per-string Python objects; every hash match is
verified byte by byte.

Used to join map-file paths against zip entry names (:mod:`contrast.data.zip_index`).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from contrast.data.zipformat import TAIL_MASKS, PaddedBytes
from contrast.seeding import mix64

_FNV_OFFSET, _FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3


def by_length(length: np.ndarray, step: int = 1) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    order, active, full = by_length(length, 8)
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
    order, active, full = by_length(a_len[idx], 8)
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
