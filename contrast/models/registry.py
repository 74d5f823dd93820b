"""The method registry: ``--model`` names to method classes.

Adding a method is one file with its class and one :func:`register` call: ``option.py`` builds the
``--model`` choices, each method's recipe, its own flags and ``--help`` group from the registered
classes; :func:`build_method` constructs one from its configuration; checkpoints of older formats
are migrated through the class's ``migrate_state`` (entered into :mod:`contrast.state_migrations`
here, because ``contrast/checkpoint/`` may not import the methods).
"""
from __future__ import annotations

from typing import Dict, Type

from contrast import state_migrations
from contrast.config import MethodConfig
from contrast.models.barlow_twins import BarlowTwins
from contrast.models.base import BaseMethod
from contrast.models.byol import BYOL
from contrast.models.dino import DINO
from contrast.models.instdisc import InstDisc
from contrast.models.moco import MoCo, MoCoV2
from contrast.models.nnclr import NNCLR
from contrast.models.mocov3 import MoCov3
from contrast.models.pic import PIC
from contrast.models.simclr import SimCLR
from contrast.models.simsiam import SimSiam
from contrast.models.swav import SwAV
from contrast.models.vicreg import VICReg

METHODS: Dict[str, Type[BaseMethod]] = {}


def register(cls: Type[BaseMethod]) -> Type[BaseMethod]:
    """Register ``cls`` under ``cls.name`` (usable as a class decorator); returns ``cls``."""
    if not (isinstance(cls, type) and issubclass(cls, BaseMethod)) or not cls.name:
        raise ValueError(f"register: {cls!r} is not a BaseMethod subclass with a name")
    if METHODS.get(cls.name, cls) is not cls:
        raise ValueError(f"register: --model {cls.name} is already {METHODS[cls.name].__module__}."
                         f"{METHODS[cls.name].__qualname__}")
    METHODS[cls.name] = cls
    state_migrations.register(cls.name, cls.migrate_state)
    return cls


def unregister(name: str) -> None:
    """Remove the method ``name`` (tests that register a method for a while)."""
    METHODS.pop(name, None)
    state_migrations.unregister(name)


register(PIC)
register(InstDisc)
register(MoCo)
register(MoCoV2)
register(SimCLR)
register(BYOL)
register(SwAV)
register(MoCov3)
register(SimSiam)
register(BarlowTwins)
register(VICReg)
register(DINO)
register(NNCLR)


def method_class(name: str) -> Type[BaseMethod]:
    """The class registered as ``name``; ``ValueError`` listing the choices otherwise."""
    if name not in METHODS:
        raise ValueError(f"--model {name!r} is not supported; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def build_method(cfg: MethodConfig, num_instances: int) -> BaseMethod:
    """The method ``cfg.name`` for a training set of ``num_instances`` images (after its checks)."""
    cls = method_class(cfg.name)
    if cfg.multi_crop and not cls.views.multi_crop:
        raise ValueError(f"--model {cfg.name} does not take --aug MultiCrop")
    cls.check_config(cfg)
    return cls.from_config(cfg, num_instances)
