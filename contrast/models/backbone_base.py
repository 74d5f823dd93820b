"""The interface every backbone family implements (ResNets in ``backbones.py``, ViTs in ``vit.py``).

A method, an evaluation or a tool only uses these members, so none of them asks which family a
backbone belongs to (``tests/test_backbone_interface.py`` greps for such branching):

* ``forward(x)``: (B, 3, H, W) images -> (B, ``feat_dim``) pooled features, the feature a method sees
  (a ResNet's global average pool; a ViT's CLS token or mean of patch tokens, ``--global-pool``);
* ``feat_dim``: the width of that feature;
* ``features(x, kind)`` / ``feature_dim(kind)``: evaluation features, ``kind`` one of
  ``feature_kinds`` (``"pooled"`` is ``forward``; a ViT adds ``"cls"``, ``"cls4"``, ``"avgpool"``,
  ``"cls+avgpool"``); ``eval_feature`` is the kind kNN and linear evaluation take by default;
* ``no_weight_decay()``: names of the parameters AdamW leaves undecayed;
* ``num_layers`` / ``layer_id(name)``: the depth of layer-wise lr decay (fine-tuning): a parameter's
  layer, 0 (the input layers) to ``num_layers + 1`` (the top: final norm; the classifier is there);
* ``prefers_bf16``: ``--amp-opt-level auto`` picks bf16 autocast on a CUDA device that has it;
* ``reference_model()`` / ``reference_spec()``: the plain library model (torchvision, timm) that
  loads ``state_dict()`` with ``strict=True`` and computes the same ``forward``, for the export tool;
  ``export_formats`` the formats ``tools/export_backbone.py`` writes, ``verify_size`` the image side
  of its check.
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, Set, Tuple

import torch
from torch import nn

#: Every evaluation feature kind of any family (``--linear-feature`` choices).
FEATURE_KINDS = ("pooled", "cls", "avgpool", "cls4", "cls+avgpool")


class Backbone:
    """Mixin of the backbone interface (see the module docstring); subclasses are ``nn.Module``s."""

    family: ClassVar[str] = ""
    feature_kinds: ClassVar[Tuple[str, ...]] = ("pooled",)
    eval_feature: ClassVar[str] = "pooled"
    prefers_bf16: ClassVar[bool] = False
    export_formats: ClassVar[Tuple[str, ...]] = ()
    verify_size: int = 64
    feat_dim: int

    def check_feature(self, kind: str) -> str:
        if kind not in self.feature_kinds:
            raise ValueError(f"feature {kind!r} is not available for a {self.family} backbone; choose one of: "
                             f"{', '.join(self.feature_kinds)}")
        return kind

    def features(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """The evaluation feature ``kind`` of images ``x`` (``"pooled"``: ``forward``)."""
        self.check_feature(kind)
        return self(x)

    def feature_dim(self, kind: str) -> int:
        self.check_feature(kind)
        return self.feat_dim

    def no_weight_decay(self) -> Set[str]:
        """Names (as in ``named_parameters``) of the parameters excluded from weight decay."""
        return {name for name, p in self.named_parameters() if p.ndim < 2}

    @property
    def num_layers(self) -> int:
        """Layers between the input (layer 0) and the top (``num_layers + 1``); 0: one layer."""
        return 0

    def layer_id(self, name: str) -> int:
        """The layer of parameter ``name`` (as in ``named_parameters``) for layer-wise lr decay
        (default: all at the top, so layer decay leaves them alone)."""
        return self.num_layers + 1

    def reference_spec(self) -> Dict[str, Any]:
        """How to build :meth:`reference_model`: ``{"library", "name", "kwargs"}``."""
        raise NotImplementedError

    def reference_model(self) -> nn.Module:
        """A fresh plain library model that loads this backbone's ``state_dict()`` strictly."""
        raise NotImplementedError


class FeatureExtractor(nn.Module):
    """``backbone.features(x, kind)`` as a module (evaluation feature extraction)."""

    def __init__(self, backbone: nn.Module, kind: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.kind = backbone.check_feature(kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.features(x, self.kind)
