"""Command-line flags of the ViT backbones and of the evaluation feature (part of the command-line
layer with ``contrast/option.py``, which calls these groups)."""
from __future__ import annotations

import argparse

from contrast.config import BackboneConfig
from contrast.models.backbone_base import FEATURE_KINDS
from contrast.models.backbone_factory import recipe_for
from contrast.models.recipe import describe
from contrast.models.vit import GLOBAL_POOLS


def add_vit_flags(g) -> None:
    """Pretraining flags of the ViT backbones (ignored by ResNets). ``--drop-path``, ``--global-pool``
    and ``--freeze-patch-embed`` are recipe fields (their defaults are the method's ViT recipe)."""
    g.add_argument("--patch-size", type=int, default=16, help="(new) ViT patch side in pixels (4 for 32 px images); "
                   "--image-size sets the position-embedding grid, other sizes are interpolated")
    g.add_argument("--drop-path", type=float, default=0.0, help="(new) ViT stochastic-depth rate")
    g.add_argument("--global-pool", type=str, default="token", choices=list(GLOBAL_POOLS),
                   help="(new) the ViT feature a method sees: token = CLS token, avg = mean of the patch tokens")
    g.add_argument("--freeze-patch-embed", action=argparse.BooleanOptionalAction, default=False,
                   help="(new) keep the ViT's random patch projection fixed (MoCo v3)")


def add_eval_feature_flag(p: argparse.ArgumentParser, name: str = "--linear-feature") -> None:
    p.add_argument(name, type=str, default=None, choices=list(FEATURE_KINDS),
                   help="(new) backbone feature to classify: pooled = what the method trained on; ViT: cls, "
                        "avgpool, cls4 = CLS tokens of the last 4 blocks (DINO, ViT-S), cls+avgpool (DINO, "
                        "ViT-B) (default: cls for a ViT, pooled for a ResNet)")


def backbone_config(args: argparse.Namespace) -> BackboneConfig:
    """The :class:`BackboneConfig` of parsed pretraining flags."""
    return BackboneConfig(args.arch, args.stem, args.zero_init_residual, image_size=args.image_size,
                          patch_size=args.patch_size, drop_path=args.drop_path, global_pool=args.global_pool,
                          freeze_patch_embed=bool(args.freeze_patch_embed))


def recipe_of(p: argparse.ArgumentParser, cls, arch: str):
    """The recipe of the method class ``cls`` for the family of ``--arch arch`` (a usage error if it has none)."""
    try:
        return recipe_for(cls, arch)
    except ValueError as e:
        p.error(str(e))


def vit_recipe_note(cls) -> str:
    """``--help``: the method class's ViT recipe where it differs from its ResNet recipe."""
    if cls.vit_recipe is None:
        return "no ViT recipe (--arch vit_* is refused)"
    return f"on a ViT: {describe(cls.vit_recipe, cls.recipe)}"
