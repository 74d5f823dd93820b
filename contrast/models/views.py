"""What a method asks of the data (its views) and how it encodes several views.

A method class declares :class:`Views`: how many full-size views per image it trains on and
whether it takes multi-crop (``--aug MultiCrop`` adds ``--num-crop2`` small crops after the large
ones; which augmentation it uses is its :class:`~contrast.models.recipe.Recipe`'s). :func:`encode_views` runs an encoder over a
list of views, either one forward pass per view (``separate``: every view is its own batch-norm
batch, as in the PIC release) or with equal-sized views concatenated (``joint``: SimCLR's and
SwAV's reference code).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List

import torch

MULTI_CROP_AUG = "MultiCrop"
#: Every ``--aug`` of large + ``--num-crop2`` small crops (``BYOLMultiCrop``: the same crops, BYOL's colours).
MULTI_CROP_AUGS = (MULTI_CROP_AUG, "BYOLMultiCrop")


@dataclass(frozen=True)
class Views:
    """A method's views per image.

    Attributes:
        count: full-size views per image (1 for PIC and InstDisc, 2 for the two-view methods).
        multi_crop: whether ``--aug MultiCrop`` (``count`` large + ``num_crop2`` small crops) is accepted.
    """

    count: int
    multi_crop: bool = False

    def total(self, aug: str, num_crop2: int) -> int:
        """Views per image under ``--aug aug``: ``count``, plus ``num_crop2`` small crops with MultiCrop."""
        return self.count + (num_crop2 if aug in MULTI_CROP_AUGS else 0)


def encode_views(encoder: Callable[[torch.Tensor], torch.Tensor], views: List[torch.Tensor],
                 batching: str = "separate") -> List[torch.Tensor]:
    """Apply ``encoder`` to each (B, 3, H, W) view; returns one (B, ...) output per view, in order.

    ``batching="separate"``: one call per view. ``"joint"``: consecutive views of equal shape go
    through the encoder as one concatenated batch (batch-norm statistics then cover all of them).
    """
    if batching == "separate":
        return [encoder(v) for v in views]
    if batching != "joint":
        raise ValueError(f"--view-batching must be 'separate' or 'joint', got {batching!r}")
    out: List[torch.Tensor] = []
    start = 0
    while start < len(views):
        stop = start + 1
        while stop < len(views) and views[stop].shape == views[start].shape:
            stop += 1
        group = views[start:stop]
        y = encoder(torch.cat(group) if len(group) > 1 else group[0])
        out.extend(y.chunk(len(group)) if len(group) > 1 else [y])
        start = stop
    return out
