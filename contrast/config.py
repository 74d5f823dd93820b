"""Typed configuration values passed from the entry scripts down to the layers below.

``contrast.option`` is the only module that parses the command line; it turns the parsed flags
into these small frozen objects, so models, data and evaluation never see an argparse
``Namespace``. A method declares its own command-line flags as :class:`Flag` values (plain
data: ``contrast.option`` turns them into argparse arguments), and receives their parsed values
in :attr:`MethodConfig.options`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple

#: How a method encodes several views: ``separate`` = one forward pass per view (each view is
#: its own batch-norm batch, as the PIC release does), ``joint`` = views of equal size concatenated
#: into one batch (SimCLR's and SwAV's reference code).
VIEW_BATCHING = ("separate", "joint")


@dataclass(frozen=True)
class Flag:
    """A method-specific command-line flag, declared by the method class.

    ``type`` is ``int``, ``float``, ``str`` or ``bool`` (``bool`` gives ``--x / --no-x``).
    The parsed value reaches the method as ``MethodConfig.options[dest]``, ``dest`` being the
    flag name without the leading dashes, with ``-`` replaced by ``_``.
    """

    name: str
    type: type
    default: Any
    help: str
    choices: Optional[Tuple[Any, ...]] = None
    nargs: Optional[str] = None

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class BackboneConfig:
    """``--arch``, ``--stem`` and the initialisation of the backbone; the ViT options (``--patch-size``,
    ``--image-size``, ``--drop-path``, ``--global-pool``, ``--freeze-patch-embed``; ResNets ignore them)."""

    arch: str = "resnet50"
    stem: str = "imagenet"
    zero_init_residual: bool = True
    image_size: int = 224
    patch_size: int = 16
    drop_path: float = 0.0
    global_pool: str = "token"
    freeze_patch_embed: bool = False


@dataclass(frozen=True)
class MethodConfig:
    """Everything a method is built from.

    ``temperature``, ``momentum`` and ``num_negative`` are the release's shared flags
    (``--contrast-temperature``, ``--contrast-momentum``, ``--contrast-num-negative``), already
    resolved to the method's own defaults when not given. ``options`` holds the values of the
    method's own :class:`Flag` declarations. ``num_crop`` is the number of full-size views per image:
    the large crops with multi-crop (``--num-crop``; the small crops follow them in the view list),
    otherwise the method's view count.
    ``optimizer_momentum`` / ``weight_decay`` are the optimiser's (the sampled PIC table runs its
    own SGD with them), ``peak_lr`` the schedule's peak (base lr x total batch / 256);
    ``total_batch_size``, ``window_size`` and ``window_stride`` describe the batches the method will
    see (window 0: no sliding window); ``output_dir`` is where a method may keep files (the sampled
    PIC table on disk).
    """

    name: str
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    feature_dim: int = 128
    mlp_head: bool = False
    head_hidden_dim: int = 2048
    temperature: float = 0.2
    momentum: float = 0.0
    num_negative: int = 65536
    view_batching: str = "separate"
    multi_crop: bool = False
    num_crop: int = 1
    seed: int = 0
    optimizer_momentum: float = 0.9
    weight_decay: float = 1e-4
    peak_lr: float = 0.0
    total_batch_size: int = 256
    window_size: int = 0
    window_stride: int = 0
    output_dir: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)

    def option(self, name: str) -> Any:
        """The value of the method flag ``name`` (its dest); ``KeyError`` names the missing flag."""
        try:
            return self.options[name]
        except KeyError:
            raise KeyError(f"method option {name!r} was not given to {self.name} (is its Flag declared?)") from None
