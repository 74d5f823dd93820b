"""Reading the runs of ``benchmarks/gpu_check.py``: their logs and final checkpoints, the status
of each row, and the markdown table.

A row is judged from what its processes leave behind: the exit code, the ``train epoch`` lines and
warnings of ``log.txt`` (the format of ``contrast.engine.Trainer``), the final ``current.pth`` (epoch,
step, GradScaler state) and ``main_knn.py``'s result JSON.
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Tuple

#: GradScaler's initial scale and growth interval (torch's defaults, which contrast.precision keeps)
INIT_SCALE, GROWTH_INTERVAL = 2.0 ** 16, 2000
#: neighbours of the kNN monitor and of main_knn.py in the check
KNN_K = 5
OK, FAILED, NOT_RUN = "ok", "FAILED", "NOT RUN"
#: statuses that do not fail the check (a setting the device cannot run, or outside the --tiny subset)
NOT_APPLICABLE = ("n/a on cpu", "not in --tiny")

_TRAIN = re.compile(r"train epoch \[(\d+)/(\d+)\] iter \[(\d+)/(\d+)\] lr \S+ loss (\S+) \((\S+)\) "
                    r"images/s (\S+) data \S+ mem (\S+)MB")


def train_lines(log: str) -> List[Dict[str, float]]:
    """Every ``train epoch`` line of a log: epoch, iteration, loss, mean loss, images/s, mem (MiB)."""
    return [{"epoch": int(m[1]), "iter": int(m[3]), "loss": float(m[5]), "avg_loss": float(m[6]),
             "images_per_s": float(m[7]), "mem_mb": float(m[8])} for m in _TRAIN.finditer(log)]


def nonfinite_skips(log: str) -> int:
    """Steps the loop skipped for a non-finite loss (one warning each)."""
    return len(re.findall(r"non-finite loss at epoch \d+ iteration \d+: step skipped", log))


def resumed_from(log: str) -> Optional[Tuple[int, int]]:
    """(epoch, step) of the last ``resumed from`` line, or None."""
    found = re.findall(r"resumed from \S+ \(epoch (\d+), step (\d+)", log)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def scaler_skipped(scaler: Optional[dict], steps: int) -> Optional[int]:
    """Optimiser steps the GradScaler skipped, from its saved state after ``steps`` steps: each skip
    multiplies the scale by the backoff factor, and below ``growth_interval`` real steps it never grows.
    None when that cannot be told (a longer run, or no scaler)."""
    if not scaler or steps >= scaler.get("growth_interval", GROWTH_INTERVAL):
        return None
    ratio = math.log(INIT_SCALE / float(scaler["scale"])) / -math.log(scaler.get("backoff_factor", 0.5))
    return int(round(ratio))


def judge(s, rc: Optional[int], log: str, ckpt: Optional[dict], epochs: int, *, killed: bool = False,
          resume_log: str = "", timed_out: bool = False, knn_json: Optional[dict] = None) -> Dict:
    """Status and figures of a finished row (``ckpt``: the final ``current.pth`` as a dict)."""
    problems, row = [], {}
    if timed_out:
        problems.append("cut short by the time budget")
    elif rc != 0:
        problems.append(f"exit code {rc}")
    lines = train_lines(resume_log or log)
    if lines:
        row["images_per_s"] = lines[-1]["images_per_s"]
        row["peak_mem_mb"] = max(x["mem_mb"] for x in lines)
    elif s.kind != "knn" and not problems:
        problems.append("no 'train epoch' line in the log")
    if any(not math.isfinite(x["loss"]) or not math.isfinite(x["avg_loss"]) for x in train_lines(log + resume_log)):
        problems.append("non-finite loss in the log")
    if s.kind == "pretrain":
        if s.kill and not killed:
            problems.append("the run ended before the kill (no SIGKILL after a checkpoint)")
        if s.kill and resumed_from(resume_log) is None:
            problems.append("no 'resumed from' line after the kill")
        elif s.kill:
            row["resumed_from"] = "epoch {}, step {}".format(*resumed_from(resume_log))
        if s.knn_monitor:
            top1 = re.findall(r"knn epoch \d+: top-1 (\S+)", log + resume_log)
            if top1:
                row["knn_top1"] = float(top1[-1])
            else:
                problems.append("no kNN monitor line")
        if ckpt is None:
            problems.append("no final checkpoint")
        else:
            row["steps"] = steps = int(ckpt["step"])
            if int(ckpt["epoch"]) != epochs:
                problems.append(f"final checkpoint at epoch {ckpt['epoch']}, not {epochs}")
            skipped = nonfinite_skips(log + resume_log)
            scaled = scaler_skipped(ckpt.get("scaler"), steps)
            if ckpt.get("scaler") is not None:
                row["scaler_skipped"] = scaled
                skipped += scaled or 0
            row["skipped_steps"] = skipped
            if steps - (scaled or 0) <= 0:
                problems.append(f"all {steps} steps skipped" + (" by the GradScaler" if scaled else ""))
    elif s.kind == "linear":
        found = re.findall(r"linear evaluation done: last top-1 (\S+)", log)
        if found:
            row["top1"] = float(found[-1])
        elif not problems:
            problems.append("no 'linear evaluation done' line")
    elif s.kind == "knn":
        if knn_json and knn_json.get("knn"):
            row["top1"] = knn_json["knn"][str(KNN_K)]["top1"]
            row["images_per_s"] = (knn_json["num_train"] + knn_json["num_val"]) / max(knn_json["extract_seconds"],
                                                                                       1e-9)
        elif not problems:
            problems.append("no kNN result JSON")
    row["status"] = FAILED if problems else OK
    if problems:
        row["error"] = "; ".join(problems)
    return row


def failures(rows: List[Dict]) -> List[str]:
    """One line per row that failed or was not run (n/a rows are not failures)."""
    return [f"{r['name']}: {r['status']} {r.get('error') or r.get('reason') or ''}".strip()
            for r in rows if r["status"] not in (OK,) + NOT_APPLICABLE]


def table(rows: List[Dict], batch: int) -> str:
    """Markdown: setting, status, images/s, steps/s (of ``batch`` images), skipped steps, peak memory,
    seconds, detail."""
    out = ["| setting | status | images/s | steps/s | skipped steps | peak mem (MiB) | s | detail |",
           "|---|---|---:|---:|---:|---:|---:|---|"]

    def num(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) and v is not None else "-"
    for r in rows:
        ips = r.get("images_per_s")
        sps = ips / batch if ips is not None and r.get("kind") != "knn" else None
        skipped = r.get("skipped_steps")
        if skipped is not None and r.get("steps") is not None:
            skipped = f"{skipped} of {r['steps']}"
        detail = r.get("error") or r.get("reason") or "; ".join(
            f"{name} {r[k]:.1f}" if isinstance(r[k], float) else f"{name} {r[k]}"
            for k, name in (("resumed_from", "resumed from"), ("knn_top1", "kNN monitor top-1"), ("top1", "top-1"))
            if k in r)
        out.append(f"| {r['name']} | {r['status']} | {num(ips, '.0f')} | {num(sps, '.2f')} | "
                   f"{skipped if skipped is not None else '-'} | {num(r.get('peak_mem_mb'), '.0f')} | "
                   f"{num(r.get('seconds'), '.0f')} | {detail} |")
    return "\n".join(out)
