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
epoch; the training monitors (``docs/monitoring.md``) against the iteration when a run logged them:
``probe`` (the online probe's accuracy ``train/probe/acc``), ``collapse`` (``collapse/std_rel``,
``align``, ``uniform``) and ``rank`` (RankMe). ``--x progress`` puts every run on a common axis instead, the fraction of
the run done (iterations / its last iteration, epochs / its last epoch), which
compares runs of one budget whose epochs differ in length (PIC's sliding-window
epochs against plain ones). Each run has its own colour; several series of one run (top-1 / top-5,
kNN / linear) differ by line style. Per-epoch summaries (``epoch/*`` tags) are
skipped when the per-iteration series exist.

Training lines of ``log.txt`` may end with extra ``name value`` pairs after ``eta``
(``pos_sim 0.53 diag/pos_cos 0.41 ...``, the method's scalars); they are read as
``train/<name>``. ``--scalars PATTERN ...`` adds one panel per pattern (``fnmatch`` on the tag,
e.g. ``'train/diag/pos_cos*'``) with every matching scalar against the iteration; ``--panels``
chooses which of the four standard panels to draw (``--panels accuracy`` for an accuracy-only
figure); ``--hline VALUE=LABEL`` draws a horizontal reference line (e.g. a baseline's accuracy)
on the accuracy panel (``--hline loss:7.6=ln N`` on another panel).

Usage::

    python tools/plot_curves.py --runs output/PIC output/MoCo --labels PIC "MoCo v2" --output curves.png
    python tools/plot_curves.py --runs output/PIC --panels accuracy --hline "86.05=raw pixels" --output knn.png
    python tools/plot_curves.py --runs output/PIC --panels loss --scalars 'train/diag/pos_cos*' --output diag.png
"""
from __future__ import annotations

import argparse
import fnmatch
import glob
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from contrast import engine  # noqa: E402
from contrast.option import add_debug_flag, new_parser  # noqa: E402


#: The standard panels of ``tools/plot_curves.py``.
PANELS = ("loss", "lr", "throughput", "accuracy", "probe", "collapse", "rank")
#: Panels of the training monitors (docs/monitoring.md): drawn by default when a run has their scalars.
MONITOR_PANELS = ("probe", "collapse", "rank")


def plot_curves_parser(doc: str = "") -> argparse.ArgumentParser:
    p = new_parser("plot_curves.py", doc)
    p.add_argument("--runs", nargs="+", required=True, help="run output folders (or event / log files)")
    p.add_argument("--labels", nargs="+", default=None, help="one legend label per run (default: folder names)")
    p.add_argument("--output", default="curves.png", help="PNG file to write")
    p.add_argument("--title", default="", help="figure title")
    p.add_argument("--x", choices=("step", "progress"), default="step",
                   help="x axis: iteration / epoch, or the fraction of each run done (runs of one budget)")
    p.add_argument("--recursive", action="store_true", help="also read the event files of sub-folders (by "
                   "default only the run folder's own: a pretraining run's eval/ is another run)")
    p.add_argument("--panels", nargs="*", choices=PANELS, default=None,
                   help="standard panels to draw (none: only the --scalars panels; default: the first four, and "
                        "probe / collapse / rank when a run has the monitors' scalars)")
    p.add_argument("--scalars", nargs="+", default=[], metavar="PATTERN",
                   help="one extra panel per fnmatch pattern of scalar tags, e.g. 'train/diag/pos_cos*'")
    p.add_argument("--hline", action="append", default=[], metavar="[PANEL:]VALUE[=LABEL]",
                   help="horizontal reference line, on the accuracy panel unless PANEL (a panel name or a "
                        "--scalars pattern) is given (repeatable)")
    add_debug_flag(p)
    return p


Series = Dict[str, List[Tuple[float, float]]]   # name -> [(x, y), ...] sorted by x
_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"
_TRAIN = re.compile(rf"train epoch \[(\d+)/\d+\] iter \[(\d+)/(\d+)\] lr {_NUM} loss {_NUM}(?: \({_NUM}\))?"
                    rf"(?: images/s {_NUM})?")
_EXTRA = re.compile(rf"eta \S+((?: [\w/.-]+ {_NUM})+)\s*$")
_PAIR = re.compile(rf" ([\w/.-]+) {_NUM}")
_ACC = re.compile(rf"(\w+) epoch (\d+): top-1 {_NUM}(?: top-5 {_NUM})?")


def panel_of(name: str) -> Optional[str]:
    """Which panel a scalar belongs to (None: not plotted)."""
    leaf = name.rsplit("/", 1)[-1].lower()
    if "/probe/" in f"/{name}":
        return "probe" if leaf == "acc" else None
    if "/collapse/" in f"/{name}":
        return "rank" if leaf == "rank" else (None if leaf == "std" else "collapse")
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
                extra = _EXTRA.search(line)
                if extra:
                    for name, value in _PAIR.findall(extra.group(1)):
                        out.setdefault(f"train/{name}", []).append((step, float(value)))
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


def parse_hline(text: str) -> Tuple[str, float, str]:
    """``"86.05=raw pixels"`` -> ``("accuracy", 86.05, "raw pixels")``; ``"loss:7.6=ln N"`` puts the
    line on another panel (a standard panel's name or a ``--scalars`` pattern). The label is optional."""
    panel, value_label = "accuracy", text
    head, sep, tail = text.partition(":")
    if sep and not _is_number(head):
        panel, value_label = head, tail
    value, _, label = value_label.partition("=")
    if not _is_number(value):
        raise ValueError(f"--hline {text!r}: expected [PANEL:]VALUE[=LABEL]")
    return panel, float(value), label.strip()


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def plot_runs(runs: List[Tuple[str, Series]], output: str, title: str = "", x_axis: str = "step",
              panels: Sequence[str] = PANELS[:4], scalars: Sequence[str] = (),
              hlines: Sequence[Tuple[str, float, str]] = ()) -> Dict[str, int]:
    """Draw the panels for all runs into ``output`` (PNG); returns lines drawn per panel.

    ``x_axis``: ``step`` (iteration / epoch) or ``progress`` (see ``as_progress``); ``panels``: the
    standard panels drawn; ``scalars``: one extra panel per ``fnmatch`` pattern of tags (against the
    iteration); ``hlines``: ``(panel, value, label)`` horizontal reference lines."""
    names = [p for p in PANELS if p in panels] + list(scalars)
    if not names:
        raise ValueError("nothing to draw: no --panels and no --scalars")
    cols = 1 if len(names) == 1 else 2
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols + (2 if cols == 1 else 0), 4 * rows), squeeze=False)
    axes_of = dict(zip(names, axes.flat))
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    styles = ["-", "--", ":", "-."]
    drawn = {p: 0 for p in names}
    for colour, (label, series) in enumerate(runs):
        style_index: Dict[str, int] = {}
        if x_axis == "progress":
            series = as_progress(series)
        for name, points in sorted(series.items()):
            targets = [panel_of(name)] + [pat for pat in scalars if fnmatch.fnmatchcase(name, pat)]
            for panel in targets:
                if panel is None or panel not in axes_of or not points:
                    continue
                style = styles[style_index.setdefault(panel, 0) % len(styles)]
                style_index[panel] += 1
                xs, ys = zip(*points)
                axes_of[panel].plot(xs, ys, linestyle=style, color=f"C{colour % 10}", label=f"{label}: {name}",
                                    marker="o" if len(points) < 20 else None, markersize=3)
                drawn[panel] += 1
    for i, (panel, value, text) in enumerate(hlines):
        if panel not in axes_of:
            raise ValueError(f"--hline {panel}:{value:g}: no panel {panel!r} is drawn")
        axes_of[panel].axhline(value, color="0.3", linestyle=styles[(i + 1) % len(styles)], linewidth=1,
                               label=f"{text} ({value:g})" if text else f"{value:g}")
    with_lines = {panel for panel, _, _ in hlines}
    for panel, ax in axes_of.items():
        ax.set_title(panel)
        if x_axis == "progress":
            ax.set_xlabel("fraction of the run")
        else:
            ax.set_xlabel("epoch" if panel == "accuracy" else "iteration")
        ax.grid(alpha=0.3)
        if drawn[panel] or panel in with_lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    if "accuracy" in axes_of:
        axes_of["accuracy"].set_ylabel("%")
    if "throughput" in axes_of:
        axes_of["throughput"].set_ylabel("images/s")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return drawn


def default_panels(runs: List[Tuple[str, Series]]) -> List[str]:
    """The first four panels, and each monitor panel some run has scalars for."""
    found = {panel_of(name) for _, series in runs for name in series}
    return [p for p in PANELS if p not in MONITOR_PANELS or p in found]


def parse_args(argv: Optional[List[str]] = None):
    p = plot_curves_parser(__doc__)
    args = p.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        p.error(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
    try:
        args.hline = [parse_hline(h) for h in args.hline]
    except ValueError as e:
        p.error(str(e))
    if args.panels is not None and not args.panels and not args.scalars:
        p.error("nothing to draw: give --panels or --scalars")
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, int]:
    args = parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.normpath(r)) for r in args.runs]
    runs = [(label, load_run(path, args.recursive)) for label, path in zip(labels, args.runs)]
    panels = args.panels if args.panels is not None else default_panels(runs)
    drawn = plot_runs(runs, args.output, args.title, args.x, panels, args.scalars, args.hline)
    print(f"[plot] {args.output}: " + ", ".join(f"{p} {n} line(s)" for p, n in drawn.items()), flush=True)
    return drawn


if __name__ == "__main__":
    engine.run_cli(main)
