"""What a comparison runs: one job per (row, seed), its folder and the command lines of its stages.

A row is a method (``LABEL`` or ``LABEL=MODEL`` of ``--methods``: ``MODEL`` a registered method,
``LABEL`` its name in the table and its folders) or a baseline. Each method row's pretraining
command is, in this order (argparse keeps the last value of a flag given twice):

    main_pretrain.py [--config RECIPES/<LABEL or MODEL>.yaml] --model MODEL
        <the comparison's defaults: data, device, workers, kNN monitor, prints, no epoch copies>
        <--pretrain-args> <--set LABEL FLAGS>
        --epochs E --seed S --output-dir OUT/runs/<LABEL>-s<S> --auto-resume

so the recipe file is read first, flags given to every run override it, a method's own flags
override those, and what the comparison controls (budget, seed, folder) comes last.
"""
from __future__ import annotations

import math
import os
import shlex
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from contrast.data import build_dataset, window_epochs
from contrast.models import METHODS

#: Flags a comparison sets itself; ``--pretrain-args`` and ``--set`` may not give them.
CONTROLLED = ("--epochs", "--seed", "--rng-seed", "--output-dir", "--auto-resume", "--resume", "--restart",
              "--data-dir", "--config", "--model")
#: The pretraining defaults of a comparison (``--pretrain-args`` / ``--set`` override them): no
#: ``ckpt_epoch_<e>.pth`` copies (``current.pth`` is written every epoch), a log line every 20 steps.
DEFAULT_PRETRAIN = ("--save-freq", "1000000", "--print-freq", "20")
#: Baseline rows (``--baselines``).
BASELINES = ("raw-pixels", "random-init")


@dataclass(frozen=True)
class Budget:
    """Per run: ``images`` seen (whole epochs, rounded up) and/or wall-clock ``minutes`` of pretraining;
    ``epochs``: the schedule's length when only ``minutes`` is given."""

    images: Optional[int] = None
    minutes: Optional[float] = None
    epochs: Optional[int] = None

    def __post_init__(self) -> None:
        if self.images is None and self.minutes is None:
            raise ValueError("give a budget: --budget-images N and/or --budget-minutes M")
        if self.images is not None and self.images < 1:
            raise ValueError(f"--budget-images must be >= 1, got {self.images}")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"--budget-minutes must be > 0, got {self.minutes}")
        if self.images is None and not self.epochs:
            raise ValueError("--budget-minutes alone needs --epochs E (the length of the lr schedule the "
                             "run is stopped in)")

    def plain_epochs(self, num_images: int) -> int:
        """Plain epochs of a run over ``num_images`` images: ``ceil(images / N)``, else ``epochs``."""
        if self.images is not None:
            return max(1, -(-self.images // num_images))
        return int(self.epochs)

    def describe(self) -> str:
        parts = []
        if self.images is not None:
            parts.append(f"{self.images} images seen")
        if self.minutes is not None:
            parts.append(f"{self.minutes:g} min of pretraining")
        if self.images is None:
            parts.append(f"schedule of {self.epochs} epochs")
        return ", ".join(parts) + " per run"


@dataclass(frozen=True)
class MethodRow:
    label: str
    model: str
    recipe_file: Optional[str]
    flags: Tuple[str, ...]          # --set LABEL FLAGS


@dataclass
class Job:
    """One run folder: ``kind`` is ``pretrain`` (a method) or ``baseline``."""

    name: str                       # folder under OUT/runs
    row: str                        # table row
    seed: int
    kind: str
    folder: str
    pretrain_argv: List[str] = field(default_factory=list)   # main_pretrain.py flags (pretrain jobs)
    encoder_flags: List[str] = field(default_factory=list)   # main_knn.py flags naming what is evaluated
    loop_epochs: int = 0
    plain_epochs: int = 0


def parse_methods(specs: Sequence[str], recipes: Optional[str], overrides: Sequence[Sequence[str]]
                  ) -> List[MethodRow]:
    """``LABEL`` or ``LABEL=MODEL`` per entry, with the recipe file of the folder ``recipes``
    (``<LABEL>.yaml``, else ``<MODEL>.yaml``; none: the method's full recipe) and ``--set`` flags."""
    rows, seen = [], set()
    flags: Dict[str, List[str]] = {}
    for label, text in overrides:
        flags.setdefault(label, []).extend(split_flags(text, f"--set {label}"))
    for spec in specs:
        label, _, model = spec.partition("=")
        model = model or label
        if model not in METHODS:
            raise ValueError(f"--methods {spec}: {model} is no registered method ({', '.join(METHODS)})")
        if label in seen or label.startswith("baseline") or "/" in label:
            raise ValueError(f"--methods {spec}: the label {label!r} is repeated, reserved or not a folder name")
        seen.add(label)
        recipe = None
        if recipes:
            for name in (label, model):
                path = os.path.join(recipes, f"{name}.yaml")
                if os.path.isfile(path):
                    recipe = path
                    break
        rows.append(MethodRow(label, model, recipe, tuple(flags.pop(label, ()))))
    if flags:
        raise ValueError(f"--set {', '.join(flags)}: no such --methods label")
    return rows


def split_flags(text: str, where: str) -> List[str]:
    """Shell-split ``text``; a flag the comparison sets itself is refused (naming ``where``)."""
    tokens = shlex.split(text)
    for token in tokens:
        if token.split("=", 1)[0] in CONTROLLED:
            raise ValueError(f"{where}: {token.split('=', 1)[0]} is set by the comparison")
    return tokens


def count_images(data_dir: str, zip_mode: bool) -> int:
    """Training images of ``data_dir`` (the index main_pretrain.py builds anyway)."""
    return len(build_dataset(data_dir, "train", zip_mode, "no", None))


def monitor_freq(loop_epochs: int, points: int) -> int:
    """Loop epochs between kNN monitor evaluations for ``points`` of them per run (and one at its end)."""
    return max(1, math.ceil(loop_epochs / max(points, 1)))


def loop_epochs_of(args, plain: int, num_images: int) -> int:
    """Loop epochs main_pretrain.py runs for ``plain`` epochs (sliding window: window-epochs)."""
    if args.use_sliding_window_sampler:
        return window_epochs(plain, num_images, args.window_size)
    return plain


@dataclass(frozen=True)
class Settings:
    """A comparison's plan inputs (the parsed command line)."""

    out: str
    data_dir: str
    zip: bool
    cache_mode: str
    num_workers: int
    device: str
    budget: Budget
    seeds: Tuple[int, ...]
    methods: Tuple[MethodRow, ...]
    pretrain_args: Tuple[str, ...] = ()
    baselines: Tuple[str, ...] = BASELINES
    monitor_points: int = 4
    monitor_k: int = 20


def pretrain_flags(s: Settings, row: MethodRow, monitor: Sequence[str] = ()) -> List[str]:
    """A method row's pretraining flags without the controlled ones (order: module docstring)."""
    data = [*(["--zip"] if s.zip else []), "--cache-mode", s.cache_mode, "--num-workers", str(s.num_workers),
            "--device", s.device]
    return [*(["--config", row.recipe_file] if row.recipe_file else []), "--model", row.model,
            *DEFAULT_PRETRAIN, *data, *monitor, *s.pretrain_args, *row.flags]


def build_jobs(s: Settings, resolve: Callable, num_images: Optional[int] = None) -> List[Job]:
    """Every job of the comparison, baselines first; ``resolve`` parses main_pretrain.py flags
    (``contrast.option.parse_pretrain_args``), so a bad recipe or override stops here, before any run."""
    n = num_images if num_images is not None else count_images(s.data_dir, s.zip)
    plain = s.budget.plain_epochs(n)
    methods, resolved = [], []
    for row in s.methods:
        args = _parse(resolve, pretrain_flags(s, row) + ["--data-dir", s.data_dir, "--epochs", str(plain)], row)
        loop = loop_epochs_of(args, plain, n)
        monitor = ["--knn-monitor", "--knn-k", str(s.monitor_k), "--knn-freq", str(monitor_freq(loop, s.monitor_points))] \
            if s.monitor_points > 0 else []
        for seed in s.seeds:
            name = f"{row.label}-s{seed}"
            folder = os.path.join(s.out, "runs", name)
            argv = pretrain_flags(s, row, monitor) + ["--data-dir", s.data_dir, "--epochs", str(plain),
                                                      "--seed", str(seed), "--output-dir", folder, "--auto-resume"]
            _parse(resolve, argv, row)
            methods.append(Job(name, row.label, seed, "pretrain", folder, argv,
                               ["--pretrained-model", os.path.join(folder, "current.pth")], loop, plain))
        resolved.append(args)
    return baseline_jobs(s, resolved) + methods


def baseline_jobs(s: Settings, resolved: Sequence) -> List[Job]:
    """Raw pixels (at the first method's image size and evaluation crop) and the random network (one row
    per distinct backbone of the methods), one job per seed."""
    if not resolved:
        return []
    first = resolved[0]
    view = ["--image-size", str(first.image_size)] + \
        (["--val-crop-fraction", str(first.val_crop_fraction)] if first.val_crop_fraction is not None else [])
    encoders: List[Tuple[str, List[str]]] = []
    if "raw-pixels" in s.baselines:
        encoders.append(("baseline-raw-pixels", ["--raw-pixels", *view]))
    if "random-init" in s.baselines:
        nets = list(dict.fromkeys((a.arch, a.stem) for a in resolved))
        for arch, stem in nets:
            name = "baseline-random-init" + (f"-{arch}-{stem}" if len(nets) > 1 else "")
            encoders.append((name, ["--random-init", "--arch", arch, "--stem", stem, *view]))
    return [Job(f"{row}-s{seed}", row, seed, "baseline", os.path.join(s.out, "runs", f"{row}-s{seed}"),
                encoder_flags=flags) for row, flags in encoders for seed in s.seeds]


def _parse(resolve: Callable, argv: List[str], row: MethodRow):
    try:
        return resolve(argv)
    except SystemExit as e:   # argparse printed why
        raise ValueError(f"--methods {row.label}: main_pretrain.py refuses its flags (see above): "
                         f"{' '.join(shlex.quote(a) for a in argv)}") from e
