"""Export a pretrained backbone for downstream use: torchvision or timm state dict, detectron2 checkpoint.

Reads any method's pretraining checkpoint (its backbone weights, arch, stem, ViT patch and image
size from its recorded configuration) and writes the formats the backbone's family has
(``export_formats``: ResNets ``torchvision`` and ``d2``, ViTs ``timm``):

* ``<output>.pth`` for a ViT: timm's ``VisionTransformer`` state dict (no head); it loads with
  ``strict=True`` into ``timm.create_model(name, pretrained=False, **kwargs)``, the name and keyword
  arguments printed and written to ``<output>.json`` (``num_classes=0``, ``img_size``,
  ``patch_size``, ``global_pool``, ``dynamic_img_size``);

* ``<output>.pth``: a plain torchvision ResNet state dict without ``fc`` keys. It
  loads into ``torchvision.models.<arch>()`` with ``strict=True`` once ``fc`` is
  replaced by ``nn.Identity()`` (``strict=False`` reports only ``fc.weight`` and
  ``fc.bias`` missing).
* ``<output>.pkl``: the format of detectron2's ``convert-torchvision-to-d2.py``:
  a pickle ``{"model": {name: numpy array}, "__author__": ..., "matching_heuristics": True}``
  with detectron2's ResNet names (``conv1``/``bn1`` -> ``stem.conv1``/``stem.conv1.norm``,
  ``layer<i>`` -> ``res<i+1>``, ``bn<j>`` -> ``conv<j>.norm``, ``downsample.0``/``.1`` ->
  ``shortcut``/``shortcut.norm``). Use it with ``MODEL.WEIGHTS <output>.pkl``,
  ``MODEL.PIXEL_MEAN [123.675, 116.280, 103.530]``, ``MODEL.PIXEL_STD [58.395, 57.120, 57.375]``,
  ``INPUT.FORMAT RGB`` and ``MODEL.RESNETS.STRIDE_IN_1X1 False`` (torchvision ResNets stride in the
  3x3 conv); ResNet-18/34 also need ``MODEL.RESNETS.RES2_OUT_CHANNELS 64``.

Every export is verified: it is loaded back into the library's model (the backbone's
``reference_model()``) and its features on a random batch (eval mode) are compared with the original backbone's;
the tool fails when the max abs difference exceeds ``--tolerance`` (1e-5).

Small-stem backbones (``--stem small`` or ``small-maxpool`` pretraining) export too,
but their ``conv1`` is 3x3 (64, 3, 3, 3) instead of 7x7: torchvision needs the same
stem swap (``conv1 = Conv2d(3, 64, 3, 1, 1, bias=False)``, plus ``maxpool = Identity()``
for ``small``; ``small-maxpool`` keeps the max-pool), and detectron2's ``BasicStem``
(7x7 conv + max-pool) cannot take them as is.

Usage::

    python tools/export_backbone.py --pretrained-model output/PIC/current.pth --output output/PIC/r50
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import sys
from collections import OrderedDict
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from contrast import engine  # noqa: E402
from contrast.eval.features import backbone_from_checkpoint, backbone_spec  # noqa: E402
from contrast.option import (add_backbone_flags, add_debug_flag, add_pretrained_flag, new_parser,  # noqa: E402
                             parse_with_input_file)


def export_parser() -> argparse.ArgumentParser:
    p = new_parser("export_backbone.py", "Export a pretrained backbone as a torchvision (ResNet) or timm (ViT) "
                   "state dict and a detectron2 checkpoint (ResNet), and verify each by comparing features.")
    add_pretrained_flag(p, required=True)
    p.add_argument("--output", required=True, help="output prefix: writes <output>.pth and/or <output>.pkl")
    p.add_argument("--format", choices=["torchvision", "d2", "both", "timm"], default=None,
                   help="what to write (default: every format of the backbone's family; both = torchvision + d2)")
    add_backbone_flags(p, from_checkpoint=True)
    p.add_argument("--tolerance", type=float, default=1e-5, help="max abs feature difference allowed")
    p.add_argument("--verify-size", type=int, default=None,
                   help="image side of the verification batch (default: 32 small stems, 64 imagenet)")
    add_debug_flag(p)
    return p


def parse_export_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return parse_with_input_file(export_parser(), argv, "pretrained_model")


D2_AUTHOR = "contrast"


def torchvision_state(backbone: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The backbone's state dict without ``fc`` entries, tensors detached on the CPU (any family)."""
    return OrderedDict((k, v.detach().cpu().clone()) for k, v in backbone.state_dict().items()
                       if not k.startswith("fc."))


def torchvision_to_d2_name(name: str) -> str:
    """detectron2 ResNet name of a torchvision ResNet parameter/buffer name."""
    if not name.startswith("layer"):
        name = "stem." + name
    name = re.sub(r"^layer([1-4])\.", lambda m: f"res{int(m.group(1)) + 1}.", name)
    name = re.sub(r"\bbn([1-3])\.", r"conv\1.norm.", name)
    name = name.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    return name


def d2_to_torchvision_name(name: str) -> str:
    """Inverse of :func:`torchvision_to_d2_name`."""
    name = name.replace("shortcut.norm.", "downsample.1.").replace("shortcut.", "downsample.0.")
    name = re.sub(r"\bconv([1-3])\.norm\.", r"bn\1.", name)
    name = re.sub(r"^res([2-5])\.", lambda m: f"layer{int(m.group(1)) - 1}.", name)
    return name[len("stem."):] if name.startswith("stem.") else name


def to_detectron2(state: Dict[str, torch.Tensor]) -> dict:
    """The pickled object of ``convert-torchvision-to-d2.py``: renamed keys, numpy values."""
    model = OrderedDict((torchvision_to_d2_name(k), v.detach().cpu().numpy()) for k, v in state.items())
    return {"model": model, "__author__": D2_AUTHOR, "matching_heuristics": True}


def from_detectron2(obj: dict) -> "OrderedDict[str, torch.Tensor]":
    """A torchvision state dict from a :func:`to_detectron2` object (used to verify the export)."""
    return OrderedDict((d2_to_torchvision_name(k), torch.from_numpy(np.asarray(v))) for k, v in obj["model"].items())


@torch.no_grad()
def max_feature_difference(original: nn.Module, state: Dict[str, torch.Tensor], arch: str, stem: str,
                           image_size: int = 64, batch_size: int = 4, seed: int = 0) -> float:
    """Load ``state`` strictly into a fresh library model (``original.reference_model()``: torchvision
    ``<arch>`` with the stem ``stem``, or timm's ViT); max |features - original features| on a seeded
    random batch (3, ``image_size``) with both networks in eval mode."""
    net = original.reference_model()
    net.load_state_dict(state, strict=True)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    was_training = original.training
    original.eval()
    try:
        ref = original(x.to(next(original.parameters()).device)).cpu()
    finally:
        original.train(was_training)
    return (net.eval()(x) - ref).abs().max().item()


def check_export(original: nn.Module, state: Dict[str, torch.Tensor], arch: str, stem: str, what: str,
                 tolerance: float, image_size: int) -> float:
    """:func:`max_feature_difference`, printed; ``RuntimeError`` above ``tolerance``."""
    diff = max_feature_difference(original, state, arch, stem, image_size)
    print(f"[export] {what}: max abs feature difference to the original backbone {diff:.3e}", flush=True)
    if not diff <= tolerance:
        raise RuntimeError(f"{what}: exported backbone differs from the original by {diff:.3e} > {tolerance:.0e}")
    return diff


def main(argv: Optional[List[str]] = None) -> Dict[str, str]:
    args = parse_export_args(argv)
    backbone, _, ckpt = backbone_from_checkpoint(args.pretrained_model, args.arch, args.stem)
    arch, stem = backbone_spec(ckpt, args.arch, args.stem)
    try:
        backbone.reference_spec()
    except ValueError as e:   # no library model takes it (the release's ResNet-D)
        raise ValueError(f"{args.pretrained_model}: {e}") from None
    formats = {None: backbone.export_formats, "both": ("torchvision", "d2")}.get(args.format, (args.format,))
    missing = [f for f in formats if f not in backbone.export_formats]
    if missing:
        raise ValueError(f"{args.pretrained_model}: --format {args.format} is not available for {arch} (its formats: "
                         f"{', '.join(backbone.export_formats)})")
    size = args.verify_size or backbone.verify_size
    if stem != "imagenet":
        pool = "the max-pool is kept" if stem == "small-maxpool" else "there is no max-pool"
        print(f"[export] {stem} stem backbone: conv1 is (64, 3, 3, 3) and {pool}; load it into a torchvision "
              f"ResNet with the same stem swap (detectron2's BasicStem cannot take it)", flush=True)
    state = torchvision_state(backbone)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    written: Dict[str, str] = {}
    for fmt in ("torchvision", "timm"):
        if fmt not in formats:
            continue
        check_export(backbone, state, arch, stem, f"{fmt} export", args.tolerance, size)
        path = args.output + ".pth"
        torch.save(state, path)
        written[fmt] = path
        spec = backbone.reference_spec()
        if fmt == "timm":
            with open(args.output + ".json", "w") as f:
                json.dump(spec, f, indent=2)
            print(f"[export] load with timm.create_model({spec['name']!r}, pretrained=False, "
                  f"**{spec['kwargs']}).load_state_dict(torch.load({path!r}))", flush=True)
    if "d2" in formats:
        obj = to_detectron2(state)
        check_export(backbone, from_detectron2(obj), arch, stem, "detectron2 export", args.tolerance, size)
        path = args.output + ".pkl"
        with open(path, "wb") as f:
            pickle.dump(obj, f)
        written["d2"] = path
    for fmt, path in written.items():
        print(f"[export] wrote {fmt}: {path} ({arch}, {stem} stem, "
              f"epoch {ckpt.epoch})", flush=True)
    return written


if __name__ == "__main__":
    engine.run_cli(main)
