"""Command line of ``main_linear.py``: linear evaluation, and full fine-tuning with ``--finetune``.

Part of the command-line layer (with :mod:`contrast.option`, whose shared flag groups it uses).
The flags whose default depends on the protocol have none in the parser: once the backbone is known
(from ``--arch`` or the checkpoint), a flag not given takes the value of :data:`PROTOCOLS` for the
chosen protocol and backbone family (``linear``: the release's linear evaluation; ``finetune``:
SimCLR's semi-supervised fine-tuning for a ResNet, MAE's fine-tuning for a ViT, docs/evaluation.md).
:func:`eval_config` turns the parsed flags into the typed :class:`~contrast.evalconfig.EvalRunConfig`.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional, Tuple

from contrast.config_file import add_config_flag, parse_with_config
from contrast.evalconfig import FINETUNE, LINEAR, EvalRunConfig, eval_groups_from_flags
from contrast.models.backbone_factory import FAMILY_NAMES, family_name
from contrast.models.recipe import LR_SCALINGS
from contrast.optim import OPTIMIZERS
from contrast.option_backbone import add_eval_feature_flag
from contrast.option_monitors import add_wandb_flags
from contrast.option import (add_backbone_flags, add_checkpoint_flags, add_data_flags, add_pretrained_flag,
                             add_runtime_flags, add_schedule_flags, check_values, new_parser)

_RESNET_LINEAR = {"learning_rate": 30.0, "optimizer": "sgd", "nesterov": False, "weight_decay": 0.0, "epochs": 100,
                  "warmup_epoch": 5, "warmup_multiplier": 100.0, "sync_bn": False, "layer_decay": 1.0,
                  "drop_path": 0.0, "label_smoothing": 0.0}
#: Protocol defaults of the flags the parser leaves unset, by (protocol, backbone family); filled in once
#: the backbone is known (:func:`resolve_protocol`). linear: the release's linear evaluation (SGD momentum
#: 0.9, lr 30 x B/256, no weight decay, 100 epochs, 5 warm-up epochs), for every family. finetune of a
#: ResNet: SimCLR (Chen et al. 2020, appendix B.5): Nesterov momentum 0.9, lr 0.05 x B/256, no weight
#: decay and no warm-up, 60 epochs (1 % of the labels; 30 for 10 %), cosine decay, batch norm over all
#: processes. finetune of a ViT: MAE's ViT-B command (FINETUNE.md; main_finetune.py): AdamW, blr 5e-4 x
#: B/256, weight decay 0.05, layer decay 0.65, drop path 0.1, label smoothing 0.1, 5 warm-up epochs from 0
#: (from lr / 1e6 here), cosine, 100 epochs (docs/evaluation.md).
PROTOCOLS: Dict[Tuple[str, str], Dict[str, Any]] = {
    (LINEAR, "resnet"): _RESNET_LINEAR,
    (LINEAR, "vit"): dict(_RESNET_LINEAR),
    (FINETUNE, "resnet"): {**_RESNET_LINEAR, "learning_rate": 0.05, "nesterov": True, "epochs": 60, "warmup_epoch": 0,
                           "sync_bn": True},
    (FINETUNE, "vit"): {**_RESNET_LINEAR, "learning_rate": 5e-4, "optimizer": "adamw", "weight_decay": 0.05,
                        "epochs": 100, "warmup_epoch": 5, "warmup_multiplier": 1e6, "layer_decay": 0.65,
                        "drop_path": 0.1, "label_smoothing": 0.1},
}
#: The flags whose default is a protocol's.
PROTOCOL_FLAGS = tuple(_RESNET_LINEAR)


def protocol_defaults(mode: str, arch: str) -> Dict[str, Any]:
    """The protocol defaults of ``mode`` (linear / finetune) for the backbone family of ``arch``."""
    return PROTOCOLS[(mode, family_name(arch))]


def resolve_protocol(cfg: EvalRunConfig) -> EvalRunConfig:
    """``cfg`` (its arch resolved) with the protocol flags not given set to the defaults of its protocol
    and backbone family."""
    return cfg.with_defaults(protocol_defaults(cfg.model.mode, cfg.model.arch))


def fill_protocol(args: argparse.Namespace) -> argparse.Namespace:
    """:func:`resolve_protocol` for parsed flags whose ``arch`` is set (in place)."""
    for key, value in protocol_defaults(FINETUNE if args.finetune else LINEAR, args.arch).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def _protocol_help(dest: str) -> str:
    return " (default: " + "; ".join(f"{mode} {family} {PROTOCOLS[(mode, family)][dest]}"
                                     for mode in (LINEAR, FINETUNE) for family in FAMILY_NAMES) + ")"


def linear_parser() -> argparse.ArgumentParser:
    p = new_parser("main_linear.py", "Linear evaluation: a linear classifier on the frozen (eval-mode) pretrained "
                   "backbone; with --finetune the whole network is trained (semi-supervised fine-tuning). Arch, "
                   "stem, image size and evaluation crop come from the checkpoint unless given.")
    g = p.add_argument_group("what to evaluate")
    add_pretrained_flag(g, required=False)
    g.add_argument("--random-init", action="store_true", help="(new) baseline: the --arch backbone at its "
                   "torchvision initialisation (seeded by --seed) instead of a checkpoint")
    g.add_argument("--finetune", action="store_true", help="(new) train the whole network (backbone batch norm "
                   "in train mode) with SimCLR's fine-tuning protocol instead of a linear probe on a frozen backbone")
    add_data_flags(p, train=True, default_aug="NULL", image_size=None)
    add_label_subset_flags(p)
    add_backbone_flags(p, from_checkpoint=True)
    add_schedule_flags(p, default_epochs=100)
    g = p.add_argument_group("evaluation optimiser")
    g.add_argument("--total-batch-size", type=int, default=256, help="batch size over all processes")
    g.add_argument("--learning-rate", type=float, help="lr for a total batch of 256 (see --lr-scaling)")
    g.add_argument("--lr-scaling", type=str, default="linear", choices=list(LR_SCALINGS), help="(new) peak lr = lr "
                   "x total batch / 256 (linear) or lr x sqrt(total batch) (sqrt: google-research/simclr's LARS "
                   "fine-tuning, --learning-rate 0.005)")
    g.add_argument("--optimizer", type=str, choices=list(OPTIMIZERS), help="(new) optimiser (adamw: betas 0.9, "
                   "0.999, no decay on the backbone's no_weight_decay() and the classifier's bias)")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, help="(new) Nesterov momentum (sgd)")
    g.add_argument("--weight-decay", type=float, help="weight decay")
    g.add_argument("--layer-decay", type=float, help="(new) --finetune: layer-wise lr decay, the lr of layer i "
                   "of L is scaled by layer_decay ** (L + 1 - i) (MAE, BEiT; ViT: patch embedding 0, block k k + 1; "
                   "ResNet: stem 0, layerK K; the classifier L + 1)")
    g.add_argument("--label-smoothing", type=float, help="(new) label smoothing of the training cross-entropy")
    g.add_argument("--drop-path", type=float, help="(new) --finetune: ViT stochastic-depth rate (ResNets ignore it)")
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, help="(new) --finetune: batch norm "
                   "over the global batch on several processes (SimCLR's global_bn, MoCo's SyncBN)")
    g.add_argument("-e", "--eval", action="store_true", help="only evaluate the linear checkpoint given by "
                   "--resume (or <output-dir>/current.pth with --auto-resume)")
    add_eval_feature_flag(p)
    add_runtime_flags(p)
    add_wandb_flags(p.add_argument_group("experiment tracking"))
    add_checkpoint_flags(p)
    add_config_flag(p)
    for action in p._actions:
        if action.dest in PROTOCOL_FLAGS:
            action.default = None
            action.help = (action.help or "") + _protocol_help(action.dest)
    return p


def add_label_subset_flags(p: argparse.ArgumentParser) -> None:
    """``--label-fraction`` / ``--label-subset``: train on a subset of the labelled training images."""
    g = p.add_argument_group("semi-supervised subsets (new)")
    g.add_argument("--label-fraction", type=float, default=None, help="(new) train on this fraction of the "
                   "training images, class-balanced, drawn from --seed (the list is written to "
                   "<output-dir>/label_subset.txt)")
    g.add_argument("--label-subset", type=str, default=None, help="(new) train on the images named in this file: "
                   "one file name per line, as SimCLR's imagenet_subsets/1percent.txt and 10percent.txt")


def check_label_subset(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.label_fraction is not None and args.label_subset is not None:
        p.error("give --label-fraction or --label-subset, not both")
    if args.label_fraction is not None and not 0 < args.label_fraction <= 1:
        p.error(f"--label-fraction must be in (0, 1], got {args.label_fraction}")
    if (args.label_fraction is not None or args.label_subset) and args.cache_mode == "part":
        p.error("--label-fraction / --label-subset cannot be combined with --cache-mode part")


def parse_linear_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse ``main_linear.py`` flags (over the values of ``--config FILE``); arch, stem and image size
    stay None (the checkpoint's), and so do the protocol flags not given (:data:`PROTOCOLS`, by the
    backbone family: :func:`resolve_protocol` once the arch is known)."""
    p = linear_parser()
    args = parse_with_config(p, argv)
    for name in ("layer_decay", "drop_path", "label_smoothing"):
        if getattr(args, name) is not None and not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    check_values(p, args, ["epochs", "print_freq", "save_freq", "image_size", "total_batch_size", "max_nonfinite"])
    check_label_subset(p, args)
    if args.random_init and (args.pretrained_model or not args.arch):
        p.error("--random-init needs --arch and no --pretrained-model")
    if not args.eval and not (args.pretrained_model or args.random_init):
        p.error("--pretrained-model is required for linear training (or --random-init, or -e with a linear "
                "checkpoint)")
    if args.eval and not (args.resume or args.auto_resume):
        p.error("-e/--eval needs the linear checkpoint: --resume PATH or --auto-resume")
    return args


def eval_config(args: argparse.Namespace) -> EvalRunConfig:
    """The typed groups of parsed ``main_linear.py`` flags: built once by the entry script."""
    return eval_groups_from_flags(vars(args))
