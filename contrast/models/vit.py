"""Vision Transformers from timm (Dosovitskiy et al. 2021) with the backbone interface.

``--arch`` names (:data:`VIT_ARCHS`) map to timm's models: ``vit_tiny`` (width 192, depth 12, 3
heads), ``vit_small`` (384, 12, 6), ``vit_base`` (768, 12, 12), and ``vit_pico`` (64, 2, 2), a
tiny configuration of ``vit_tiny_patch16_224`` for tests and CPU smoke runs. The patch size
(``--patch-size``, default 16; 4 for 32 px images) and the image size (``--image-size``) set the
position-embedding grid; ``dynamic_img_size`` interpolates it for any other input size, so the
small crops of multi-crop go through the same network. ``--drop-path`` is the stochastic-depth
rate, ``--global-pool`` the feature a method sees: ``token`` (the CLS token after the final norm,
MoCo v3, DINO) or ``avg`` (the mean of the patch tokens, then a norm: timm's ``fc_norm``).
``--freeze-patch-embed`` keeps the random patch projection fixed (MoCo v3's "stop-grad conv1",
Chen et al. 2021, Sec. 4.2: it removes the loss spikes of ViT training).

The state dict is timm's ``VisionTransformer`` with ``num_classes=0`` (no head keys): it loads with
``strict=True`` into ``timm.create_model(**reference_spec())``. Weight decay is left off biases,
norms, ``pos_embed`` and ``cls_token`` (timm's ``no_weight_decay``).

timm is imported on the first ViT built (importing it costs seconds of CPU that a ResNet run need
not pay); ``ViTBackbone`` is then this module's attribute like any class.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Set, Tuple

import torch
from torch import nn

from contrast.config import BackboneConfig
from contrast.models.backbone_base import Backbone

#: ``--arch`` -> (timm model name, its width/depth/heads overrides or {}).
VIT_ARCHS: Dict[str, Tuple[str, Dict[str, int]]] = {
    "vit_tiny": ("vit_tiny_patch16_224", {}),
    "vit_small": ("vit_small_patch16_224", {}),
    "vit_base": ("vit_base_patch16_224", {}),
    "vit_pico": ("vit_tiny_patch16_224", {"embed_dim": 64, "depth": 2, "num_heads": 2}),
}
_SIZES = {"vit_tiny_patch16_224": (192, 12, 3), "vit_small_patch16_224": (384, 12, 6),
          "vit_base_patch16_224": (768, 12, 12)}
GLOBAL_POOLS = ("token", "avg")
#: Blocks whose CLS tokens ``"cls4"`` concatenates (DINO eval_linear.py, ViT-S: n_last_blocks 4).
LAST_BLOCKS = 4


def build_vit(cfg: BackboneConfig) -> nn.Module:
    """The ViT ``cfg`` describes (``cfg.arch`` one of :data:`VIT_ARCHS`)."""
    return vit_backbone_class()(cfg.arch, image_size=cfg.image_size, patch_size=cfg.patch_size,
                                drop_path=cfg.drop_path, global_pool=cfg.global_pool,
                                freeze_patch_embed=cfg.freeze_patch_embed)


def __getattr__(name: str) -> Any:
    if name == "ViTBackbone":
        return vit_backbone_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.lru_cache(maxsize=None)
def vit_backbone_class() -> type:
    """:class:`ViTBackbone`, defined on the first call (it imports timm)."""
    from timm.models.vision_transformer import VisionTransformer

    class ViTBackbone(VisionTransformer, Backbone):
        """timm ``VisionTransformer`` with ``num_classes=0`` and the backbone interface (module docstring)."""

        family = "vit"
        feature_kinds = ("pooled", "cls", "avgpool", "cls4", "cls+avgpool")
        eval_feature = "cls"
        prefers_bf16 = True
        export_formats = ("timm",)

        def __init__(self, arch: str, image_size: int = 224, patch_size: int = 16, drop_path: float = 0.0,
                     global_pool: str = "token", freeze_patch_embed: bool = False) -> None:
            if arch not in VIT_ARCHS:
                raise ValueError(f"--arch {arch!r} is not a ViT; choose one of: {', '.join(VIT_ARCHS)}")
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"--global-pool {global_pool!r} is not supported; choose one of: "
                                 f"{', '.join(GLOBAL_POOLS)}")
            if patch_size < 1 or image_size % patch_size:
                raise ValueError(f"--image-size {image_size} is not a multiple of --patch-size {patch_size}")
            name, over = VIT_ARCHS[arch]
            width, depth, heads = _SIZES[name]
            self._spec = {"library": "timm", "name": name, "kwargs": dict(
                over, num_classes=0, img_size=image_size, patch_size=patch_size, global_pool=global_pool,
                dynamic_img_size=True)}
            super().__init__(embed_dim=over.get("embed_dim", width), depth=over.get("depth", depth),
                             num_heads=over.get("num_heads", heads), num_classes=0, img_size=image_size,
                             patch_size=patch_size, global_pool=global_pool, dynamic_img_size=True,
                             drop_path_rate=drop_path)
            self.arch, self.feat_dim, self.verify_size = arch, self.embed_dim, image_size
            if freeze_patch_embed:
                self.patch_embed.proj.requires_grad_(False)

        def no_weight_decay(self) -> Set[str]:
            tokens = super().no_weight_decay()
            return {n for n, p in self.named_parameters() if p.ndim < 2 or n in tokens}

        @property
        def num_layers(self) -> int:
            return len(self.blocks)

        def layer_id(self, name: str) -> int:
            """MAE's ``get_layer_id_for_vit`` (util/lr_decay.py): ``cls_token``, ``pos_embed`` and the
            patch embedding 0, block i i + 1, the rest (final norm) ``num_layers + 1``."""
            if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
                return 0
            if name.startswith("blocks."):
                return int(name.split(".")[1]) + 1
            return self.num_layers + 1

        def last_tokens(self, x: torch.Tensor, n: int) -> List[torch.Tensor]:
            """The normed token sequences (B, 1 + N, D) of the last ``n`` blocks (DINO's
            ``get_intermediate_layers``)."""
            x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
            out, first = [], len(self.blocks) - n
            for i, blk in enumerate(self.blocks):
                x = blk(x)
                if i >= first:
                    out.append(self.norm(x))
            return out

        def features(self, x: torch.Tensor, kind: str) -> torch.Tensor:
            self.check_feature(kind)
            if kind == "pooled":
                return self(x)
            blocks = self.last_tokens(x, min(LAST_BLOCKS, len(self.blocks)) if kind == "cls4" else 1)
            last = blocks[-1]
            if kind == "cls":
                return last[:, 0]
            if kind == "avgpool":
                return last[:, self.num_prefix_tokens:].mean(1)
            if kind == "cls4":
                return torch.cat([t[:, 0] for t in blocks], dim=-1)
            return torch.cat([last[:, 0], last[:, self.num_prefix_tokens:].mean(1)], dim=-1)   # cls+avgpool

        def feature_dim(self, kind: str) -> int:
            self.check_feature(kind)
            if kind == "cls4":
                return self.embed_dim * min(LAST_BLOCKS, len(self.blocks))
            return self.embed_dim * (2 if kind == "cls+avgpool" else 1)

        def reference_spec(self) -> Dict[str, Any]:
            return {**self._spec, "kwargs": dict(self._spec["kwargs"])}

        def reference_model(self) -> nn.Module:
            import timm
            spec = self.reference_spec()
            return timm.create_model(spec["name"], pretrained=False, **spec["kwargs"])

    ViTBackbone.__module__, ViTBackbone.__qualname__ = __name__, "ViTBackbone"
    globals()["ViTBackbone"] = ViTBackbone   # pickle finds it by name
    return ViTBackbone
