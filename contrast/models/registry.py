"""The method registry: ``--model`` names to method classes. Adding a method is one line here.

``option.py`` builds the ``--model`` choices, the per-method flag defaults and each method's own
flags from these classes; :func:`build_method` constructs one from its configuration.
"""
from __future__ import annotations

from typing import Dict, Type

from contrast.config import MethodConfig
from contrast.models.base import BaseMethod
from contrast.models.byol import BYOL
from contrast.models.instdisc import InstDisc
from contrast.models.moco import MoCo
from contrast.models.pic import PIC
from contrast.models.simclr import SimCLR
from contrast.models.swav import SwAV

METHODS: Dict[str, Type[BaseMethod]] = {cls.name: cls for cls in (
    PIC,
    InstDisc,
    MoCo,
    SimCLR,
    BYOL,
    SwAV,
)}


def method_class(name: str) -> Type[BaseMethod]:
    """The class registered as ``name``; ``ValueError`` listing the choices otherwise."""
    if name not in METHODS:
        raise ValueError(f"--model {name!r} is not supported; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def build_method(cfg: MethodConfig, num_instances: int) -> BaseMethod:
    """The method ``cfg.name`` for a training set of ``num_instances`` images."""
    cls = method_class(cfg.name)
    if cfg.multi_crop and not cls.views.multi_crop:
        raise ValueError(f"--model {cfg.name} does not take --aug MultiCrop")
    return cls.from_config(cfg, num_instances)
