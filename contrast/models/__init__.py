"""Pretraining methods and their building blocks (see ``docs/design.md``, "Methods").

* :mod:`~contrast.models.registry`: ``METHODS`` (``--model`` name -> class), ``register`` and ``build_method``.
* :mod:`~contrast.models.base`: ``TrainModule`` (the loop's hooks) and ``BaseMethod``.
* :mod:`~contrast.models.recipe`: ``Recipe``, the published recipe every method class declares.
* shared pieces: backbones, heads, pure losses, views/multi-crop encoding, momentum encoders,
  feature queues, PIC's instance classifiers.
"""
from contrast.models.backbones import ARCHS, STEMS, build_backbone, stem_of
from contrast.models.backbone_base import FEATURE_KINDS, FeatureExtractor
from contrast.models.backbone_factory import BACKBONE_ARCHS, backbone_config_of, make_backbone, recipe_for
from contrast.models.base import BaseMethod, TrainModule
from contrast.models.heads import build_head
from contrast.models.instdisc import InstDisc
from contrast.models.moco import MoCo, MoCoV2
from contrast.models.pic import PIC, DenseInstanceClassifier, build_instance_classifier
from contrast.models.recipe import Recipe
from contrast.models.registry import METHODS, build_method, method_class, register, unregister
from contrast.models.simclr import SimCLR
from contrast.models.views import Views, encode_views

__all__ = ["ARCHS", "BACKBONE_ARCHS", "FEATURE_KINDS", "FeatureExtractor", "backbone_config_of", "make_backbone",
           "recipe_for", "METHODS", "STEMS", "BaseMethod", "DenseInstanceClassifier", "InstDisc", "MoCo", "MoCoV2",
           "PIC", "Recipe", "SimCLR", "TrainModule", "Views", "build_backbone", "build_head",
           "build_instance_classifier", "build_method", "encode_views", "method_class", "register", "stem_of",
           "unregister"]
