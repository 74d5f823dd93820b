"""The comparison's table: one row per method or baseline, mean ± standard deviation over seeds.

The standard deviation is the sample one (divisor n - 1); with one seed it is not defined and the
cell shows the mean alone. ``write_tables`` writes ``results.md``, ``results.csv`` (mean and std in
columns of their own) and ``results.json`` (every seed's value too).
"""
from __future__ import annotations

import csv
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

from contrast.compare.runner import read_json, write_json


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (n - 1; NaN for fewer than two values)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def fmt(mean: float, std: float, digits: int = 2) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def collect(folders: Dict[str, List[str]]) -> List[dict]:
    """Per row (``{row: [job folders]}``, in order) the statistics of its finished jobs' ``result.json``."""
    rows = []
    for row, paths in folders.items():
        results = [r for r in (read_json(os.path.join(p, "result.json")) for p in paths) if r is not None]
        columns: Dict[str, List[float]] = {}
        for r in results:
            for name, value in r["metrics"].items():
                columns.setdefault(name, []).append(float(value))
        stats = {}
        for key in ("images_seen", "pretrain_seconds", "eval_seconds", "epoch"):
            values = [float(r[key]) for r in results if r.get(key) is not None]
            if values:
                stats[key] = mean_std(values)
        rows.append({"row": row, "kind": results[0]["kind"] if results else "", "seeds": [r["seed"] for r in results],
                     "planned": len(paths), "metrics": {k: (*mean_std(v), v) for k, v in columns.items()},
                     "stats": stats, "loop_epochs": next((r.get("loop_epochs") for r in results), None),
                     "stopped_by": sorted({r["stopped_by"] for r in results if r.get("stopped_by")})})
    return rows


def metric_names(rows: Sequence[dict]) -> List[str]:
    return list(dict.fromkeys(name for r in rows for name in r["metrics"]))


def _stat(row: dict, key: str, scale: float = 1.0, digits: int = 0) -> str:
    if key not in row["stats"]:
        return "-"
    mean, std = row["stats"][key]
    return fmt(mean * scale, std * scale, digits)


def markdown(rows: Sequence[dict], title: str = "") -> str:
    names = metric_names(rows)
    head = ["method", "seeds", "images seen", "epochs", "pretrain min / run", "eval s / run", "stopped by", *names]
    lines = ([title, ""] if title else []) + ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        epochs = "-" if "epoch" not in r["stats"] else \
            f"{r['stats']['epoch'][0]:g}/{r['loop_epochs'] if r['loop_epochs'] is not None else '?'}"
        cells = [r["row"], f"{len(r['seeds'])}/{r['planned']}", _stat(r, "images_seen"), epochs,
                 _stat(r, "pretrain_seconds", 1 / 60, 1), _stat(r, "eval_seconds", 1, 0),
                 ", ".join(r["stopped_by"]) or "-",
                 *[fmt(*r["metrics"][n][:2]) if n in r["metrics"] else "-" for n in names]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(rows: Sequence[dict], out: str, title: str = "", settings: Optional[dict] = None) -> str:
    """Write ``results.md``, ``results.csv`` and ``results.json`` into ``out``; returns the markdown."""
    text = markdown(rows, title)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    names = metric_names(rows)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        stat_keys = ("images_seen", "epoch", "pretrain_seconds", "eval_seconds")
        w.writerow(["method", "seeds", *[f"{k} {s}" for k in stat_keys for s in ("mean", "std")],
                    *[f"{n} {s}" for n in names for s in ("mean", "std")]])
        for r in rows:
            stats = [_num(v) for k in stat_keys for v in r["stats"].get(k, (math.nan, math.nan))]
            w.writerow([r["row"], len(r["seeds"]), *stats,
                        *[_num(v) for n in names for v in r["metrics"].get(n, (math.nan, math.nan))[:2]]])
    write_json(os.path.join(out, "results.json"), {
        "title": title, "settings": settings or {},
        "rows": [{"method": r["row"], "kind": r["kind"], "seeds": r["seeds"], "stopped_by": r["stopped_by"],
                  "loop_epochs": r["loop_epochs"],
                  **{k: {"mean": _num(m), "std": _num(s)} for k, (m, s) in r["stats"].items()},
                  "metrics": {n: {"mean": _num(m), "std": _num(s), "values": v}
                              for n, (m, s, v) in r["metrics"].items()}} for r in rows]})
    return text


def _num(v: float):
    """JSON / CSV value: NaN as None / empty."""
    return None if isinstance(v, float) and math.isnan(v) else round(v, 4)
