"""A first-in-first-out queue of feature vectors kept as module buffers (MoCo's negatives, SwAV's
stored embeddings), so it lives in the checkpoint with the model."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeatureQueue(nn.Module):
    """``features`` (K, *shape) and a write pointer ``ptr``; rows are overwritten oldest first.

    Args:
        length: K.
        shape: shape of one entry, e.g. ``(D,)``.
        init: ``"random"`` (unit-norm normal rows drawn from a generator seeded by ``seed``, MoCo) or
            ``"zeros"`` (SwAV, which only uses the queue once it is full).
    """

    def __init__(self, length: int, shape: tuple, init: str = "random", seed: int = 0) -> None:
        super().__init__()
        if length <= 0:
            raise ValueError(f"queue length must be > 0, got {length}")
        if init == "random":
            gen = torch.Generator().manual_seed(seed)
            features = F.normalize(torch.randn(length, *shape, generator=gen), dim=-1)
        elif init == "zeros":
            features = torch.zeros(length, *shape)
        else:
            raise ValueError(f"queue init must be 'random' or 'zeros', got {init!r}")
        self.register_buffer("features", features)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return self.features.shape[0]

    @torch.no_grad()
    def enqueue(self, x: torch.Tensor) -> None:
        """Write the G rows of ``x`` (G, *shape) at the pointer, wrapping around modulo K."""
        size = len(self)
        if x.shape[0] > size:
            raise ValueError(f"the queue ({size} entries) is shorter than the batch written to it ({x.shape[0]})")
        pos = (self.ptr + torch.arange(x.shape[0], device=self.features.device)) % size
        self.features[pos] = x.to(self.features.dtype)
        self.ptr.copy_((self.ptr + x.shape[0]) % size)
