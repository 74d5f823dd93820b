"""Backbones: torchvision ResNets with the classifier removed.

``build_backbone(arch)`` returns ``torchvision.models.<arch>(weights=None)`` with
``fc = nn.Identity()``, so the backbone maps images (B, 3, H, W) to pooled
features (B, feat_dim) and its state dict loads into a plain torchvision model
(whose ``fc`` was removed) with ``strict=True``.

``small_stem=True`` adapts the network to 28-32 px images (CIFAR-style, as in the
SimCLR paper's CIFAR experiments): ``conv1`` becomes a 3x3 stride-1 convolution
and ``maxpool`` an ``nn.Identity``. Parameter names are unchanged, but the
``conv1.weight`` shape is (64, 3, 3, 3) instead of (64, 3, 7, 7), so such a
backbone only loads into a torchvision ResNet given the same stem.
"""
from __future__ import annotations

from typing import Callable, List, Tuple

import torch
import torchvision
from torch import nn

ARCHS: Tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                          "wide_resnet50_2", "wide_resnet101_2")


def build_backbone(arch: str, small_stem: bool = False) -> Tuple[nn.Module, int]:
    """Return ``(backbone, feat_dim)`` for a torchvision ResNet named ``arch`` (``--arch``).

    ``feat_dim`` is the width of the pooled feature: 512 for ResNet-18/34, 2048
    for the others.
    """
    if arch not in ARCHS:
        raise ValueError(f"--arch {arch!r} is not supported; choose one of: {', '.join(ARCHS)}")
    net = getattr(torchvision.models, arch)(weights=None)
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    if small_stem:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    return net, feat_dim


def encode_views(encoder: Callable[[torch.Tensor], torch.Tensor],
                 views: List[torch.Tensor]) -> List[torch.Tensor]:
    """Apply ``encoder`` to each view, batching consecutive views of equal shape.

    Views of the same resolution (e.g. SimCLR's two 224 px views, or multi-crop's
    small crops) go through the network as one concatenated batch, as in SimCLR
    and SwAV; BatchNorm statistics are then computed over all of them. Returns
    one (B, ...) output per view, in the order of ``views``.
    """
    out: List[torch.Tensor] = []
    start = 0
    while start < len(views):
        stop = start + 1
        while stop < len(views) and views[stop].shape == views[start].shape:
            stop += 1
        group = views[start:stop]
        y = encoder(torch.cat(group) if len(group) > 1 else group[0])
        out.extend(y.chunk(len(group)) if len(group) > 1 else [y])
        start = stop
    return out
