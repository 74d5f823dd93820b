"""The evaluation kinds of a comparison (``--eval``): each runs one entry script on a run's checkpoint
(or on a baseline) and reads its metrics, ``{column: value}``.

* ``knn``: weighted kNN top-1 (``main_knn.py``) for each ``--knn-k``;
* ``probe``: the same call with the cached-feature linear probe (``--linear-cached``), so it also
  gives the kNN columns; with both, one call serves both;
* ``linear``: the standard linear protocol (``main_linear.py``, augmented images through the frozen
  backbone), on ``--label-fraction`` of the labels when < 1;
* ``finetune``: ``main_linear.py --finetune`` (the whole network), on ``--label-fraction`` of the labels.

A kind whose flags the checked-out ``main_linear.py`` lacks is refused when the comparison is
parsed, in one line. A new kind is a subclass of :class:`Evaluation` entered in :data:`KINDS`.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence

from contrast.option_eval import linear_parser


@dataclass(frozen=True)
class EvalSettings:
    """What every evaluation of a comparison shares."""

    python: str
    root: str                     # folder of main_knn.py / main_linear.py
    data_dir: str
    zip: bool
    cache_mode: str
    num_workers: int
    device: str
    knn_k: Sequence[int] = (20, 200)
    probe_epochs: int = 100
    label_fraction: float = 1.0
    knn_args: Sequence[str] = ()      # more main_knn.py flags
    linear_args: Sequence[str] = ()   # more main_linear.py flags

    def data_flags(self) -> List[str]:
        return ["--data-dir", self.data_dir, *(["--zip"] if self.zip else []), "--cache-mode", self.cache_mode,
                "--num-workers", str(self.num_workers), "--device", self.device]


@dataclass(frozen=True)
class Target:
    """What one evaluation looks at: ``encoder``, the main_knn.py flags naming it (a checkpoint or a
    baseline), ``checkpoint`` (None for a baseline), ``seed`` and ``work`` (a folder of its own)."""

    encoder: Sequence[str]
    checkpoint: Optional[str]
    seed: int
    work: str


class Evaluation:
    """One kind: ``command`` (argv after the interpreter) and ``metrics`` (read once it exited with 0)."""

    name = ""
    #: main_knn.py evaluates the baselines too; a main_linear.py kind needs a checkpoint.
    baselines = False

    def __init__(self, settings: EvalSettings) -> None:
        self.settings = settings

    def check(self, linear_flags: FrozenSet[str]) -> None:
        """Raise ValueError (one line) when the entry scripts cannot run this kind."""

    def command(self, target: Target) -> List[str]:
        raise NotImplementedError

    def metrics(self, target: Target) -> Dict[str, float]:
        raise NotImplementedError


class KnnEvaluation(Evaluation):
    """``main_knn.py``: kNN top-1 per k, and the cached probe's top-1 with ``probe``."""

    baselines = True

    def __init__(self, settings: EvalSettings, probe: bool) -> None:
        super().__init__(settings)
        self.probe = probe
        self.name = "probe" if probe else "knn"

    def command(self, target: Target) -> List[str]:
        s = self.settings
        probe = ["--linear-cached", "--linear-epochs", str(s.probe_epochs)] if self.probe else []
        return [os.path.join(s.root, "main_knn.py"), *target.encoder, *s.data_flags(), "--seed", str(target.seed),
                "--knn-k", *map(str, s.knn_k), *probe, *s.knn_args, "--output", os.path.join(target.work, "knn.json")]

    def metrics(self, target: Target) -> Dict[str, float]:
        with open(os.path.join(target.work, "knn.json")) as f:
            result = json.load(f)
        out = {f"kNN top-1 k={k}": float(v["top1"]) for k, v in result["knn"].items()}
        if self.probe:
            out["probe top-1"] = float(result["linear"]["top1"])
        return out


_DONE = re.compile(r"evaluation done: last top-1 ([\d.]+) top-5 ([\d.]+), best top-1 ([\d.]+)")


class LinearEvaluation(Evaluation):
    """``main_linear.py`` (resumable: ``--auto-resume``); its last epoch's top-1 from its log."""

    name = "linear"
    needs: tuple = ()
    column = "linear top-1"

    def _needs(self) -> List[str]:
        return list(self.needs) + (["--label-fraction"] if self.settings.label_fraction < 1 else [])

    def check(self, linear_flags: FrozenSet[str]) -> None:
        missing = [f for f in self._needs() if f not in linear_flags]
        if missing:
            raise ValueError(f"--eval {self.name}: main_linear.py has no {' '.join(missing)} flag in this checkout")

    def command(self, target: Target) -> List[str]:
        s = self.settings
        fraction = ["--label-fraction", str(s.label_fraction)] if s.label_fraction < 1 else []
        return [os.path.join(s.root, "main_linear.py"), *self.needs, "--pretrained-model", target.checkpoint,
                *s.data_flags(), *fraction, "--seed", str(target.seed), "--no-tensorboard", *s.linear_args,
                "--output-dir", target.work, "--auto-resume"]

    def metrics(self, target: Target) -> Dict[str, float]:
        with open(os.path.join(target.work, "log.txt"), encoding="utf-8", errors="replace") as f:
            done = [m for m in map(_DONE.search, f) if m]
        if not done:
            raise ValueError(f"{target.work}/log.txt: no 'evaluation done' line")
        suffix = f" ({self.settings.label_fraction:g} of labels)" if self.settings.label_fraction < 1 else ""
        return {self.column + suffix: float(done[-1].group(1))}


class FinetuneEvaluation(LinearEvaluation):
    name = "finetune"
    needs = ("--finetune",)
    column = "fine-tune top-1"


#: ``--eval`` choices: name -> factory.
KINDS: Dict[str, Callable[[EvalSettings], Evaluation]] = {
    "knn": lambda s: KnnEvaluation(s, probe=False),
    "probe": lambda s: KnnEvaluation(s, probe=True),
    "linear": LinearEvaluation,
    "finetune": FinetuneEvaluation,
}


def linear_flags() -> FrozenSet[str]:
    """Every option string of the checked-out ``main_linear.py``."""
    return frozenset(s for action in linear_parser()._actions for s in action.option_strings)


def plan_evaluations(names: Sequence[str], settings: EvalSettings,
                     available: Optional[FrozenSet[str]] = None) -> List[Evaluation]:
    """The evaluations of ``names`` (``knn`` is dropped when ``probe``, which gives it too, is chosen),
    each checked against ``available`` (default: :func:`linear_flags`)."""
    unknown = [n for n in names if n not in KINDS]
    if unknown:
        raise ValueError(f"--eval {' '.join(unknown)}: unknown (choose from {', '.join(KINDS)})")
    chosen = [n for n in dict.fromkeys(names) if not (n == "knn" and "probe" in names)]
    evaluations = [KINDS[n](settings) for n in chosen]
    flags = linear_flags() if available is None else available
    for e in evaluations:
        e.check(flags)
    return evaluations
