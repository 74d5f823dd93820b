"""Backbone families and the one builder: ``--arch`` -> family -> backbone and recipe.

A family (:data:`FAMILIES`) names its ``--arch`` values, builds a backbone from a
:class:`~contrast.config.BackboneConfig` and says which recipe of a method class it trains with
(``recipe`` for the ResNets, ``vit_recipe`` for the ViTs). Callers never ask for the family by
name: they call :func:`make_backbone` and :func:`recipe_for` (or look the family's row up in a
table with :func:`family_name`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Tuple

from torch import nn

from contrast.config import BackboneConfig
from contrast.models.backbones import ARCHS as RESNET_ARCHS, build_backbone, stem_of
from contrast.models.recipe import Recipe
from contrast.models.vit import VIT_ARCHS, build_vit


@dataclass(frozen=True)
class Family:
    name: str
    archs: Tuple[str, ...]
    build: Callable[[BackboneConfig], nn.Module]
    #: the method-class attribute holding the recipe for this family
    recipe_attr: str


def _resnet(cfg: BackboneConfig) -> nn.Module:
    return build_backbone(cfg.arch, stem=cfg.stem, zero_init_residual=cfg.zero_init_residual)[0]


FAMILIES: Tuple[Family, ...] = (Family("resnet", RESNET_ARCHS, _resnet, "recipe"),
                                Family("vit", tuple(VIT_ARCHS), build_vit, "vit_recipe"))
#: Every ``--arch`` value.
BACKBONE_ARCHS: Tuple[str, ...] = tuple(a for f in FAMILIES for a in f.archs)


def family_of(arch: str) -> Family:
    for family in FAMILIES:
        if arch in family.archs:
            return family
    raise ValueError(f"--arch {arch!r} is not supported; choose one of: {', '.join(BACKBONE_ARCHS)}")


def family_name(arch: str) -> str:
    """The name of the family of ``arch`` (a key of per-family tables such as main_linear's protocols)."""
    return family_of(arch).name


#: Every family name.
FAMILY_NAMES: Tuple[str, ...] = tuple(f.name for f in FAMILIES)


def make_backbone(cfg: BackboneConfig) -> nn.Module:
    """The backbone ``cfg`` describes (with ``feat_dim`` and the interface of ``backbone_base.py``)."""
    return family_of(cfg.arch).build(cfg)


def recipe_for(cls: Any, arch: str) -> Recipe:
    """The recipe the method class ``cls`` declares for the family of ``arch``; ``ValueError`` if none."""
    family = family_of(arch)
    recipe = getattr(cls, family.recipe_attr)
    if recipe is None:
        raise ValueError(f"--model {cls.name} declares no recipe for --arch {arch} ({family.name} backbones: "
                         f"set {family.recipe_attr} on its class)")
    return recipe


def backbone_config_of(config: Mapping[str, Any], **given: Any) -> BackboneConfig:
    """The :class:`BackboneConfig` a run's flat ``config`` records (older configs: the defaults),
    with the non-None ``given`` values (``arch``, ``stem``, ...) taking precedence."""
    default = BackboneConfig()
    values: Dict[str, Any] = {name: config.get(name, getattr(default, name))
                              for name in BackboneConfig.__dataclass_fields__}
    values["stem"] = stem_of(config)
    values.update({k: v for k, v in given.items() if v is not None})
    for name in ("image_size", "patch_size"):
        values[name] = int(values[name])
    return BackboneConfig(**values)
