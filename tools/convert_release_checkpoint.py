"""Convert a pretraining checkpoint written by the PIC release into this project's formats.

The release (github.com/bl0/PIC) saves ``{"opt": argparse.Namespace, "model": DDP state dict,
"optimizer", "scheduler", "epoch"[, "amp", "sampler"]}`` with model keys ``module.encoder.*`` (its
ResNet, whose backbone names are torchvision's, and the head ``fc`` or ``fc1``/``fc2``), plus
``module.sim_matrix`` (PIC), ``module.memory`` (InstDisc) or ``module.encoder_k.*``,
``module.queue`` (D, K) and ``module.queue_ptr`` (MoCo). This tool writes into ``--output-dir``:

* ``converted.pth``: our pretraining checkpoint (``contrast.checkpoint.write_pretrained_checkpoint``)
  holding the method's state under our names (``backbone.*``, ``head.*``; PIC ``classifier.weight``;
  InstDisc ``bank``; MoCo ``key_encoder.*``, ``queue.features`` (K, D), ``queue.ptr``) and a config
  built from the release's ``opt`` (arch, model, head, feature dim, image size, the release's
  evaluation resize as ``val_crop_fraction``, ...), so ``main_linear.py``, ``main_knn.py`` and
  ``tools/export_backbone.py`` take it without further flags. It holds no optimiser state: it is for
  evaluation and export, not for resuming training (``--resume`` refuses it with a clear message).
* ``backbone.pth``: the backbone's state dict without ``fc``: for the plain ResNets a torchvision
  state dict (loads into ``torchvision.models.<arch>()`` once ``fc`` is ``nn.Identity``), for the
  ResNet-D variants this project's ``ResNetD`` state dict, whose names are the release's.

The converted method is built from its config and loaded strictly (every tensor must fit), and for
plain ResNets the torchvision model's features are compared with the converted backbone's.

    python tools/convert_release_checkpoint.py --release-checkpoint output/PIC/epoch-400/current.pth \\
        --output-dir output/PIC-release
    python main_linear.py --pretrained-model output/PIC-release/converted.pth --image-size 224 ...

The release evaluated every model at 224 px (its linear stage never passes ``--image-size``); the
converted config records the pretraining size (160 for the multi-crop recipe), which our
``main_linear.py`` uses unless ``--image-size`` is given.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch
import torchvision
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from contrast import engine  # noqa: E402
from contrast.checkpoint import CheckpointError, load_file, load_model_state, write_pretrained_checkpoint  # noqa: E402
from contrast.data.transforms import AUG_NAMES  # noqa: E402
from contrast.models import ARCHS, METHODS, build_backbone, build_method, method_class  # noqa: E402
from contrast.models.backbones import RESNET_D  # noqa: E402
from contrast.models.views import MULTI_CROP_AUG  # noqa: E402
from contrast.option import new_parser, parse_with_input_file, resolve_pretrain  # noqa: E402


def convert_parser() -> argparse.ArgumentParser:
    p = new_parser("convert_release_checkpoint.py", "Convert a pretraining checkpoint written by the release "
                   "(github.com/bl0/PIC) into this project's checkpoint format (for main_linear.py, main_knn.py and "
                   "tools/export_backbone.py; weights only, not resumable) and a backbone state dict.")
    p.add_argument("--release-checkpoint", type=str, required=True, help="the release's ckpt_epoch_<e>.pth or "
                   "current.pth (a dict with 'opt' and 'model')")
    p.add_argument("--output-dir", type=str, required=True, help="writes converted.pth (our format) and "
                   "backbone.pth (a torchvision state dict; ResNet-D: ours, with the release's key names)")
    p.add_argument("--tolerance", type=float, default=1e-5, help="max abs feature difference allowed between "
                   "the converted backbone and the torchvision one")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return p


def parse_convert_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return parse_with_input_file(convert_parser(), argv, "release_checkpoint")


ENCODER, ENCODER_K = "module.encoder.", "module.encoder_k."
HEAD_NAMES = {"fc.weight": "weight", "fc.bias": "bias", "fc1.weight": "0.weight", "fc1.bias": "0.bias",
              "fc2.weight": "2.weight", "fc2.bias": "2.bias"}
RELEASE_MLP_HIDDEN = 2048
#: opt values copied into the converted config (plain values only)
_PLAIN = (str, int, float, bool, type(None))


def read_release_checkpoint(path: str) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor], int]:
    """``(opt as a dict, model state dict, epoch)`` of a release pretraining checkpoint; a
    :class:`CheckpointError` naming ``path`` for anything else."""
    raw = load_file(path)
    if "version" in raw:
        raise CheckpointError(f"{path}: already a contrast checkpoint (format version {raw['version']}), "
                              f"nothing to convert")
    if "args" in raw and "best_acc1" in raw:
        raise CheckpointError(f"{path}: a release linear-evaluation checkpoint; convert the pretraining "
                              f"checkpoint (output/<method>/epoch-<e>/current.pth) instead")
    opt, model = raw.get("opt"), raw.get("model")
    if opt is None or not isinstance(model, dict) or not any(k.startswith(ENCODER) for k in model):
        found = ", ".join(sorted(map(str, raw))[:8])
        raise CheckpointError(f"{path}: not a PIC release pretraining checkpoint (expected 'opt' and 'model' with "
                              f"'{ENCODER}*' keys; found keys: {found})")
    opt = dict(opt) if isinstance(opt, dict) else dict(vars(opt))  # the release pickles an argparse Namespace
    for key in ("arch", "model"):
        if key not in opt:
            raise CheckpointError(f"{path}: the release checkpoint's 'opt' has no '{key}'")
    return opt, model, int(raw.get("epoch", 0))


def split_encoder(model: Dict[str, torch.Tensor], prefix: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(backbone tensors, head tensors under our names) of the release encoder at ``prefix``."""
    backbone, head = {}, {}
    for key, value in model.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in HEAD_NAMES:
            head[HEAD_NAMES[name]] = value
        else:
            backbone[name] = value
    return backbone, head


def convert_state(opt: Dict[str, Any], model: Dict[str, torch.Tensor], path: str) -> Tuple[Dict[str, torch.Tensor], int]:
    """Our method's state dict for a release model state dict, and the number of instances
    (rows of the PIC table / InstDisc bank; 1 for MoCo and SimCLR)."""
    method = opt["model"]
    backbone, head = split_encoder(model, ENCODER)
    state = {f"backbone.{k}": v for k, v in backbone.items()}
    state.update({f"head.{k}": v for k, v in head.items()})
    known = {k for k in model if k.startswith(ENCODER)}
    num_instances = 1
    if method == "PIC":
        state["classifier.weight"] = model["module.sim_matrix"]
        num_instances = model["module.sim_matrix"].shape[0]
        known.add("module.sim_matrix")
    elif method == "InstDisc":
        state["bank"] = model["module.memory"]
        state["neg_draws"] = torch.zeros((), dtype=torch.long)
        num_instances = model["module.memory"].shape[0]
        known.add("module.memory")
    elif method == "MoCo":
        backbone_k, head_k = split_encoder(model, ENCODER_K)
        state.update({f"key_encoder.backbone.{k}": v for k, v in backbone_k.items()})
        state.update({f"key_encoder.head.{k}": v for k, v in head_k.items()})
        state["queue.features"] = model["module.queue"].t().contiguous()   # (D, K) -> (K, D)
        state["queue.ptr"] = model["module.queue_ptr"].reshape(()).long()
        known |= {k for k in model if k.startswith(ENCODER_K)} | {"module.queue", "module.queue_ptr"}
    elif method != "SimCLR":
        raise CheckpointError(f"{path}: release --model {method!r} is unknown (PIC, InstDisc, MoCo, SimCLR)")
    unknown = sorted(set(model) - known)
    if unknown:
        raise CheckpointError(f"{path}: unexpected tensors for a release {method} checkpoint: {unknown[:5]}")
    return state, num_instances


def converted_config(opt: Dict[str, Any], path: str) -> Dict[str, Any]:
    """Our run config for the release's ``opt``: its plain values plus what our tools read."""
    if opt["arch"] not in ARCHS:
        raise CheckpointError(f"{path}: release --arch {opt['arch']!r} is not supported here")
    config = {k: v for k, v in opt.items() if isinstance(v, _PLAIN) or
              (isinstance(v, list) and all(isinstance(x, _PLAIN) for x in v))}
    image_size = int(opt.get("image_size", 224))
    config.update(stem="imagenet", mlp_head=bool(opt.get("mlp_head", False)), feature_dim=int(opt.get("feature_dim", 128)),
                  mlp_hidden_dim=RELEASE_MLP_HIDDEN, zero_init_residual=True, view_batching="separate",
                  image_size=image_size, val_crop_fraction=image_size / (image_size + 32),
                  converted_from=os.path.abspath(path), release_checkpoint=True)
    return config


def method_for(config: Dict[str, Any], num_instances: int) -> nn.Module:
    """The method the converted state must fit: its recipe with the release run's values of the flags
    that shape the state (``contrast.option.resolve_pretrain``, as ``main_pretrain.py`` resolves them)."""
    cls = method_class(config["model"])
    flags = ["--arch", config["arch"], "--stem", "imagenet", "--feature-dim", str(config["feature_dim"]),
             "--mlp-head" if config["mlp_head"] else "--no-mlp-head", "--mlp-hidden-dim", str(config["mlp_hidden_dim"]),
             "--view-batching", "separate"]
    for key in ("contrast_temperature", "contrast_momentum", "contrast_num_negative"):
        if config.get(key) is not None:
            flags += [f"--{key.replace('_', '-')}", str(config[key])]
    aug = config.get("aug")
    if aug == MULTI_CROP_AUG and cls.views.multi_crop:
        flags += ["--aug", aug, "--crop", str(config.get("crop", 0.08)), "--crop2", str(config.get("crop2", 0.14))]
    elif aug in AUG_NAMES and aug != MULTI_CROP_AUG:
        flags += ["--aug", aug]
    try:
        _, cfg = resolve_pretrain(config["model"], *flags)
    except SystemExit:
        raise CheckpointError(f"release --model {config['model']} with {' '.join(flags)}: not a valid "
                              f"configuration here (see the message above)") from None
    return build_method(cfg, num_instances)


@torch.no_grad()
def torchvision_feature_difference(backbone: nn.Module, state: Dict[str, torch.Tensor], arch: str,
                                   size: int = 64) -> float:
    """Max |features| difference between ``backbone`` and ``torchvision.models.<arch>()`` loaded
    strictly with ``state`` (eval mode, a seeded random batch)."""
    net = getattr(torchvision.models, arch)(weights=None)
    net.fc = nn.Identity()
    net.load_state_dict(state, strict=True)
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    return (net.eval()(x) - backbone.eval()(x)).abs().max().item()


def convert(path: str, output_dir: str, tolerance: float = 1e-5) -> Dict[str, str]:
    """Convert the release checkpoint ``path``; returns the written files."""
    opt, model, epoch = read_release_checkpoint(path)
    config = converted_config(opt, path)
    if config["model"] not in METHODS:
        raise CheckpointError(f"{path}: release --model {config['model']!r} is not registered here")
    state, num_instances = convert_state(opt, model, path)
    method = method_for(config, num_instances)
    load_model_state(method, state, path, config)   # strict: every tensor of the method, nothing else

    backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    backbone, _ = build_backbone(config["arch"], "imagenet")
    backbone.load_state_dict(backbone_state, strict=True)
    if config["arch"] not in RESNET_D:
        diff = torchvision_feature_difference(backbone, backbone_state, config["arch"])
        print(f"[convert] torchvision {config['arch']}: max abs feature difference {diff:.3e}", flush=True)
        if not diff <= tolerance:
            raise CheckpointError(f"{path}: torchvision features differ by {diff:.3e} > {tolerance:.0e}")

    os.makedirs(output_dir, exist_ok=True)
    out = {"checkpoint": os.path.join(output_dir, "converted.pth"), "backbone": os.path.join(output_dir, "backbone.pth")}
    write_pretrained_checkpoint(out["checkpoint"], method.state_dict(), config, epoch,
                                extra={"release_opt": {k: config[k] for k in opt if k in config}})
    torch.save({k: v.clone() for k, v in backbone_state.items()}, out["backbone"])
    kind = "torchvision state dict" if config["arch"] not in RESNET_D else "ResNet-D state dict (release names)"
    print(f"[convert] {path}: release {config['model']} {config['arch']} epoch {epoch} -> {out['checkpoint']} "
          f"(evaluation only: no optimiser state), {out['backbone']} ({kind})", flush=True)
    if config["image_size"] != 224:
        print(f"[convert] pretrained at {config['image_size']} px; the release evaluated at 224 px: pass "
              f"--image-size 224 to main_linear.py / main_knn.py for its protocol", flush=True)
    return out


def main(argv: Optional[List[str]] = None) -> Dict[str, str]:
    args = parse_convert_args(argv)
    return convert(args.release_checkpoint, args.output_dir, args.tolerance)


if __name__ == "__main__":
    engine.run_cli(main)
