"""Command-line options of ``main_pretrain.py`` and ``main_linear.py``.

Flag names and meanings follow the PIC release (``contrast/option.py`` of
github.com/zdaxie/PIC); the flags it did not have are marked "(new)" in ``--help``.
Per-method defaults: when ``--contrast-temperature`` / ``--contrast-momentum`` are not
given, the method's published value is used (see :data:`METHOD_DEFAULTS`) and the resolved
value is written to ``config.json`` and to every checkpoint.
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional

from contrast.data.transforms import AUG_NAMES
from contrast.models import ARCHS, METHODS, STEMS
from contrast.models.pic_sampled import STORAGES as PIC_STORAGES

MODELS = METHODS  # MoCo v2 = --model MoCo --mlp-head --aug MoCov2 --contrast-temperature 0.2
AUGS = tuple(a for a in AUG_NAMES if a != "val")

#: Values used when the flag is not given: (temperature, momentum). ``momentum`` is the memory
#: bank momentum for InstDisc (0.5, released script) and the key-encoder momentum for MoCo (0.999).
METHOD_DEFAULTS: Dict[str, Dict[str, float]] = {
    "PIC": {"contrast_temperature": 0.2, "contrast_momentum": 0.0},
    "InstDisc": {"contrast_temperature": 0.07, "contrast_momentum": 0.5},
    "MoCo": {"contrast_temperature": 0.07, "contrast_momentum": 0.999},
    "SimCLR": {"contrast_temperature": 0.1, "contrast_momentum": 0.0},
}

AMP_HELP = ("mixed precision (torch.amp, replaces Apex): O0 = fp32; O1 = autocast, fp16 with a GradScaler "
            "on CUDA, bf16 on the CPU; O2 = bf16 autocast (no scaler). Logits and losses stay fp32.")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _common(parser: argparse.ArgumentParser, default_epochs: int, default_aug: str) -> None:
    """Flags shared by pretraining and linear evaluation."""
    g = parser.add_argument_group("data")
    g.add_argument("--data-dir", type=str, default="./data", help="dataset root: <dir>/train/<class>/<img> "
                   "(+ val), or with --zip train.zip, train_map.txt, val.zip, val_map.txt")
    g.add_argument("--zip", action="store_true", help="read the ImageNet-Zip layout")
    g.add_argument("--cache-mode", type=str, default="no", choices=["no", "full", "part"],
                   help="keep encoded images in RAM: all of them, or only this rank's shard (part)")
    g.add_argument("--strict-data", action="store_true", help="(new) a corrupt image stops the run "
                   "instead of being replaced and counted")
    g.add_argument("--aug", type=str, default=default_aug, choices=AUGS, help="augmentation")
    g.add_argument("--crop", type=float, default=0.08, help="minimum scale of RandomResizedCrop")
    g.add_argument("--image-size", type=int, default=224, help="crop size (large crop for MultiCrop)")
    g.add_argument("--val-crop-fraction", type=float, default=0.875, help="(new) evaluation transform: resize "
                   "to image-size / fraction, centre-crop image-size; 1.0 keeps whole small images")
    g.add_argument("--plain-aug", action="store_true", help="(new) run the whole augmentation in the "
                   "DataLoader workers (seed style) instead of colour ops batched on the device")
    g.add_argument("--num-workers", type=int, default=4, help="DataLoader workers per process")

    g = parser.add_argument_group("model")
    g.add_argument("--arch", type=str, default="resnet50", choices=ARCHS, help="torchvision ResNet backbone")
    g.add_argument("--stem", type=str, default="imagenet", choices=STEMS, help="(new) layers before layer1: "
                   "imagenet = 7x7 stride-2 conv1 + max-pool; small = 3x3 stride-1 conv1, no max-pool (28-32 px "
                   "images); small-maxpool = 3x3 stride-1 conv1 + max-pool")
    g.add_argument("--small-stem", action="store_const", dest="stem", const="small", default=argparse.SUPPRESS,
                   help="deprecated alias of --stem small")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--lr-scheduler", type=str, default="cosine", choices=["cosine", "step"],
                   help="per-iteration schedule after warm-up: cosine to 1e-6, or step decay")
    g.add_argument("--warmup-epoch", type=int, default=5, help="epochs of linear warm-up")
    g.add_argument("--warmup-multiplier", type=float, default=100,
                   help="warm-up starts at lr / multiplier and reaches lr after --warmup-epoch "
                        "(GradualWarmupScheduler semantics of the release)")
    g.add_argument("--lr-decay-epochs", type=int, default=[120, 160, 200], nargs="+",
                   help="step schedule: epochs at which the lr is multiplied by --lr-decay-rate")
    g.add_argument("--lr-decay-rate", type=float, default=0.1, help="step schedule decay factor")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD / LARS momentum")
    g.add_argument("--amp-opt-level", type=str, default="O0", choices=["O0", "O1", "O2"], help=AMP_HELP)
    g.add_argument("--epochs", type=int, default=default_epochs, help="number of training epochs")
    g.add_argument("--start-epoch", type=int, default=1, help="first epoch (overridden by a resumed checkpoint)")
    g.add_argument("--max-nonfinite", type=int, default=10, help="(new) stop after this many consecutive "
                   "steps with a non-finite loss (each is skipped on all ranks)")
    g.add_argument("--channels-last", action="store_true", help="(new) channels-last memory format")
    g.add_argument("--compile", action="store_true", help="(new) torch.compile the backbone "
                   "(nn.Module.compile, checkpoint keys unchanged; needs a C compiler on the CPU)")

    g = parser.add_argument_group("io and runtime")
    g.add_argument("--output-dir", type=str, default="./output", help="logs, config.json and checkpoints")
    g.add_argument("--auto-resume", action="store_true", help="continue from <output-dir>/current.pth if present")
    g.add_argument("--resume", type=str, default="", help="checkpoint to resume from")
    g.add_argument("--print-freq", type=int, default=100, help="log every N iterations")
    g.add_argument("--save-freq", type=int, default=10, help="write ckpt_epoch_<e>.pth every N epochs "
                   "(current.pth is written every epoch)")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                   help="(new) TensorBoard scalars in <output-dir>")
    g.add_argument("--device", type=str, default="auto", help="(new) auto (cuda:<local_rank> if available, "
                   "else cpu), cpu, cuda or cuda:<i>")
    g.add_argument("--seed", "--rng-seed", dest="seed", type=int, default=0, help="(new) random seed")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=-1,
                   help="set by torch.distributed.launch; torchrun uses LOCAL_RANK")


def _pretrain_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "main_pretrain.py", formatter_class=_Formatter,
        description="Unsupervised pretraining (PIC, InstDisc, MoCo v1/v2, SimCLR). Launch with plain python "
                    "(one process), torchrun or python -m torch.distributed.launch.",
        epilog="Per-method defaults when --contrast-temperature/--contrast-momentum are omitted: "
               + "; ".join(f"{m}: T={d['contrast_temperature']}, m={d['contrast_momentum']}"
                           for m, d in METHOD_DEFAULTS.items())
               + ". The effective lr is --base-learning-rate x batch-size x world-size / 256. With "
                 "--use-sliding-window-sampler, --epochs, --warmup-epoch and --lr-decay-epochs count plain "
                 "epochs and are mapped to window-epochs ceil(e x N / window-size); --save-freq counts "
                 "window-epochs.")
    _common(p, default_epochs=100, default_aug="SimCLR")
    g = p.add_argument_group("pretraining")
    g.add_argument("--model", type=str, required=True, choices=MODELS, help="method")
    g.add_argument("--batch-size", type=int, default=64, help="batch size per process")
    g.add_argument("--base-learning-rate", "--base-lr", dest="base_learning_rate", type=float, default=0.03,
                   help="lr for a total batch of 256")
    g.add_argument("--optimizer", type=str, default="sgd", choices=["sgd", "lars"],
                   help="LARS: no decay or adaptation on biases and BN parameters, trust coefficient 0.001")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay")
    g.add_argument("--feature-dim", type=int, default=128, help="embedding dimension")
    g.add_argument("--mlp-head", action="store_true", help="2-layer MLP projection head")
    g.add_argument("--contrast-temperature", type=float, default=None, help="softmax temperature "
                   "(default: per method, see below)")
    g.add_argument("--contrast-momentum", type=float, default=None, help="InstDisc memory-bank momentum or "
                   "MoCo key-encoder momentum (default: per method)")
    g.add_argument("--contrast-num-negative", type=int, default=65536, help="InstDisc negatives / MoCo queue length")
    g.add_argument("--pic-num-negative", type=int, default=0, help="(new) PIC recent negative sampling: "
                   "number of negatives K (0 = full softmax over all instances)")
    g.add_argument("--pic-weight-correction", action=argparse.BooleanOptionalAction, default=True,
                   help="(new) PIC weight update correction for rows skipped by negative sampling")
    g.add_argument("--pic-storage", type=str, default="memory", choices=PIC_STORAGES,
                   help="(new) sampled PIC classifier: where each rank keeps its shard of the table "
                        "(host memory, or memory-mapped files)")
    g.add_argument("--pic-storage-dir", type=str, default="", help="(new) folder of the table files with "
                   "--pic-storage disk (default: <output-dir>/pic_table)")
    g.add_argument("--knn-monitor", action="store_true", help="(new) weighted kNN top-1/top-5 of the backbone "
                   "on the val split every --knn-freq epochs (console, TensorBoard, best kept)")
    g.add_argument("--knn-freq", type=int, default=1, help="(new) epochs between kNN monitor evaluations")
    g.add_argument("--knn-k", type=int, default=200, help="(new) kNN monitor: neighbours")
    g.add_argument("--knn-t", type=float, default=0.07, help="(new) kNN monitor: temperature of exp(sim / T)")
    g.add_argument("--use-sliding-window-sampler", action="store_true", help="PIC sliding-window data scheduler")
    g.add_argument("--window-size", type=int, default=131072, help="sliding window size W (all ranks)")
    g.add_argument("--window-stride", type=int, default=16384, help="sliding window stride S")
    g.add_argument("--shuffle-per-epoch", action="store_true", help="sliding window: new permutation per pass")
    g.add_argument("--image-size2", type=int, default=96, help="MultiCrop: small crop size")
    g.add_argument("--crop2", type=float, default=0.14, help="MultiCrop: max scale of the small crops "
                   "(and min scale of the large crop)")
    g.add_argument("--num-crop2", type=int, default=3, help="MultiCrop: number of small crops")
    return p


def _linear_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "main_linear.py", formatter_class=_Formatter,
        description="Linear evaluation: a linear classifier on the frozen (eval-mode) pretrained backbone.")
    _common(p, default_epochs=100, default_aug="NULL")
    g = p.add_argument_group("linear evaluation")
    g.add_argument("--pretrained-model", type=str, default="", help="pretraining checkpoint of any method "
                   "(its backbone. tensors are loaded)")
    g.add_argument("--total-batch-size", type=int, default=256, help="batch size over all processes")
    g.add_argument("--learning-rate", type=float, default=30.0, help="lr for a total batch of 256")
    g.add_argument("--weight-decay", type=float, default=0.0, help="weight decay")
    g.add_argument("-e", "--eval", action="store_true", help="only evaluate the linear checkpoint given by "
                   "--resume (or <output-dir>/current.pth with --auto-resume)")
    return p


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    positive = ["epochs", "print_freq", "save_freq", "image_size"]
    positive += ["batch_size"] if hasattr(args, "batch_size") else ["total_batch_size"]
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_workers < 0:
        p.error(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.warmup_epoch < 0 or args.warmup_multiplier < 1:
        p.error("--warmup-epoch must be >= 0 and --warmup-multiplier >= 1")
    if args.max_nonfinite < 1:
        p.error(f"--max-nonfinite must be >= 1, got {args.max_nonfinite}")
    if not 0 < args.crop <= 1:
        p.error(f"--crop must be in (0, 1], got {args.crop}")


def parse_pretrain_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse and resolve pretraining flags (fills the per-method defaults)."""
    p = _pretrain_parser()
    args = p.parse_args(argv)
    _check(p, args)
    for key, value in METHOD_DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.model in ("InstDisc", "MoCo") and args.contrast_num_negative < 1:
        p.error(f"--contrast-num-negative must be >= 1 for {args.model}")
    if args.use_sliding_window_sampler and not 1 <= args.window_stride <= args.window_size:
        p.error(f"need 1 <= --window-stride <= --window-size, got {args.window_stride} and {args.window_size}")
    return args


def parse_linear_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse linear-evaluation flags."""
    p = _linear_parser()
    args = p.parse_args(argv)
    _check(p, args)
    if not args.eval and not args.pretrained_model:
        p.error("--pretrained-model is required for linear training (or pass -e with a linear checkpoint)")
    if args.eval and not (args.resume or args.auto_resume):
        p.error("-e/--eval needs the linear checkpoint: --resume PATH or --auto-resume")
    return args
