"""The comparison's figure: each method's kNN monitor (top-1) against the images seen, one thin line
per seed and their mean in bold, with each baseline's kNN top-1 as a horizontal line."""
from __future__ import annotations

import os
import re
import textwrap
from typing import Dict, List, Optional, Sequence, Tuple

from contrast.runconfig import flat_config

_MONITOR = re.compile(r"knn epoch (\d+): top-1 ([-\d.]+|nan)")


def monitor_curve(folder: str) -> List[Tuple[int, float]]:
    """``[(images seen, top-1)]`` of a pretraining run folder: its ``knn epoch E`` log lines, E loop
    epochs of ``iters_per_epoch x total_batch`` images (the last line of an epoch logged twice wins)."""
    log, config = os.path.join(folder, "log.txt"), os.path.join(folder, "config.json")
    if not (os.path.isfile(log) and os.path.isfile(config)):
        return []
    cfg = flat_config(config)
    per_epoch = int(cfg["iters_per_epoch"]) * int(cfg["total_batch"])
    points: Dict[int, float] = {}
    with open(log, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = _MONITOR.search(line)
            if m:
                points[int(m.group(1)) * per_epoch] = float(m.group(2))
    return sorted(points.items())


def plot_comparison(curves: Dict[str, Sequence[List[Tuple[int, float]]]], baselines: Dict[str, float],
                    output: str, title: str = "", ylabel: str = "kNN top-1 (%)") -> int:
    """Draw ``curves`` (``{row: [curve per seed]}``) and ``baselines`` (``{row: value}``) into ``output``
    (PNG); returns the number of method lines drawn (seeds and means)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    palette = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    drawn = 0
    for i, (row, seeds) in enumerate(curves.items()):
        colour = palette(i % palette.N)
        seeds = [c for c in seeds if c]
        for curve in seeds:
            xs, ys = zip(*curve)
            ax.plot(xs, ys, color=colour, alpha=0.35, linewidth=0.8, marker="o", markersize=2)
            drawn += 1
        mean = _mean_curve(seeds)
        if mean:
            xs, ys = zip(*mean)
            ax.plot(xs, ys, color=colour, linewidth=2, label=f"{row} (mean of {len(seeds)})")
            drawn += 1
    styles = ["--", ":", "-.", (0, (5, 1))]
    for i, (row, value) in enumerate(baselines.items()):
        ax.axhline(value, color="0.3", linestyle=styles[i % len(styles)], linewidth=1, label=f"{row} ({value:.2f})")
    ax.set_xlabel("images seen")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn or baselines:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    if title:
        ax.set_title(textwrap.fill(title, 100), fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return drawn


def _mean_curve(curves: Sequence[List[Tuple[int, float]]]) -> Optional[List[Tuple[int, float]]]:
    """Point-wise mean over the x values every curve has (seeds of one recipe share them)."""
    if not curves:
        return None
    common = set.intersection(*(set(x for x, _ in c) for c in curves))
    values = [dict(c) for c in curves]
    return [(x, sum(v[x] for v in values) / len(values)) for x in sorted(common)]
