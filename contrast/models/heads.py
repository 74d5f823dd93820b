"""Projection heads mapping pooled backbone features to the embedding space.

``mlp=True`` is the 2-layer head of MoCo v2 / SimCLR in the form of the PIC release
(its ``fc1`` / ``relu2`` / ``fc2``): Linear(feat, hidden) -> ReLU -> Linear(hidden, out),
both Linear layers with bias, no BatchNorm, hidden width 2048 for every backbone (the
release fixes it; here ``hidden_dim``). Otherwise a single Linear(feat, out) with bias
(InstDisc, MoCo v1; the release's ``fc``). PyTorch's default Linear initialisation, as
the release. The methods L2-normalise the output.

State-dict names: ``0.weight``/``0.bias`` and ``2.weight``/``2.bias`` for the MLP (the
release's ``fc1.*`` and ``fc2.*``), ``weight``/``bias`` for the linear head (``fc.*``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Hidden width of the MLP head in the release, whatever the backbone width.
MLP_HIDDEN_DIM = 2048


def build_head(in_dim: int, out_dim: int = 128, mlp: bool = False, hidden_dim: int = MLP_HIDDEN_DIM) -> nn.Module:
    """Head mapping (B, in_dim) to (B, out_dim) (``--mlp-head``, ``--feature-dim``).

    ``hidden_dim`` is the MLP's hidden width (default 2048 as the release, also for
    ResNet-18/34 whose ``in_dim`` is 512); ignored without ``mlp``.
    """
    if in_dim <= 0 or out_dim <= 0:
        raise ValueError(f"head dimensions must be positive, got in_dim={in_dim}, "
                         f"out_dim={out_dim} (--feature-dim)")
    if mlp:
        if hidden_dim <= 0:
            raise ValueError(f"the MLP head's hidden width must be positive, got {hidden_dim}")
        return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
    return nn.Linear(in_dim, out_dim)


def normalize_fp32(y: torch.Tensor) -> torch.Tensor:
    """L2-normalise the rows of (B, D) ``y`` in fp32, outside any autocast region."""
    with torch.autocast(device_type=y.device.type, enabled=False):
        return F.normalize(y.float(), dim=1)
