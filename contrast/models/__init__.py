"""Pretraining methods and their building blocks.

``build_method(args, num_instances)`` maps the command-line flags to a method:

=========  ==========================================================================
model      flags used (besides ``arch``, ``stem``, ``mlp_head``, ``feature_dim``)
=========  ==========================================================================
PIC        contrast_temperature, pic_num_negative; for the sampled classifier
           (pic_num_negative > 0) also pic_weight_correction, pic_storage,
           momentum, weight_decay, seed; aug == "MultiCrop" selects multi-crop
InstDisc   contrast_temperature, contrast_num_negative (K), contrast_momentum (bank
           momentum, 0.5 in the release), seed (bank init and negatives)
MoCo       contrast_temperature, contrast_num_negative (queue length),
           contrast_momentum (key encoder, 0.999), seed (queue init)
SimCLR     contrast_temperature; BatchNorm becomes SyncBatchNorm on several ranks
=========  ==========================================================================
"""
from __future__ import annotations

import os

from contrast.models.backbones import ARCHS, STEMS, build_backbone, stem_of
from contrast.models.base import BaseMethod
from contrast.models.heads import build_head
from contrast.models.instdisc import InstDisc
from contrast.models.moco import MoCo
from contrast.models.pic import PIC, DenseInstanceClassifier, build_instance_classifier
from contrast.models.simclr import SimCLR

METHODS = ("PIC", "InstDisc", "MoCo", "SimCLR")

__all__ = ["ARCHS", "METHODS", "STEMS", "BaseMethod", "DenseInstanceClassifier", "InstDisc", "MoCo", "PIC", "SimCLR",
           "build_backbone", "build_head", "build_instance_classifier", "build_method", "num_views_for",
           "stem_of"]


def num_views_for(model: str, aug: str, num_crop2: int = 3) -> int:
    """Views per image: 1 + ``num_crop2`` for ``--aug MultiCrop``, 2 for MoCo and SimCLR, else 1."""
    if aug == "MultiCrop":
        return 1 + num_crop2
    return 2 if model in ("MoCo", "SimCLR") else 1


def build_method(args, num_instances: int) -> BaseMethod:
    """Build the method named by ``args.model`` for a training set of ``num_instances`` images."""
    if args.model not in METHODS:
        raise ValueError(f"--model {args.model!r} is not supported; choose one of: {', '.join(METHODS)}")
    backbone, feat_dim = build_backbone(args.arch, stem=stem_of(args))
    common = dict(backbone=backbone, feat_dim=feat_dim, feature_dim=args.feature_dim, mlp_head=args.mlp_head,
                  temperature=args.contrast_temperature)
    if args.model == "PIC":
        classifier = build_instance_classifier(
            num_instances, args.feature_dim, args.contrast_temperature,
            num_negative=getattr(args, "pic_num_negative", 0),
            momentum=getattr(args, "momentum", 0.9), weight_decay=getattr(args, "weight_decay", 1e-4),
            weight_correction=getattr(args, "pic_weight_correction", True),
            storage=getattr(args, "pic_storage", "memory"), storage_dir=_pic_storage_dir(args),
            seed=getattr(args, "seed", 0))
        return PIC(num_instances=num_instances, multi_crop=getattr(args, "aug", None) == "MultiCrop",
                   classifier=classifier, **common)
    if args.model == "InstDisc":
        return InstDisc(num_instances=num_instances, num_negative=args.contrast_num_negative,
                        bank_momentum=args.contrast_momentum, seed=getattr(args, "seed", 0), **common)
    if args.model == "MoCo":
        return MoCo(num_negative=args.contrast_num_negative, momentum=args.contrast_momentum,
                    seed=getattr(args, "seed", 0), **common)
    return SimCLR(**common)


def _pic_storage_dir(args) -> str | None:
    """``--pic-storage-dir``, else ``<output-dir>/pic_table`` (used by ``--pic-storage disk`` only)."""
    explicit = getattr(args, "pic_storage_dir", None)
    if explicit:
        return explicit
    out = getattr(args, "output_dir", None)
    return os.path.join(out, "pic_table") if out else None
