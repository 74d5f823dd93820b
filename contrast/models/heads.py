"""Projection heads mapping pooled backbone features to the embedding space.

``mlp=True`` is the 2-layer head of MoCo v2 / SimCLR in the form of the PIC release
(its ``fc1`` / ``relu2`` / ``fc2``): Linear(feat, hidden) -> ReLU -> Linear(hidden, out),
both Linear layers with bias, no BatchNorm, hidden width 2048 for every backbone (the
release fixes it; here ``hidden_dim``). Otherwise a single Linear(feat, out) with bias
(InstDisc, MoCo v1; the release's ``fc``). PyTorch's default Linear initialisation, as
the release. The methods L2-normalise the output.

State-dict names: ``0.weight``/``0.bias`` and ``2.weight``/``2.bias`` for the MLP (the
release's ``fc1.*`` and ``fc2.*``), ``weight``/``bias`` for the linear head (``fc.*``).

:func:`build_mlp` is the general 2-layer MLP behind it; ``batch_norm=True`` inserts BatchNorm1d
after the hidden Linear (BYOL's projector and predictor, SwAV's projection head).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Hidden width of the MLP head in the release, whatever the backbone width.
MLP_HIDDEN_DIM = 2048


def _check_dims(in_dim: int, out_dim: int) -> None:
    if in_dim <= 0 or out_dim <= 0:
        raise ValueError(f"head dimensions must be positive, got in_dim={in_dim}, "
                         f"out_dim={out_dim} (--feature-dim)")


def build_mlp(in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool = False,
              last_bias: bool = True, num_layers: int = 2, hidden_bias: bool = True) -> nn.Sequential:
    """Linear(in_dim, hidden_dim) -> [BatchNorm1d(hidden_dim)] -> ReLU -> Linear(hidden_dim, out_dim).

    Maps (B, in_dim) to (B, out_dim). ``batch_norm``: BYOL (Grill et al. 2020, Sec. 3.3) and SwAV
    (Caron et al. 2020, its ``projection_head``); ``last_bias=False``: BYOL's output layer has no
    bias (its reference code). Without batch norm the keys are ``0.*`` and ``2.*``, the release's head.
    ``num_layers`` > 2 repeats the hidden block (Linear(hidden, hidden) -> [BN] -> ReLU) before the
    output layer (Barlow Twins' and VICReg's 3-layer projectors); ``hidden_bias=False`` drops the
    bias of the hidden Linear layers (Barlow Twins).
    """
    _check_dims(in_dim, out_dim)
    if hidden_dim <= 0 or num_layers < 2:
        raise ValueError(f"the MLP head needs a positive hidden width and >= 2 layers, got {hidden_dim} "
                         f"and {num_layers}")
    layers: list = []
    for width in [in_dim] + [hidden_dim] * (num_layers - 2):
        norm = [nn.BatchNorm1d(hidden_dim)] if batch_norm else []
        layers += [nn.Linear(width, hidden_dim, bias=hidden_bias), *norm, nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Linear(hidden_dim, out_dim, bias=last_bias))


def build_head(in_dim: int, out_dim: int = 128, mlp: bool = False, hidden_dim: int = MLP_HIDDEN_DIM) -> nn.Module:
    """Head mapping (B, in_dim) to (B, out_dim) (``--mlp-head``, ``--feature-dim``).

    ``hidden_dim`` is the MLP's hidden width (default 2048 as the release, also for
    ResNet-18/34 whose ``in_dim`` is 512); ignored without ``mlp``.
    """
    if mlp:
        return build_mlp(in_dim, hidden_dim, out_dim)
    _check_dims(in_dim, out_dim)
    return nn.Linear(in_dim, out_dim)


def normalize_fp32(y: torch.Tensor) -> torch.Tensor:
    """L2-normalise the rows of (B, D) ``y`` in fp32, outside any autocast region."""
    with torch.autocast(device_type=y.device.type, enabled=False):
        return F.normalize(y.float(), dim=1)
