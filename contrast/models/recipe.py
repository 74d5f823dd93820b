"""A method's published recipe: every value its official code or script fixes, declared on the class.

:class:`Recipe` holds the defaults a method gives the shared pretraining flags (field name = flag
dest: ``--base-learning-rate`` is ``base_learning_rate``), plus what is not a flag (batch norm over
the global batch, the warm-up rule). :func:`resolve` fills the flags a user did not give from the
recipe: a flag given on the command line always wins. ``docs/methods.md`` cites the source of every
value. A method whose own flags take other values in its ViT recipe subclasses :class:`Recipe` with
fields named as those flags' dests (the flags' default is None); they are resolved as the shared ones.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Dict, Mapping, Optional, Tuple

#: ``--lr-scaling``: how the peak lr follows the total batch B (SimCLR's ``learning_rate_scaling``).
LR_SCALINGS = ("linear", "sqrt")


@dataclass(frozen=True)
class Recipe:
    """A method's pretraining recipe (see the module docstring); the base values are the release's
    ``option.py`` defaults."""

    # views and augmentation (the number of views is the class's ``Views``)
    aug: str = "NULL"
    crop: float = 0.2
    image_size: int = 224
    image_size2: int = 96
    crop2: float = 0.14
    num_crop2: int = 3
    # data schedule
    use_sliding_window_sampler: bool = False
    window_size: int = 131072
    window_stride: int = 16384
    shuffle_per_epoch: bool = False
    # embedding, loss and momentum
    feature_dim: int = 128
    mlp_head: bool = False
    mlp_hidden_dim: int = 2048
    contrast_temperature: float = 0.07
    contrast_momentum: float = 0.999
    contrast_num_negative: int = 65536
    view_batching: str = "separate"
    # optimiser and lr schedule
    optimizer: str = "sgd"
    base_learning_rate: float = 0.03
    lr_scaling: str = "linear"
    weight_decay: float = 1e-4
    #: None: constant weight decay; else cosine from ``weight_decay`` to this over the run (DINO)
    weight_decay_end: Optional[float] = None
    #: > 0: each parameter's gradient norm clipped to this before the step (DINO); 0: off
    clip_grad: float = 0.0
    momentum: float = 0.9
    lr_scheduler: str = "cosine"
    warmup_epoch: int = 5
    warmup_multiplier: float = 100.0
    lr_decay_epochs: Tuple[int, ...] = (120, 160, 200)
    lr_decay_rate: float = 0.1
    # backbone (ViTs; docs/backbones.md)
    drop_path: float = 0.0
    global_pool: str = "token"
    freeze_patch_embed: bool = False
    # not flags
    #: > 0: the default ``--warmup-epoch`` is ``--epochs // warmup_divisor`` (the release's scripts: 40)
    warmup_divisor: int = 0
    #: batch norm over the global batch when distributed (the loop converts the model)
    sync_batchnorm: bool = False

    def __post_init__(self) -> None:
        if self.lr_scaling not in LR_SCALINGS:
            raise ValueError(f"Recipe.lr_scaling must be one of {LR_SCALINGS}, got {self.lr_scaling!r}")
        if self.warmup_divisor < 0:
            raise ValueError(f"Recipe.warmup_divisor must be >= 0, got {self.warmup_divisor}")
        if self.clip_grad < 0 or (self.weight_decay_end is not None and self.weight_decay_end < 0):
            raise ValueError(f"Recipe.clip_grad and weight_decay_end must be >= 0, got {self.clip_grad}, "
                             f"{self.weight_decay_end}")

    def flag_values(self) -> Dict[str, Any]:
        """The values of the shared flags (every field but :data:`NOT_FLAGS`), lists as argparse gives them."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k not in NOT_FLAGS}


#: Recipe fields that are not command-line flags.
NOT_FLAGS = ("warmup_divisor", "sync_batchnorm")
#: Flag dests the recipe fills (``None`` at parse time means "not given").
FLAG_FIELDS = tuple(f.name for f in fields(Recipe) if f.name not in NOT_FLAGS)


def resolve(recipe: Recipe, given: Mapping[str, Any], epochs: int) -> Dict[str, Any]:
    """Every flag of :data:`FLAG_FIELDS`: ``given[k]`` unless it is None, else the recipe's value;
    ``warmup_epoch`` from the recipe's warm-up rule for ``epochs`` when the recipe has one; with
    ``image_size`` given and ``image_size2`` not, the small crops keep the recipe's ratio to the large
    ones (DINO's 224 + 96 at 32 px: 32 + 14), so a small-image run does not get 96 px "small" crops."""
    out = recipe.flag_values()
    if recipe.warmup_divisor:
        out["warmup_epoch"] = epochs // recipe.warmup_divisor
    if given.get("image_size") is not None and given.get("image_size2") is None and "image_size2" in out:
        out["image_size2"] = max(1, round(recipe.image_size2 * given["image_size"] / recipe.image_size))
    out.update({k: v for k, v in given.items() if k in out and v is not None})
    return out


def peak_lr(base_lr: float, total_batch: int, scaling: str) -> float:
    """The schedule's peak lr: ``base x B / 256`` (linear) or ``base x sqrt(B)`` (sqrt, SimCLR's)."""
    if scaling == "linear":
        return base_lr * total_batch / 256
    if scaling == "sqrt":
        return base_lr * math.sqrt(total_batch)
    raise ValueError(f"--lr-scaling must be one of {LR_SCALINGS}, got {scaling!r}")


def describe(recipe: Recipe, base: Recipe = Recipe()) -> str:
    """The recipe as command-line flags, only where it differs from ``base`` (for ``--help``)."""
    parts = []
    for f in fields(recipe):
        value, default = getattr(recipe, f.name), getattr(base, f.name, None)
        if value == default:
            continue
        if f.name == "warmup_divisor":
            parts += [f"--warmup-epoch = --epochs // {value}"] if value else []
        elif f.name == "sync_batchnorm":
            parts.append("batch norm over all processes" if value else "batch norm per process")
        elif isinstance(value, bool):
            parts.append(f"--{'' if value else 'no-'}{f.name.replace('_', '-')}")
        else:
            shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
            parts.append(f"--{f.name.replace('_', '-')} {shown}")
    return " ".join(parts) if parts else "the defaults"


#: The AdamW recipe of the ViT runs of MoCo v3 (CONFIG.md, ViT-Small: --optimizer=adamw --lr=1.5e-4
#: --weight-decay=.1 --warmup-epochs=40, lr x batch / 256, cosine): what a method without a published
#: ViT recipe trains a ViT with; warm-up from (almost) 0 as MoCo v3 and DINO.
VIT_OPTIMIZER = dict(optimizer="adamw", base_learning_rate=1.5e-4, lr_scaling="linear", weight_decay=0.1,
                     lr_scheduler="cosine", warmup_epoch=40, warmup_multiplier=1e6, warmup_divisor=0)


def vit_recipe_of(recipe: Recipe, **changes: Any) -> Recipe:
    """``recipe`` with :data:`VIT_OPTIMIZER` and ``changes``: the ViT recipe of a method whose
    official code publishes none (its loss, views, temperature and momentum are kept)."""
    return replace(recipe, **{**VIT_OPTIMIZER, **changes})


__all__ = ["FLAG_FIELDS", "LR_SCALINGS", "NOT_FLAGS", "Recipe", "VIT_OPTIMIZER", "describe", "peak_lr", "replace",
           "resolve", "vit_recipe_of"]
