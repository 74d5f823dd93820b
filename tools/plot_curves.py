"""Plot training curves of one or several runs: loss, learning rate, throughput, kNN/linear accuracy.

A run is an ``--output-dir`` of ``main_pretrain.py`` / ``main_linear.py`` (or a
single file). Its scalars are read from the TensorBoard event files in it
(``EventAccumulator``) when there are any, otherwise from its ``log.txt``. Only the
folder's own files count: the linear evaluation that ``scripts/<METHOD>.sh`` writes
to ``OUT/eval`` is a run of its own (``--recursive`` reads sub-folders too). Lines read
from ``log.txt``:

* ``train epoch [e/E] iter [i/I] lr <lr> loss <val> (<avg>) images/s <ips> ...``
  (step ``(e - 1) * I + i``), and
* ``<name> epoch <e>: top-1 <acc> top-5 <acc>`` (``val`` = linear evaluation,
  ``knn`` = the kNN monitor), at epoch ``e``.

Panels: loss, lr and images/s against the iteration; accuracies against the
epoch. ``--x progress`` puts every run on a common axis instead, the fraction of
the run done (iterations / its last iteration, epochs / its last epoch), which
compares runs of one budget whose epochs differ in length (PIC's sliding-window
epochs against plain ones). Each run has its own colour; several series of one run (top-1 / top-5,
kNN / linear) differ by line style. Per-epoch summaries (``epoch/*`` tags) are
skipped when the per-iteration series exist.

Usage::

    python tools/plot_curves.py --runs output/PIC output/MoCo --labels PIC "MoCo v2" --output curves.png
"""
from __future__ import annotations

import glob
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from contrast import engine  # noqa: E402
from contrast.option import plot_curves_parser  # noqa: E402

Series = Dict[str, List[Tuple[float, float]]]   # name -> [(x, y), ...] sorted by x
PANELS = ("loss", "lr", "throughput", "accuracy")
_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"
_TRAIN = re.compile(rf"train epoch \[(\d+)/\d+\] iter \[(\d+)/(\d+)\] lr {_NUM} loss {_NUM}(?: \({_NUM}\))?"
                    rf"(?: images/s {_NUM})?")
_ACC = re.compile(rf"(\w+) epoch (\d+): top-1 {_NUM}(?: top-5 {_NUM})?")


def panel_of(name: str) -> Optional[str]:
    """Which panel a scalar belongs to (None: not plotted)."""
    leaf = name.rsplit("/", 1)[-1].lower()
    if leaf == "lr":
        return "lr"
    if "images_per_s" in leaf or "throughput" in leaf:
        return "throughput"
    if re.search(r"top-?[15]|acc[15]?$", leaf):
        return "accuracy"
    if "loss" in leaf:
        return "loss"
    return None


def read_tensorboard(files: List[str]) -> Series:
    """Every scalar tag of the event files, as ``{tag: [(step, value)]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # only for event files

    out: Series = {}
    for path in files:
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, []).extend((float(e.step), float(e.value)) for e in acc.Scalars(tag))
    return {k: sorted(v) for k, v in out.items()}


def read_log(path: str) -> Series:
    """The training and accuracy lines of a ``log.txt`` (format in the module docstring)."""
    out: Series = {}
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for line in f:
            m = _TRAIN.search(line)
            if m:
                epoch, it, iters = int(m.group(1)), int(m.group(2)), int(m.group(3))
                step = float((epoch - 1) * iters + it)
                out.setdefault("train/lr", []).append((step, float(m.group(4))))
                out.setdefault("train/loss", []).append((step, float(m.group(5))))
                if m.group(7) is not None:
                    out.setdefault("train/images_per_s", []).append((step, float(m.group(7))))
                continue
            m = _ACC.search(line)
            if m:
                name, epoch = m.group(1), float(m.group(2))
                out.setdefault(f"{name}/top1", []).append((epoch, float(m.group(3))))
                if m.group(4) is not None:
                    out.setdefault(f"{name}/top5", []).append((epoch, float(m.group(4))))
    return {k: sorted(v) for k, v in out.items()}


def event_files(path: str, recursive: bool = False) -> List[str]:
    """The TensorBoard event files of the folder ``path`` (and of its sub-folders with ``recursive``)."""
    pattern = os.path.join(path, "**", "events.out.tfevents.*") if recursive else \
        os.path.join(path, "events.out.tfevents.*")
    return sorted(glob.glob(pattern, recursive=recursive))


def load_run(path: str, recursive: bool = False) -> Series:
    """Scalars of a run folder (its TensorBoard events preferred, else its ``log.txt``; ``recursive``:
    the events of its sub-folders too) or of one file."""
    if os.path.isfile(path):
        series = read_tensorboard([path]) if "tfevents" in os.path.basename(path) else read_log(path)
    elif os.path.isdir(path):
        events = event_files(path, recursive)
        log = os.path.join(path, "log.txt")
        if events:
            series = read_tensorboard(events)
        elif os.path.isfile(log):
            series = read_log(log)
        else:
            nested = "" if recursive or not event_files(path, True) else \
                " (its sub-folders have some: pass one of them, or --recursive)"
            raise FileNotFoundError(f"--runs {path}: no TensorBoard event files and no log.txt in it{nested}")
    else:
        raise FileNotFoundError(f"--runs {path}: no such file or folder")
    if not series:
        raise ValueError(f"--runs {path}: no scalars found (is it a contrast output folder?)")
    leaves_per_iter = {k.rsplit("/", 1)[-1] for k in series if not k.startswith("epoch/")}
    return {k: v for k, v in series.items()
            if not (k.startswith("epoch/") and k.rsplit("/", 1)[-1] in leaves_per_iter)}


def as_progress(series: Series) -> Series:
    """The same series with x divided by the run's last x: iterations by the last iteration of the
    iteration panels, epochs by the last epoch of the accuracy panel (so both end at 1.0)."""
    last: Dict[bool, float] = {}
    for name, points in series.items():
        if points and panel_of(name) is not None:
            per_epoch = panel_of(name) == "accuracy"
            last[per_epoch] = max(last.get(per_epoch, 0.0), points[-1][0])
    out: Series = {}
    for name, points in series.items():
        panel = panel_of(name)
        end = last.get(panel == "accuracy", 0.0) if panel is not None else 0.0
        out[name] = [(x / end, y) for x, y in points] if end > 0 else list(points)
    return out


def plot_runs(runs: List[Tuple[str, Series]], output: str, title: str = "", x_axis: str = "step") -> Dict[str, int]:
    """Draw the four panels for all runs into ``output`` (PNG); returns lines drawn per panel.
    ``x_axis``: ``step`` (iteration / epoch) or ``progress`` (see ``as_progress``)."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    axes_of = dict(zip(PANELS, axes.flat))
    styles = ["-", "--", ":", "-."]
    drawn = {p: 0 for p in PANELS}
    for colour, (label, series) in enumerate(runs):
        style_index: Dict[str, int] = {}
        if x_axis == "progress":
            series = as_progress(series)
        for name, points in sorted(series.items()):
            panel = panel_of(name)
            if panel is None or not points:
                continue
            style = styles[style_index.setdefault(panel, 0) % len(styles)]
            style_index[panel] += 1
            xs, ys = zip(*points)
            axes_of[panel].plot(xs, ys, linestyle=style, color=f"C{colour % 10}", label=f"{label}: {name}",
                                marker="o" if len(points) < 20 else None, markersize=3)
            drawn[panel] += 1
    for panel, ax in axes_of.items():
        ax.set_title(panel)
        if x_axis == "progress":
            ax.set_xlabel("fraction of the run")
        else:
            ax.set_xlabel("epoch" if panel == "accuracy" else "iteration")
        ax.grid(alpha=0.3)
        if drawn[panel]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    axes_of["accuracy"].set_ylabel("%")
    axes_of["throughput"].set_ylabel("images/s")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return drawn


def parse_args(argv: Optional[List[str]] = None):
    p = plot_curves_parser(__doc__)
    args = p.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        p.error(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, int]:
    args = parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.normpath(r)) for r in args.runs]
    runs = [(label, load_run(path, args.recursive)) for label, path in zip(labels, args.runs)]
    drawn = plot_runs(runs, args.output, args.title, args.x)
    print(f"[plot] {args.output}: " + ", ".join(f"{p} {n} line(s)" for p, n in drawn.items()), flush=True)
    return drawn


if __name__ == "__main__":
    engine.run_cli(main)
