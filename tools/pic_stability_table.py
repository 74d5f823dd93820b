"""Markdown table of PIC runs from their ``log.txt``: kNN monitor, loss and positive cosine.

For each run (an ``--output-dir`` of ``main_pretrain.py`` or its log file) it reads the lines
``train epoch [e/E] iter [i/I] ... loss <val> (<avg>) ... pos_sim <x> ...`` and
``knn epoch <e>: top-1 <acc> ...`` and reports

* kNN top-1: the peak and the last value of the monitor;
* the loss: the mean of the last epoch (the running average on its last line) and the largest
  epoch mean of the run (``ln N`` is the loss of a classifier that knows nothing);
* the positive cosine ``pos_sim`` (the batch's cosine to its own row, last line of each epoch):
  its value at the end and its minimum over the run;
* with ``--pic-diagnostics``: the minimum of ``diag/pos_cos_return`` (instances returning to the
  sliding window) and the last ``diag/feat_mean_norm`` (1 = all embeddings of a batch equal).

Usage::

    python tools/pic_stability_table.py --runs out/release out/centred --labels release centred
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from contrast import engine  # noqa: E402
from contrast.option import add_debug_flag, new_parser  # noqa: E402


def pic_stability_table_parser(doc: str = "") -> argparse.ArgumentParser:
    """``tools/pic_stability_table.py``."""
    p = new_parser("pic_stability_table.py", doc)
    p.add_argument("--runs", nargs="+", required=True, help="run output folders or log files")
    p.add_argument("--labels", nargs="+", default=None, help="one label per run (default: folder names)")
    p.add_argument("--output", default="", help="also write the table to this file")
    add_debug_flag(p)
    return p


_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"
_TRAIN = re.compile(rf"train epoch \[(\d+)/(\d+)\] iter \[(\d+)/(\d+)\] lr {_NUM} loss {_NUM} \({_NUM}\)")
_KNN = re.compile(rf"knn epoch (\d+): top-1 {_NUM}")


def _value(line: str, name: str) -> Optional[float]:
    m = re.search(rf" {re.escape(name)} {_NUM}(?= |$)", line.rstrip())
    return float(m.group(1)) if m else None


def summarize(path: str) -> Dict[str, float]:
    """The figures of one run (NaN where the log has none)."""
    log = os.path.join(path, "log.txt") if os.path.isdir(path) else path
    if not os.path.isfile(log):
        raise FileNotFoundError(f"--runs {path}: no log.txt")
    epoch_loss: List[float] = []
    pos: List[float] = []
    ret: List[float] = []
    feat: List[float] = []
    knn: List[float] = []
    epochs_done = planned = 0
    with open(log, "r", encoding="utf-8", errors="replace") as f:
        for line in f:
            m = _TRAIN.search(line)
            if m and m.group(3) == m.group(4):                 # last iteration of an epoch
                epochs_done, planned = int(m.group(1)), int(m.group(2))
                epoch_loss.append(float(m.group(7)))
                for name, store in (("pos_sim", pos), ("diag/pos_cos_return", ret), ("diag/feat_mean_norm", feat)):
                    v = _value(line, name)
                    if v is not None and not math.isnan(v):
                        store.append(v)
                continue
            m = _KNN.search(line)
            if m:
                knn.append(float(m.group(2)))
    if not epoch_loss:
        raise ValueError(f"--runs {path}: no training lines in {log}")
    nan = float("nan")
    return {"epochs": epochs_done, "planned": planned,
            "knn_peak": max(knn) if knn else nan, "knn_final": knn[-1] if knn else nan,
            "loss_final": epoch_loss[-1], "loss_max": max(epoch_loss),
            "pos_final": pos[-1] if pos else nan, "pos_min": min(pos) if pos else nan,
            "pos_return_min": min(ret) if ret else nan, "feat_mean_norm": feat[-1] if feat else nan}


COLUMNS = [("epochs", "epochs"), ("knn_peak", "kNN peak"), ("knn_final", "kNN final"),
           ("loss_final", "loss final"), ("loss_max", "loss max"), ("pos_final", "pos cos final"),
           ("pos_min", "pos cos min"), ("pos_return_min", "returning pos cos min"),
           ("feat_mean_norm", "|mean z| final")]


def table(rows: List[Dict[str, float]], labels: List[str]) -> str:
    head = "| run | " + " | ".join(c for _, c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for label, r in zip(labels, rows):
        cells = []
        for key, _ in COLUMNS:
            v = r[key]
            if key == "epochs":
                cells.append(f"{r['epochs']}/{r['planned']}")
            elif isinstance(v, float) and math.isnan(v):
                cells.append("-")
            else:
                cells.append(f"{v:.2f}" if key.startswith(("knn", "loss")) else f"{v:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> str:
    p = pic_stability_table_parser(__doc__)
    args = p.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        p.error(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
    labels = args.labels or [os.path.basename(os.path.normpath(r)) for r in args.runs]
    text = table([summarize(r) for r in args.runs], labels)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    engine.run_cli(main)
