"""Seeds of a run: the global RNGs of a process, and seeds mixed from several integers."""
from __future__ import annotations

import random

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (SplitMix64 finaliser over the parts)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = ((h ^ (int(p) & _MASK64)) * 0x9E3779B97F4A7C15) & _MASK64
        h ^= h >> 31
        h = (h * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 27
    return h & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
