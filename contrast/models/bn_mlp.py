"""The batch-normalised MLP of MoCo v3 and SimSiam (``_build_mlp`` of facebookresearch/moco-v3
``moco/builder.py``; the projector and predictor of facebookresearch/simsiam ``simsiam/builder.py``).

Every hidden layer is Linear (no bias: the batch norm after it cancels one) -> BatchNorm1d -> ReLU;
the output layer is a Linear, with a bias or not, optionally followed by a BatchNorm1d without
affine parameters (SimCLR's last batch norm, "for simplicity without gamma" in MoCo v3).
"""
from __future__ import annotations

from typing import Sequence

from torch import nn


def build_bn_mlp(dims: Sequence[int], last_bias: bool = False, last_bn: bool = False) -> nn.Sequential:
    """MLP mapping (B, dims[0]) to (B, dims[-1]) with ``len(dims) - 1`` Linear layers.

    Keys: hidden layer i is ``3i`` (Linear), ``3i+1`` (BatchNorm1d), ``3i+2`` (ReLU); then the output
    Linear and, with ``last_bn``, ``BatchNorm1d(dims[-1], affine=False)``.
    """
    if len(dims) < 2 or any(d <= 0 for d in dims):
        raise ValueError(f"MLP widths must be >= 2 positive numbers, got {list(dims)}")
    layers: list = []
    for d_in, d_out in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=last_bias))
    if last_bn:
        layers.append(nn.BatchNorm1d(dims[-1], affine=False))
    return nn.Sequential(*layers)
