"""Command-line options of every entry script and tool: the only module that touches argparse.

Flag names and meanings follow the PIC release (``contrast/option.py`` of github.com/zdaxie/PIC);
flags it did not have are marked "(new)" in ``--help``. Parsers are assembled from shared flag
groups (``add_*_flags``), so one concept has one flag name everywhere (old names stay as aliases).

Per-method values: every method of :data:`contrast.models.METHODS` declares its published recipe
(:class:`~contrast.models.recipe.Recipe`: augmentation, crops, temperature, momentum, optimiser,
lr, weight decay, warm-up, schedule) and its own flags. The pretraining parser gives the recipe's
flags no default; a flag the user did not give takes the method's recipe value
(:func:`contrast.models.recipe.resolve`), so ``--model X`` alone trains X's recipe. The resolved
values are written to ``config.json`` and to every checkpoint. :func:`method_config` turns the
parsed flags into the typed :class:`~contrast.config.MethodConfig` the models are built from;
:func:`resolve_pretrain` is the one way benchmarks, tools and tests obtain a method's configuration.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
from typing import Any, Dict, List, Optional, Sequence, Tuple

from contrast.config import VIEW_BATCHING, Flag, MethodConfig
from contrast.data.transforms import AUG_NAMES
from contrast.models import BACKBONE_ARCHS, METHODS, STEMS
from contrast.models.recipe import FLAG_FIELDS, LR_SCALINGS, Recipe, describe, peak_lr, resolve
from contrast.models.views import MULTI_CROP_AUGS
from contrast.optim import COSINE_FORMS, LARS_FORMS, OPTIMIZERS
from contrast.option_backbone import add_vit_flags, backbone_config, recipe_of, vit_recipe_note
from contrast.option_monitors import add_monitor_flags
from contrast.precision import OPT_LEVELS
from contrast.runconfig import RunConfig, groups_from_flags
from contrast.config_file import add_config_flag, parse_with_config, resolve_from_config  # noqa: F401 (re-export)

AUGS = tuple(a for a in AUG_NAMES if a != "val")
AMP_HELP = ("mixed precision (torch.amp, replaces Apex): auto = O1 on CUDA (the release's default), on a CPU bf16 "
            "when it has fast bf16 (AMX / AVX512-BF16) and fp32 otherwise (the log says which); O0 = fp32; O1 = "
            "autocast, fp16 with a GradScaler on CUDA, bf16 on the CPU; O2 = bf16 autocast (no scaler). Logits and "
            "losses stay fp32.")
RECIPE_NOTE = " (default: the method's recipe)"


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:   # resolved later (the method's recipe, a checkpoint's config)
            return action.help or ""
        return super()._get_help_string(action)


def new_parser(prog: str, description: str, epilog: Optional[str] = None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog, formatter_class=_Formatter, description=description, epilog=epilog)


def parse_with_input_file(p: argparse.ArgumentParser, argv: Optional[List[str]], dest: str) -> argparse.Namespace:
    """Parse ``argv``; the file flag ``dest`` names must exist (a one-line usage error otherwise)."""
    args = p.parse_args(argv)
    path = getattr(args, dest)
    if not os.path.isfile(path):
        p.error(f"--{dest.replace('_', '-')} {path}: file does not exist")
    return args


# ---------------------------------------------------------------------------------------- groups
def add_data_flags(p: argparse.ArgumentParser, *, train: bool, default_aug: Optional[str] = None,
                   image_size: Optional[int] = 224, cache_modes: Sequence[str] = ("no", "full", "part"),
                   eval_batch: bool = False, crop: Optional[float] = 0.08) -> None:
    """Dataset, augmentation and loader flags. ``train``: with the training augmentation flags
    (``default_aug`` None: the method's); ``image_size`` None: taken from the checkpoint;
    ``eval_batch``: a ``--batch-size`` for feature extraction; ``crop``: the default ``--crop`` (None:
    the method's, else the release's pretraining 0.2; linear evaluation: 0.08 as the release)."""
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", type=str, default="./data", help="dataset root: <dir>/train/<class>/<img> "
                   "(+ val), or with --zip train.zip, train_map.txt, val.zip, val_map.txt")
    g.add_argument("--zip", action="store_true", help="read the ImageNet-Zip layout")
    g.add_argument("--cache-mode", type=str, default="no", choices=list(cache_modes),
                   help="keep encoded images in RAM: all of them, or only this rank's shard (part)")
    g.add_argument("--strict-data", action="store_true", help="(new) a corrupt image stops the run "
                   "instead of being replaced and counted")
    g.add_argument("--index-dir", type=str, default=None, help="(new) where the dataset's index files go when the "
                   "data folder is read-only (default: next to the data, else ~/.cache/contrast/index)")
    size_help = "crop size (large crop for MultiCrop)" if image_size else \
        "(new) crop size (default: the --image-size the checkpoint was pretrained with)"
    g.add_argument("--image-size", type=int, default=image_size, help=size_help)
    g.add_argument("--val-crop-fraction", type=float, default=None, help="(new) evaluation transform: resize "
                   "to image-size / fraction, centre-crop image-size; 1.0 keeps whole small images (default "
                   "0.875, or the checkpoint's)")
    g.add_argument("--num-workers", type=int, default=default_num_workers(),
                   help="DataLoader workers per process (default: the cores available to this process / local "
                        "processes, at most 8)")
    if eval_batch:
        g.add_argument("--batch-size", type=int, default=256, help="images per forward pass and process")
    if not train:
        return
    g.add_argument("--aug", type=str, default=default_aug, choices=AUGS, help="augmentation recipe")
    g.add_argument("--crop", type=float, default=crop, help="minimum scale of RandomResizedCrop (MultiCrop: of "
                   "the small crops)")
    g.add_argument("--plain-aug", action="store_true", help="(new) run the whole augmentation in the "
                   "DataLoader workers (seed style) instead of colour ops batched on the device")


def add_multicrop_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-crop (--aug MultiCrop)")
    g.add_argument("--num-crop", type=int, default=None, help="MultiCrop: number of large crops (--image-size, "
                   "scale --crop2..1; default: the method's number of views)")
    g.add_argument("--image-size2", type=int, default=96,
                   help="MultiCrop: small crop size (with --image-size given: the recipe's ratio to it)")
    g.add_argument("--crop2", type=float, default=0.14, help="MultiCrop: max scale of the small crops "
                   "(and min scale of the large crops)")
    g.add_argument("--num-crop2", type=int, default=3, help="MultiCrop: number of small crops")


def add_sampler_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sliding-window data scheduler")
    g.add_argument("--use-sliding-window-sampler", action=argparse.BooleanOptionalAction, default=False,
                   help="sliding-window data scheduler (Cao et al. 2020)")
    g.add_argument("--window-size", type=int, default=131072, help="sliding window size W (all ranks)")
    g.add_argument("--window-stride", type=int, default=16384, help="sliding window stride S")
    g.add_argument("--shuffle-per-epoch", action=argparse.BooleanOptionalAction, default=False,
                   help="sliding window: new permutation per pass")


def add_backbone_flags(p: argparse.ArgumentParser, *, from_checkpoint: bool) -> None:
    """``--arch`` / ``--stem``; with ``from_checkpoint`` they default to the checkpoint's values."""
    g = p.add_argument_group("backbone")
    suffix = " (default: the checkpoint's)" if from_checkpoint else ""
    g.add_argument("--arch", type=str, default=None if from_checkpoint else "resnet50",
                   choices=BACKBONE_ARCHS, help="backbone (torchvision ResNet, timm ViT)" + suffix)
    g.add_argument("--stem", type=str, default=None if from_checkpoint else "imagenet", choices=STEMS,
                   help="(new) layers before layer1: imagenet = 7x7 stride-2 conv1 + max-pool; small = 3x3 "
                        "stride-1 conv1, no max-pool (28-32 px images); small-maxpool = 3x3 stride-1 conv1 + "
                        "max-pool" + suffix)
    g.add_argument("--small-stem", action="store_const", dest="stem", const="small", default=argparse.SUPPRESS,
                   help="deprecated alias of --stem small")
    if not from_checkpoint:
        g.add_argument("--zero-init-residual", action=argparse.BooleanOptionalAction, default=True,
                       help="(new flag, the release's init) zero the last batch-norm gamma of every residual block")
        add_vit_flags(g)
    if from_checkpoint:
        g.add_argument("--no-small-stem", action="store_const", dest="stem", const="imagenet",
                       default=argparse.SUPPRESS, help="deprecated alias of --stem imagenet")


def add_method_flags(p: argparse.ArgumentParser) -> None:
    """``--model``, the shared method flags, and one group per registered method: its recipe (the
    values the shared flags take when not given) and its own flags."""
    g = p.add_argument_group("method")
    g.add_argument("--model", type=str, default=next(iter(METHODS)), choices=list(METHODS),
                   help="method (the first registered one, as the release)")
    g.add_argument("--feature-dim", type=int, default=None, help="embedding dimension" + RECIPE_NOTE)
    g.add_argument("--mlp-head", action=argparse.BooleanOptionalAction, default=None,
                   help="2-layer MLP projection head" + RECIPE_NOTE)
    g.add_argument("--mlp-hidden-dim", type=int, default=None, help="(new flag, the release's width) hidden width "
                   "of the MLP head, for every backbone" + RECIPE_NOTE)
    g.add_argument("--contrast-temperature", type=float, default=None, help="softmax temperature" + RECIPE_NOTE)
    g.add_argument("--contrast-momentum", type=float, default=None, help="memory-bank momentum, key-encoder "
                   "momentum or base target decay, as the method uses it" + RECIPE_NOTE)
    g.add_argument("--contrast-num-negative", type=int, default=None, help="negatives per sample or queue "
                   "length, as the method uses it" + RECIPE_NOTE)
    g.add_argument("--view-batching", type=str, default=None, choices=VIEW_BATCHING,
                   help="(new) separate: one forward pass per view, each view its own batch-norm batch (the "
                        "release); joint: equal-sized views concatenated into one batch" + RECIPE_NOTE)
    added: Dict[str, Flag] = {}
    for cls in METHODS.values():
        recipe = textwrap.fill(f"recipe: {describe(cls.recipe)}; {vit_recipe_note(cls)}", 100, subsequent_indent="  ",
                               break_on_hyphens=False)
        mg = p.add_argument_group(f"--model {cls.name}", recipe)
        for flag in cls.flags:
            if added.get(flag.name) is flag:   # inherited from a registered parent class (MoCo v2's from v1)
                continue
            if flag.name in added:
                raise ValueError(f"{cls.name}: flag {flag.name} is already declared by another method")
            added[flag.name] = flag
            _add_flag(mg, flag)


def _add_flag(group, flag: Flag) -> None:
    kwargs: Dict[str, Any] = {"default": flag.default, "help": flag.help, "dest": flag.dest}
    if flag.type is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = flag.type
        if flag.choices is not None:
            kwargs["choices"] = list(flag.choices)
        if flag.nargs is not None:
            kwargs["nargs"] = flag.nargs
    group.add_argument(flag.name, **kwargs)


def add_schedule_flags(p: argparse.ArgumentParser, *, default_epochs: int) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=default_epochs, help="number of training epochs")
    g.add_argument("--start-epoch", type=int, default=1, help="first epoch (overridden by a resumed checkpoint)")
    g.add_argument("--lr-scheduler", type=str, default="cosine", choices=["cosine", "step"],
                   help="per-iteration schedule after warm-up: cosine towards 1e-6, or step decay")
    g.add_argument("--cosine-form", type=str, default="release", choices=list(COSINE_FORMS),
                   help="(new) release: cosine over (epochs - warm-up) x iterations, the last step stays just above "
                        "1e-6 (the release); reach-min: the last step uses exactly 1e-6")
    g.add_argument("--warmup-epoch", type=int, default=5, help="epochs of linear warm-up")
    g.add_argument("--warmup-multiplier", type=float, default=100,
                   help="warm-up starts at lr / multiplier and reaches lr after --warmup-epoch "
                        "(GradualWarmupScheduler semantics of the release)")
    g.add_argument("--lr-decay-epochs", type=int, default=[120, 160, 200], nargs="+",
                   help="step schedule: epochs at which the lr is multiplied by --lr-decay-rate")
    g.add_argument("--lr-decay-rate", type=float, default=0.1, help="step schedule decay factor")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD / LARS momentum")
    g.add_argument("--amp-opt-level", type=str, default="auto", choices=list(OPT_LEVELS), help=AMP_HELP)
    g.add_argument("--max-nonfinite", type=int, default=10, help="(new) stop after this many consecutive "
                   "steps with a non-finite loss (each is skipped on all ranks)")
    g.add_argument("--on-divergence", type=str, default="stop", choices=["stop", "rollback"],
                   help="(new) after --max-nonfinite consecutive non-finite losses: stop (exit code 1), or roll "
                        "back to the last good checkpoint in-process, skip the diverged batches, multiply the lr "
                        "by --rollback-lr-factor and go on (docs/resilience.md)")
    g.add_argument("--rollback-lr-factor", type=float, default=0.5,
                   help="(new) --on-divergence rollback: multiply the peak lr by this factor, in (0, 1], at each "
                        "rollback")
    g.add_argument("--channels-last", action="store_true", help="(new) channels-last memory format")
    g.add_argument("--compile", action="store_true", help="(new) torch.compile the backbone "
                   "(nn.Module.compile, checkpoint keys unchanged; needs a C compiler on the CPU; skipped "
                   "with a warning where SyncBatchNorm runs on several ranks, pytorch#107372)")
    g.add_argument("--deterministic", action="store_true", help="(new) deterministic kernels "
                   "(torch.use_deterministic_algorithms, cudnn.benchmark off): repeatable, slower; by default "
                   "CUDA runs with cudnn.benchmark")


def add_runtime_flags(p: argparse.ArgumentParser, *, output_dir: Optional[str] = "./output",
                      checkpoints: bool = True) -> None:
    """Output, device, seed, launcher and error-reporting flags (``checkpoints``: resume/save flags)."""
    g = p.add_argument_group("io and runtime")
    g.add_argument("--output-dir", type=str, default=output_dir, help="logs, config.json, results and checkpoints")
    if checkpoints:
        g.add_argument("--auto-resume", action="store_true", help="continue from <output-dir>/current.pth if present")
        g.add_argument("--resume", type=str, default="", help="checkpoint to resume from")
        g.add_argument("--print-freq", type=int, default=100, help="log every N iterations")
        g.add_argument("--save-freq", type=int, default=10, help="write ckpt_epoch_<e>.pth every N epochs "
                       "(current.pth is written every epoch)")
        g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                       help="(new) TensorBoard scalars in <output-dir>")
    add_device_flag(g)
    add_seed_flag(g)
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=-1,
                   help="set by torch.distributed.launch; torchrun uses LOCAL_RANK")
    add_debug_flag(g)


def add_device_flag(g) -> None:
    g.add_argument("--device", type=str, default="auto", help="(new) auto (cuda:<local_rank> if available, "
                   "else cpu), cpu, cuda or cuda:<i>")


def add_seed_flag(g) -> None:
    g.add_argument("--seed", "--rng-seed", dest="seed", type=int, default=0, help="(new) random seed")


def add_debug_flag(g) -> None:
    g.add_argument("--debug", action="store_true", help="(new) show the full traceback of an error instead of "
                   "one line (it is always written to the log file, where there is one)")


def add_output_json_flag(g, default: str, *aliases: str, note: str = "") -> None:
    """``--output-json`` (results as JSON; ``aliases``: the tool's earlier names)."""
    g.add_argument("--output-json", *aliases, dest="output_json", type=str, default=default,
                   help="write the results as JSON to this file" + note
                        + (f"; {', '.join(aliases)} is an alias" if aliases else ""))


def add_dataset_output_flag(g) -> None:
    """``--data-dir`` of a tool that writes a dataset: the root the training scripts' --data-dir then reads."""
    g.add_argument("--data-dir", "--out", dest="data_dir", type=str, required=True,
                   help="dataset root to write (what --data-dir of main_pretrain.py then reads); --out is an alias")


class ListAction(argparse.Action):
    """Several values, as separate words and/or comma lists (``--arch resnet18,resnet50`` equals
    ``--arch resnet18 resnet50``), each converted by ``item_type`` and checked against ``item_choices``."""

    def __init__(self, option_strings, dest, item_type=str, item_choices=None, **kwargs) -> None:
        kwargs.setdefault("nargs", "+")
        super().__init__(option_strings, dest, **kwargs)
        self.item_type, self.item_choices = item_type, item_choices

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        items = [v for value in values for v in str(value).split(",") if v]
        try:
            items = [self.item_type(v) for v in items]
        except ValueError as e:
            parser.error(f"{option_string}: {e}")
        bad = [v for v in items if self.item_choices is not None and v not in self.item_choices]
        if bad:
            parser.error(f"{option_string}: {', '.join(map(str, bad))} not among "
                         f"{', '.join(map(str, self.item_choices))}")
        setattr(namespace, self.dest, items)


def add_checkpoint_flags(p: argparse.ArgumentParser) -> None:
    """Long runs: checkpoints inside an epoch, how many epoch checkpoints to keep, restarting over
    existing checkpoints and resuming with another total batch (see docs/resilience.md)."""
    g = p.add_argument_group("checkpoints and recovery (new)")
    g.add_argument("--save-every-minutes", type=float, default=30.0, help="(new) also write current.pth between "
                   "two steps every this many minutes (0: only at epoch ends); a resume continues mid-epoch")
    g.add_argument("--keep-last", type=int, default=0, help="(new) keep only the newest N ckpt_epoch_<e>.pth "
                   "(0: keep all)")
    g.add_argument("--restart", action="store_true", help="(new) start from scratch although --output-dir holds "
                   "checkpoints (they are moved to <output-dir>/superseded-<time>, nothing is deleted)")
    g.add_argument("--allow-batch-change", action="store_true", help="(new) resume with another total batch "
                   "(per-process batch x processes) than the checkpoint's: the peak lr is rescaled and the "
                   "schedule continues by samples seen (refused otherwise)")


def add_pretrained_flag(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--pretrained-model", "--checkpoint", dest="pretrained_model", type=str, default="",
                   required=required, help="pretraining checkpoint of any method (its backbone. tensors; arch, "
                   "stem and image size from its config unless given); --checkpoint is an alias")


def add_knn_flags(p: argparse.ArgumentParser, *, monitor: bool) -> None:
    g = p.add_argument_group("kNN monitor (new)" if monitor else "kNN")
    if monitor:
        g.add_argument("--knn-monitor", action="store_true", help="(new) weighted kNN top-1/top-5 of the backbone "
                       "on the val split every --knn-freq epochs (console, TensorBoard, best kept)")
        g.add_argument("--knn-freq", type=int, default=1, help="(new) epochs between kNN monitor evaluations")
        g.add_argument("--knn-k", type=int, default=200, help="(new) kNN monitor: neighbours")
    else:
        g.add_argument("--knn-k", type=int, nargs="+", default=[200], help="neighbours; several values share "
                       "one feature extraction (Wu et al. 2018: 200)")
        g.add_argument("--chunk-size", type=int, default=1024, help="queries per similarity block (memory bound)")
    g.add_argument("--knn-t", type=float, default=0.07, help="temperature T of the exp(sim / T) weights")


# ---------------------------------------------------------------------------------------- parsers
def _method_epilog() -> str:
    return ("Each method's recipe (its group above; the values not listed there are the release's defaults, "
            "shown with each flag after 'else') fills every flag marked \"the method's recipe\" that is not "
            "given; a flag given on the command line overrides it. The peak lr is --base-learning-rate x total batch / 256 "
            "(--lr-scaling linear) or x sqrt(total batch) (sqrt); the total batch is batch-size x world-size. "
            "With --use-sliding-window-sampler, --epochs, --warmup-epoch and --lr-decay-epochs count plain "
            "epochs and are mapped to window-epochs ceil(e x N / window-size); --save-freq counts window-epochs.")


def pretrain_parser() -> argparse.ArgumentParser:
    p = new_parser("main_pretrain.py", "Unsupervised pretraining (" + ", ".join(METHODS) + "). Launch with plain "
                   "python (one process), torchrun or python -m torch.distributed.launch.", _method_epilog())
    add_data_flags(p, train=True, crop=None)
    add_multicrop_flags(p)
    add_sampler_flags(p)
    add_backbone_flags(p, from_checkpoint=False)
    add_method_flags(p)
    add_schedule_flags(p, default_epochs=100)
    g = p.add_argument_group("pretraining optimiser")
    g.add_argument("--batch-size", type=int, default=64, help="batch size per process")
    g.add_argument("--base-learning-rate", "--base-lr", dest="base_learning_rate", type=float, default=0.03,
                   help="lr for a total batch of 256 (see --lr-scaling)")
    g.add_argument("--lr-scaling", type=str, default="linear", choices=list(LR_SCALINGS),
                   help="(new) peak lr = base lr x total batch / 256 (linear, the release) or base lr x "
                        "sqrt(total batch) (sqrt, google-research/simclr's option)")
    g.add_argument("--optimizer", type=str, default="sgd", choices=list(OPTIMIZERS),
                   help="LARS: no decay or adaptation on biases and BN parameters, trust coefficient 0.001 (state "
                        "a method updates itself with its own optimiser is not affected); AdamW: no decay on "
                        "biases, norms and the backbone's no-decay tensors (ViT: pos_embed, cls_token)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay")
    g.add_argument("--weight-decay-end", type=float, default=None, help="(new) weight decay of every group that has "
                   "decay follows a cosine from --weight-decay to this value over the run (none: constant)")
    g.add_argument("--clip-grad", type=float, default=0.0, help="(new) clip each parameter's gradient norm to this "
                   "value, each on its own (not the total norm), before the optimiser step; 0: off")
    g.add_argument("--lars-form", type=str, default="release", choices=list(LARS_FORMS),
                   help="(new) release: SGD momentum on the trust-scaled gradient, w -= lr * v, eps 1e-8 (the "
                        "release); fold-lr: the lr folded into the momentum buffer (the TensorFlow LARS of "
                        "google-research/simclr)")
    g.add_argument("--lars-trust-coefficient", type=float, default=0.001, help="(new) LARS trust coefficient")
    g.add_argument("--lars-eps", type=float, default=None, help="(new) LARS: added to the trust-ratio denominator "
                   "(default: 1e-8 for the release form, 0 for fold-lr)")
    add_knn_flags(p, monitor=True)
    add_monitor_flags(p)
    add_runtime_flags(p)
    add_checkpoint_flags(p)
    add_config_flag(p)
    base = Recipe().flag_values()
    for action in p._actions:   # resolved from the method's recipe after parsing
        if action.dest in FLAG_FIELDS:
            action.default = None
            value = base[action.dest]
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            action.help = (action.help or "").replace(RECIPE_NOTE, "") + f"{RECIPE_NOTE[:-1]}, else {shown})"
    return p


# ---------------------------------------------------------------------------------------- checks
def default_num_workers() -> int:
    """DataLoader workers per process: the CPUs this process may use, shared by the processes of this
    machine (``LOCAL_WORLD_SIZE``), at most 8 (the release used 4)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(0, min(8, cpus // local - 1))


def check_values(p: argparse.ArgumentParser, args: argparse.Namespace, positive: Sequence[str]) -> None:
    for name in positive:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.num_workers < 0:
        p.error(f"--num-workers must be >= 0, got {args.num_workers}")
    if getattr(args, "save_every_minutes", 0) < 0 or getattr(args, "keep_last", 0) < 0:
        p.error("--save-every-minutes and --keep-last must be >= 0")
    if getattr(args, "rollback_lr_factor", None) is not None and not 0 < args.rollback_lr_factor <= 1:
        p.error(f"--rollback-lr-factor must be in (0, 1], got {args.rollback_lr_factor}")
    if getattr(args, "val_crop_fraction", None) is not None and not 0 < args.val_crop_fraction <= 1:
        p.error(f"--val-crop-fraction must be in (0, 1], got {args.val_crop_fraction}")
    if (getattr(args, "warmup_epoch", None) or 0) < 0 or (getattr(args, "warmup_multiplier", None) or 1) < 1:
        p.error("--warmup-epoch must be >= 0 and --warmup-multiplier >= 1")
    if getattr(args, "crop", None) is not None and not 0 < args.crop <= 1:
        p.error(f"--crop must be in (0, 1], got {args.crop}")
    if min(getattr(args, "clip_grad", None) or 0, getattr(args, "weight_decay_end", None) or 0) < 0:
        p.error(f"--clip-grad and --weight-decay-end must be >= 0, got {args.clip_grad} and {args.weight_decay_end}")


def flags_typed(p: argparse.ArgumentParser, argv: Sequence[str]) -> set:
    """The dests of the flags written in ``argv`` (not those a ``--config`` file or a recipe set)."""
    dests = {option: a.dest for a in p._actions for option in a.option_strings}
    names = (token.split("=", 1)[0] for token in argv)
    return {dests[name] for name in names if name in dests}


def parse_pretrain_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse pretraining flags (over the values of ``--config FILE``); those not given take the
    method's recipe values."""
    p = pretrain_parser()
    args = parse_with_config(p, argv)
    cls = METHODS[args.model]
    for key, value in resolve(recipe_of(p, cls, args.arch), vars(args), args.epochs).items():
        setattr(args, key, value)
    check_values(p, args, ["epochs", "print_freq", "save_freq", "image_size", "batch_size", "max_nonfinite",
                           "knn_freq", "monitor_collapse_freq"])
    if args.aug in MULTI_CROP_AUGS and not cls.views.multi_crop:
        p.error(f"--aug {args.aug} (multi-crop) is not supported by --model {args.model}")
    if args.num_crop is not None and args.num_crop != 1 and args.aug not in MULTI_CROP_AUGS:
        p.error(f"--num-crop counts the large crops of --aug MultiCrop; --model {args.model} with --aug {args.aug} "
                f"takes {cls.views.count} view(s)")
    typed = flags_typed(p, sys.argv[1:] if argv is None else argv)
    ignored = [f"--{d.replace('_', '-')}" for d in ("image_size2", "crop2", "num_crop2") if d in typed]
    if ignored and args.aug not in MULTI_CROP_AUGS:
        p.error(f"{' and '.join(ignored)} {'sets' if len(ignored) == 1 else 'set'} the small crops of a multi-crop "
                f"--aug ({', '.join(MULTI_CROP_AUGS)}); --model {args.model} with --aug {args.aug} has none")
    if args.num_crop is None:  # the method's view count with MultiCrop; else unused (the release's 1)
        args.num_crop = cls.views.count if args.aug in MULTI_CROP_AUGS else 1
    if args.num_crop < 1 or args.num_crop2 < 0:
        p.error(f"need --num-crop >= 1 and --num-crop2 >= 0, got {args.num_crop} and {args.num_crop2}")
    if args.aug in MULTI_CROP_AUGS and not args.crop < args.crop2:
        p.error(f"--aug {args.aug} needs --crop (small crops' minimum scale) < --crop2, got {args.crop} and "
                f"{args.crop2}; the release's recipe (scripts/PIC.sh) uses --crop 0.08 --crop2 0.14")
    if args.val_crop_fraction is None:
        args.val_crop_fraction = 0.875
    if args.use_sliding_window_sampler and not 1 <= args.window_stride <= args.window_size:
        p.error(f"need 1 <= --window-stride <= --window-size, got {args.window_stride} and {args.window_size}")
    try:
        cls.check_config(method_config(args))
    except ValueError as e:
        p.error(str(e))
    return args


def run_config(args: argparse.Namespace, world_size: int = 1) -> RunConfig:
    """The typed groups of parsed pretraining flags, for ``world_size`` processes: built once by the
    entry script, which hands each layer its group."""
    return RunConfig(method=method_config(args, world_size), **groups_from_flags(vars(args)))


def resolve_pretrain(model: str, *flags: str, world_size: int = 1) -> Tuple[argparse.Namespace, MethodConfig]:
    """``main_pretrain.py --model model *flags`` resolved: (all flags, the method's typed configuration for
    ``world_size`` processes). The one way benchmarks, tools and tests obtain a method's configuration."""
    args = parse_pretrain_args(["--model", model, *flags])
    return args, method_config(args, world_size)


# ---------------------------------------------------------------------------------------- resolved values
def method_config(args: argparse.Namespace, world_size: int = 1) -> MethodConfig:
    """The typed configuration of ``--model`` from parsed pretraining flags, for ``world_size`` processes."""
    cls = METHODS[args.model]
    total_batch = args.batch_size * world_size
    window = args.use_sliding_window_sampler
    return MethodConfig(
        name=args.model, backbone=backbone_config(args),
        feature_dim=args.feature_dim, mlp_head=bool(args.mlp_head), head_hidden_dim=args.mlp_hidden_dim,
        temperature=args.contrast_temperature,
        momentum=args.contrast_momentum, num_negative=args.contrast_num_negative,
        view_batching=args.view_batching, multi_crop=args.aug in MULTI_CROP_AUGS,
        num_crop=args.num_crop if args.aug in MULTI_CROP_AUGS else cls.views.count, seed=args.seed,
        optimizer_momentum=args.momentum, weight_decay=args.weight_decay,
        peak_lr=peak_lr(args.base_learning_rate, total_batch, args.lr_scaling), total_batch_size=total_batch,
        window_size=args.window_size if window else 0, window_stride=args.window_stride if window else 0,
        output_dir=args.output_dir, options={f.dest: getattr(args, f.dest) for f in cls.flags})
