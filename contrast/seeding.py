"""Seed mixing and counter-based random numbers: every derived seed of a run comes from here, so
that one place fixes the values resumed and reproduced runs depend on (changing any function
changes the samples, crops and negatives of every run).

Foundation module: torch and numpy only.

* :func:`mix_seed`: one 63-bit seed from several Python integers (seed, rank, epoch, step);
* :func:`mix64` / :func:`mix_int`: SplitMix64's finaliser, vectorised over uint64 arrays / on one int;
* :func:`stream_generator`: a ``torch.Generator`` for item ``k`` of stream ``stream`` of a seed;
* :func:`philox4x32`: Philox4x32 (counter-based: draw ``i`` is a pure function of ``(i, key)``);
* :func:`seeded_rng`: the global torch, Python and numpy generators seeded for one block of code.
"""
from __future__ import annotations

import contextlib
import random
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import get_worker_info

MASK32 = 0xFFFFFFFF
MASK63 = (1 << 63) - 1
MASK64 = (1 << 64) - 1
#: 2^64 / golden ratio (SplitMix64's increment) and SplitMix64's two finaliser multipliers.
GOLDEN64 = 0x9E3779B97F4A7C15
MIX64_A, MIX64_B = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (SplitMix64 finaliser over the parts)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = ((h ^ (int(p) & MASK64)) * GOLDEN64) & MASK64
        h ^= h >> 31
        h = (h * MIX64_A) & MASK64
        h ^= h >> 27
    return h & MASK63


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic): a bijective bit mixer."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(MIX64_A)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(MIX64_B)
    return x ^ (x >> np.uint64(31))


def mix_int(x: int) -> int:
    """:func:`mix64` of one Python integer (taken modulo 2^64)."""
    return int(mix64(np.array([x & MASK64], dtype=np.uint64))[0])


def stream_generator(seed: int, stream: int, k: int) -> torch.Generator:
    """A CPU generator for item ``k`` of stream ``stream`` of ``seed`` (a linear combination of the
    three under SplitMix64's constants, 63 bits)."""
    g = torch.Generator()
    g.manual_seed((seed * GOLDEN64 + stream * MIX64_A + k * MIX64_B) & MASK63)
    return g


# ----------------------------------------------------------------------------------- Philox
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _mulhilo32(a: int, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)`` 32-bit halves of ``a * x`` for 32-bit ``a`` and int64 ``x`` in ``[0, 2^32)``.

    The product is split at 16 bits so that no int64 intermediate exceeds 2^49 (no overflow).
    """
    p_lo, p_hi = x * (a & 0xFFFF), x * (a >> 16)
    return (p_hi + (p_lo >> 16)) >> 16, (p_lo + ((p_hi & 0xFFFF) << 16)) & MASK32


def philox4x32(counter: Sequence[torch.Tensor], key: Tuple[int, int], rounds: int = 10) -> List[torch.Tensor]:
    """Philox4x32 (Salmon et al., SC 2011) of four broadcastable int64 tensors of 32-bit words under
    a 2-word key; returns the four output words (int64 in ``[0, 2^32)``), elementwise on any device."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _PHILOX_W[0]) & MASK32, (k1 + _PHILOX_W[1]) & MASK32
        hi0, lo0 = _mulhilo32(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def philox_key(seed: int) -> Tuple[int, int]:
    """The 2-word Philox key of a seed (its low 64 bits, low word first)."""
    seed &= MASK64
    return seed & MASK32, seed >> 32


# ----------------------------------------------------------------------------------- global generators
@contextlib.contextmanager
def seeded_rng(seed: Optional[int]) -> Iterator[None]:
    """Run a block (a worker-side transform) with its randomness a pure function of ``seed``.

    Seeds the CPU torch generator (what ``FastCropFlip``, the torchvision transforms and
    RandAugment draw from), Python's ``random`` and numpy's global generator with ``seed``
    (a 63-bit sample seed, see :func:`contrast.data.samplers.sample_seed`). Outside a DataLoader
    worker (``num_workers=0``) the three states are restored afterwards, so loading data does not
    change the main process' random streams; inside a worker nothing else uses them. ``None``:
    leave the generators alone (indices without a seed keep the previous behaviour).
    """
    if seed is None:
        yield
        return
    in_worker = get_worker_info() is not None
    saved = None if in_worker else (torch.default_generator.get_state(), random.getstate(), np.random.get_state())
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    try:
        yield
    finally:
        if saved is not None:
            torch.default_generator.set_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators of this process."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
