"""Backbones: torchvision ResNets (and the release's ResNet-D) with the classifier removed.

``build_backbone(arch)`` returns ``torchvision.models.<arch>(weights=None)`` with
``fc = nn.Identity()``, so the backbone maps images (B, 3, H, W) to pooled
features (B, feat_dim) and its state dict loads into a plain torchvision model
(whose ``fc`` was removed) with ``strict=True``.

``zero_init_residual`` (default True, as the PIC release) zeroes the gamma of the
last BatchNorm of every residual block (``bn2`` of a BasicBlock, ``bn3`` of a
Bottleneck), so each block starts as the identity (Goyal et al. 2017, "Accurate,
Large Minibatch SGD"); the downsample BatchNorms keep gamma 1.

ResNet-D (``resnet18_d`` ... ``resnet152_d``; He et al. 2019, "Bag of Tricks for
Image Classification", ResNet-D) is the release's variant, built from torchvision's
``ResNet``/``BasicBlock``/``Bottleneck`` so every other name stays torchvision's:

* ``conv1`` is a deep stem ``Sequential(Sequential(conv3x3(3, 32, stride 2), BN, ReLU),
  Sequential(conv3x3(32, 32), BN, ReLU), conv3x3(32, 64))``, followed as usual by
  ``bn1``, ReLU and the 3x3 stride-2 max-pool (keys ``conv1.0.0.weight``,
  ``conv1.0.1.*``, ``conv1.1.0.weight``, ``conv1.1.1.*``, ``conv1.2.weight``);
* the projection shortcut of a block with stride s is ``Sequential(AvgPool2d(s),
  conv1x1 stride 1, BN)`` (keys ``downsample.1.weight``, ``downsample.2.*``); with
  s = 1 (``layer1`` of a Bottleneck ResNet) the pool is ``nn.Identity``. The block's
  own stride sits where torchvision puts it (the 3x3 conv), as in the release.

The release pools with ``AvgPool2d(s, s)`` (floor mode), which breaks the residual
sum when a stage's input side is odd (the strided 3x3 conv rounds up). Here the pool
uses ``ceil_mode=True, count_include_pad=False``: identical values wherever the
release runs (even sides) and the mean of the in-bounds pixels at an odd edge.

``stem`` (``--stem``, one of :data:`STEMS`) chooses the layers before ``layer1``
of the plain ResNets; the spatial size they leave for a 28 px / 224 px input is
given in brackets:

* ``"imagenet"``: torchvision's 7x7 stride-2 ``conv1`` and 3x3 stride-2
  ``maxpool`` (7 / 56 px).
* ``"small"``: the CIFAR stem of the SimCLR paper's CIFAR experiments, for 28-32 px
  images: a 3x3 stride-1 ``conv1`` and ``maxpool = nn.Identity()`` (28 / 224 px).
* ``"small-maxpool"``: the 3x3 stride-1 ``conv1`` with torchvision's ``maxpool``
  kept (14 / 112 px): a quarter of the cost of ``"small"``, twice the
  resolution of ``"imagenet"``.

A ResNet-D has its own deep stem and accepts only ``stem="imagenet"`` (its default
meaning: the release's stem, 7 / 56 px like torchvision's); a small stem is an error.

Parameter names are the same for every stem, but with a small stem
``conv1.weight`` is (64, 3, 3, 3) instead of (64, 3, 7, 7), so such a backbone
only loads into a torchvision ResNet given the same stem (:func:`set_stem`).
Configs written before ``--stem`` existed record the boolean ``small_stem``;
:func:`stem_of` reads both.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence, Tuple, Union

import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet, conv1x1, conv3x3

from contrast.models.backbone_base import Backbone

#: ResNet-D variants of the release: name -> (block, blocks per stage).
RESNET_D: Dict[str, Tuple[type, Tuple[int, int, int, int]]] = {
    "resnet18_d": (BasicBlock, (2, 2, 2, 2)),
    "resnet34_d": (BasicBlock, (3, 4, 6, 3)),
    "resnet50_d": (Bottleneck, (3, 4, 6, 3)),
    "resnet101_d": (Bottleneck, (3, 4, 23, 3)),
    "resnet152_d": (Bottleneck, (3, 8, 36, 3)),
}

ARCHS: Tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                          "wide_resnet50_2", "wide_resnet101_2") + tuple(RESNET_D)

#: torchvision's plain ResNets: name -> (block, blocks per stage, width per group), as ``torchvision.models.<name>``.
RESNETS: Dict[str, Tuple[type, Tuple[int, int, int, int], int]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 64),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 64),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 64),
    "resnet152": (Bottleneck, (3, 8, 36, 3), 64),
    "wide_resnet50_2": (Bottleneck, (3, 4, 6, 3), 128),
    "wide_resnet101_2": (Bottleneck, (3, 4, 23, 3), 128),
}

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


def _conv_bn_relu(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    return nn.Sequential(conv3x3(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes), nn.ReLU(inplace=True))


class ResNetBackbone(ResNet, Backbone):
    """A torchvision ``ResNet`` (same modules, names and initialisation as ``torchvision.models.<arch>``)
    with the backbone interface (``contrast/models/backbone_base.py``); ``fc`` is ``nn.Identity``
    after :func:`build_backbone`. Weight decay is left off biases and BatchNorm parameters."""

    family = "resnet"
    export_formats = ("torchvision", "d2")
    arch: str = ""
    stem: str = "imagenet"

    @property
    def verify_size(self) -> int:
        return 64 if self.stem == "imagenet" else 32

    @property
    def num_layers(self) -> int:
        return 4

    def layer_id(self, name: str) -> int:
        """Layer-wise lr decay by stage: the stem 0, ``layerK`` K (the classifier is layer 5)."""
        stage = name.split(".")[0]
        return int(stage[5:]) if stage in ("layer1", "layer2", "layer3", "layer4") else 0

    def reference_spec(self) -> Dict[str, Any]:
        if self.arch not in RESNETS:
            raise ValueError(f"{self.arch} is the release's ResNet-D, not a torchvision architecture; its backbone "
                             f"state dict (release key names) is the checkpoint's 'backbone.' tensors, and "
                             f"detectron2's ResNet has no ResNet-D stem")
        return {"library": "torchvision", "name": self.arch, "kwargs": {}, "stem": self.stem}

    def reference_model(self) -> nn.Module:
        spec = self.reference_spec()
        net = getattr(torchvision.models, spec["name"])(weights=None)
        net.fc = nn.Identity()
        return set_stem(net, self.stem)


class ResNetD(ResNetBackbone):
    """torchvision ``ResNet`` with the release's deep stem and average-pool shortcuts (module docstring).

    Initialisation is torchvision's (Kaiming-normal fan-out convolutions, BN gamma 1 and beta 0,
    optional zero-init of the last BN gamma per block), which is also the release's.
    """

    def __init__(self, block: type, layers: Sequence[int], num_classes: int = 1000,
                 zero_init_residual: bool = False) -> None:
        super().__init__(block, list(layers), num_classes=num_classes, zero_init_residual=zero_init_residual)
        self.conv1 = nn.Sequential(_conv_bn_relu(3, 32, 2), _conv_bn_relu(32, 32, 1), conv3x3(32, 64))
        for m in self.conv1.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        in_planes = self.inplanes
        layer = super()._make_layer(block, planes, blocks, stride, dilate)
        first = layer[0]
        if first.downsample is not None:
            out_planes = planes * block.expansion
            pool = nn.Identity() if stride == 1 else \
                nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
            first.downsample = nn.Sequential(pool, conv1x1(in_planes, out_planes), nn.BatchNorm2d(out_planes))
        return layer   # initialised by ResNet.__init__'s loop, which runs after every _make_layer


def resnet_d(arch: str, zero_init_residual: bool = False, num_classes: int = 1000) -> ResNetD:
    """The ResNet-D named ``arch`` (a key of :data:`RESNET_D`), with a ``num_classes`` classifier ``fc``."""
    if arch not in RESNET_D:
        raise ValueError(f"{arch!r} is not a ResNet-D; choose one of: {', '.join(RESNET_D)}")
    block, layers = RESNET_D[arch]
    return ResNetD(block, layers, num_classes=num_classes, zero_init_residual=zero_init_residual)


def build_backbone(arch: str, stem: str = "imagenet", zero_init_residual: bool = True) -> Tuple[nn.Module, int]:
    """Return ``(backbone, feat_dim)`` for the ResNet named ``arch`` (``--arch``, one of :data:`ARCHS`)
    with the stem ``stem`` (``--stem``, one of :data:`STEMS`; ResNet-D: ``"imagenet"`` only).

    ``zero_init_residual`` zeroes the last BN gamma of every residual block (the release does).
    ``feat_dim`` is the width of the pooled feature: 512 for ResNet-18/34 (and their -D), 2048
    for the others.
    """
    if arch not in ARCHS:
        raise ValueError(f"--arch {arch!r} is not supported; choose one of: {', '.join(ARCHS)}")
    check_stem(stem)
    if arch in RESNET_D:
        if stem != "imagenet":
            raise ValueError(f"--stem {stem!r} cannot be combined with --arch {arch}: a ResNet-D has the "
                             f"release's deep 3x3 stem (stride 2 + max-pool); use --stem imagenet or a plain ResNet")
        net = resnet_d(arch, zero_init_residual=zero_init_residual)
    else:
        block, layers, width = RESNETS[arch]   # torchvision.models.<arch>(weights=None), same draws
        net = ResNetBackbone(block, list(layers), width_per_group=width, zero_init_residual=zero_init_residual)
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    net.arch, net.stem, net.feat_dim = arch, stem, feat_dim
    set_stem(net, stem)
    return net, feat_dim

