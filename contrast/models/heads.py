"""Projection heads mapping pooled backbone features to the embedding space.

``mlp=True`` is the 2-layer head of MoCo v2 / SimCLR as used by the PIC release:
Linear(feat, feat) -> ReLU -> Linear(feat, out), without BatchNorm. Otherwise a
single Linear(feat, out) (InstDisc, MoCo v1). The methods L2-normalise the output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def build_head(in_dim: int, out_dim: int = 128, mlp: bool = False) -> nn.Module:
    """Head mapping (B, in_dim) to (B, out_dim) (``--mlp-head``, ``--feature-dim``)."""
    if in_dim <= 0 or out_dim <= 0:
        raise ValueError(f"head dimensions must be positive, got in_dim={in_dim}, "
                         f"out_dim={out_dim} (--feature-dim)")
    if mlp:
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))
    return nn.Linear(in_dim, out_dim)


def normalize_fp32(y: torch.Tensor) -> torch.Tensor:
    """L2-normalise the rows of (B, D) ``y`` in fp32, outside any autocast region."""
    with torch.autocast(device_type=y.device.type, enabled=False):
        return F.normalize(y.float(), dim=1)
