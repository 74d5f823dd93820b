"""Backbones: torchvision ResNets with the classifier removed.

``build_backbone(arch)`` returns ``torchvision.models.<arch>(weights=None)`` with
``fc = nn.Identity()``, so the backbone maps images (B, 3, H, W) to pooled
features (B, feat_dim) and its state dict loads into a plain torchvision model
(whose ``fc`` was removed) with ``strict=True``.

``stem`` (``--stem``, one of :data:`STEMS`) chooses the layers before ``layer1``;
the spatial size they leave for a 28 px / 224 px input is given in brackets:

* ``"imagenet"``: torchvision's 7x7 stride-2 ``conv1`` and 3x3 stride-2
  ``maxpool`` (7 / 56 px).
* ``"small"``: the CIFAR stem of the SimCLR paper's CIFAR experiments, for 28-32 px
  images: a 3x3 stride-1 ``conv1`` and ``maxpool = nn.Identity()`` (28 / 224 px).
* ``"small-maxpool"``: the 3x3 stride-1 ``conv1`` with torchvision's ``maxpool``
  kept (14 / 112 px): a quarter of the cost of ``"small"``, twice the
  resolution of ``"imagenet"``.

Parameter names are the same for every stem, but with a small stem
``conv1.weight`` is (64, 3, 3, 3) instead of (64, 3, 7, 7), so such a backbone
only loads into a torchvision ResNet given the same stem (:func:`set_stem`).
Configs written before ``--stem`` existed record the boolean ``small_stem``;
:func:`stem_of` reads both.
"""
from __future__ import annotations

from typing import Any, Mapping, Tuple, Union

import torchvision
from torch import nn

ARCHS: Tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                          "wide_resnet50_2", "wide_resnet101_2")

#: Stems (``--stem``); see the module docstring.
STEMS: Tuple[str, ...] = ("imagenet", "small", "small-maxpool")


def check_stem(stem: str) -> str:
    """``stem`` itself; ``ValueError`` naming the valid choices when it is not one of :data:`STEMS`."""
    if stem not in STEMS:
        raise ValueError(f"--stem {stem!r} is not supported; choose one of: {', '.join(STEMS)}")
    return stem


def set_stem(net: nn.Module, stem: str) -> nn.Module:
    """Give a torchvision ResNet ``net`` the stem ``stem`` (in place; returns ``net``).

    A small stem's new 3x3 ``conv1`` gets torchvision's Kaiming initialisation;
    ``"imagenet"`` leaves ``net`` as it is.
    """
    check_stem(stem)
    if stem.startswith("small"):
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    if stem == "small":
        net.maxpool = nn.Identity()
    return net


def stem_of(config: Union[Mapping[str, Any], Any, None]) -> str:
    """The stem a run's ``config`` (a checkpoint's ``config`` dict or an ``argparse.Namespace``) records.

    Its ``stem``; for configs written before ``--stem`` existed, the boolean
    ``small_stem`` (True -> ``"small"``, False or absent -> ``"imagenet"``).
    """
    if config is None:
        config = {}
    elif not isinstance(config, Mapping):
        config = vars(config)
    stem = config.get("stem")
    if stem is None:
        stem = "small" if config.get("small_stem") else "imagenet"
    return stem


def build_backbone(arch: str, stem: str = "imagenet") -> Tuple[nn.Module, int]:
    """Return ``(backbone, feat_dim)`` for a torchvision ResNet named ``arch`` (``--arch``)
    with the stem ``stem`` (``--stem``, one of :data:`STEMS`).

    ``feat_dim`` is the width of the pooled feature: 512 for ResNet-18/34, 2048
    for the others.
    """
    if arch not in ARCHS:
        raise ValueError(f"--arch {arch!r} is not supported; choose one of: {', '.join(ARCHS)}")
    check_stem(stem)
    net = getattr(torchvision.models, arch)(weights=None)
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    set_stem(net, stem)
    return net, feat_dim

