"""``python -m contrast.compare``: the command line, and the comparison from plan to table and figure."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Dict, List, Optional

from contrast.compare.evaluations import KINDS, EvalSettings, plan_evaluations
from contrast.compare.figure import monitor_curve, plot_comparison
from contrast.compare.plan import BASELINES, Budget, Job, Settings, build_jobs, parse_methods, split_flags
from contrast.compare.report import collect, write_tables
from contrast.compare.runner import ComparisonError, Runner
from contrast.option import add_debug_flag, new_parser, parse_pretrain_args

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def compare_parser() -> argparse.ArgumentParser:
    p = new_parser("python -m contrast.compare", "A comparison of self-supervised methods under one budget per run, "
                   "over several seeds, with the raw-pixel and random-network baselines: one run folder per "
                   "(method, seed), resumable; one table (mean ± std) and one figure. See docs/comparison.md.")
    g = p.add_argument_group("what to compare")
    g.add_argument("--methods", nargs="+", required=True, metavar="LABEL[=METHOD]",
                   help="registered methods; LABEL=METHOD runs METHOD under the row name LABEL (a variant)")
    g.add_argument("--recipes", default="", metavar="DIR", help="folder of small-scale recipe files "
                   "<LABEL or METHOD>.yaml (e.g. scripts/configs/fmnist); a method without one runs its full recipe")
    g.add_argument("--set", nargs=2, action="append", default=[], metavar=("LABEL", "FLAGS"),
                   help="main_pretrain.py flags for one row, e.g. --set SimCLR '--contrast-temperature 0.2' (repeatable)")
    g.add_argument("--pretrain-args", default="", metavar="FLAGS", help="main_pretrain.py flags for every run")
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds: one run per (method, seed)")
    g.add_argument("--baselines", nargs="*", choices=BASELINES, default=list(BASELINES),
                   help="baseline rows (none: no baselines)")
    g = p.add_argument_group("data and machine")
    g.add_argument("--data-dir", required=True, help="pretraining data (its val split feeds the kNN monitor)")
    g.add_argument("--eval-data-dir", default="", help="evaluation data (default: --data-dir)")
    g.add_argument("--zip", action="store_true", help="both folders are in the ImageNet-Zip layout")
    g.add_argument("--cache-mode", default="no", choices=["no", "full"], help="dataset cache of every process")
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader workers of every process")
    g.add_argument("--device", default="auto", help="--device of every process")
    g.add_argument("--python", default=sys.executable, help="interpreter of the entry scripts")
    g = p.add_argument_group("budget (per run)")
    g.add_argument("--budget-images", type=int, default=None, metavar="N",
                   help="images seen in pretraining: ceil(N / training images) epochs")
    g.add_argument("--budget-minutes", type=float, default=None, metavar="M",
                   help="wall-clock minutes of pretraining (over all sittings); the run is stopped then")
    g.add_argument("--epochs", type=int, default=None, help="with --budget-minutes alone: the schedule's epochs")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", nargs="+", default=["knn", "probe"], metavar="KIND",
                   help=f"evaluation kinds: {', '.join(KINDS)} (default: knn probe)")
    g.add_argument("--knn-k", nargs="+", type=int, default=[20, 200], help="kNN neighbours (the monitor's k is added)")
    g.add_argument("--probe-epochs", type=int, default=100, help="cached-feature probe epochs")
    g.add_argument("--label-fraction", type=float, default=1.0, help="linear / finetune: fraction of the labels")
    g.add_argument("--knn-args", default="", metavar="FLAGS", help="more main_knn.py flags (knn, probe)")
    g.add_argument("--linear-args", default="", metavar="FLAGS", help="more main_linear.py flags (linear, finetune)")
    g.add_argument("--monitor-points", type=int, default=4, help="kNN monitor evaluations per pretraining run (0: off)")
    g.add_argument("--monitor-k", type=int, default=20, help="kNN monitor neighbours")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="comparison folder: runs/, results.{md,csv,json}, curves.png")
    g.add_argument("--title", default="", help="table and figure title")
    add_debug_flag(p)
    return p


#: the options whose value is a string of flags; (option, index of that value among the option's values)
FLAG_VALUES = {"--set": 1, "--pretrain-args": 0, "--knn-args": 0, "--linear-args": 0}


def protect_flag_values(argv: List[str]) -> List[str]:
    """argparse would take a flag string of one flag (``--set X --pic-head-center``) for an option of its
    own: such values get a leading space (shlex drops it)."""
    out = list(argv)
    for i, arg in enumerate(argv):
        if arg in FLAG_VALUES:
            j = i + 1 + FLAG_VALUES[arg]
            if j < len(out) and out[j].startswith("-"):
                out[j] = " " + out[j]
    return out


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = compare_parser()
    args = p.parse_args(protect_flag_values(sys.argv[1:] if argv is None else argv))
    if not 0 < args.label_fraction <= 1:
        p.error(f"--label-fraction must be in (0, 1], got {args.label_fraction}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds: repeated seed in {args.seeds}")
    return args


def plan(args: argparse.Namespace, num_images: Optional[int] = None):
    """``(settings, jobs, evaluations)`` of the parsed command line; raises ValueError in one line."""
    budget = Budget(args.budget_images, args.budget_minutes, args.epochs)
    methods = parse_methods(args.methods, args.recipes, args.set)
    settings = Settings(args.out, args.data_dir, args.zip, args.cache_mode, args.num_workers, args.device, budget,
                        tuple(args.seeds), tuple(methods), tuple(split_flags(args.pretrain_args, "--pretrain-args")),
                        tuple(args.baselines), args.monitor_points, args.monitor_k)
    knn_k = list(dict.fromkeys(args.knn_k + ([args.monitor_k] if args.monitor_points > 0 else [])))
    ev = EvalSettings(args.python, ROOT, args.eval_data_dir or args.data_dir, args.zip, args.cache_mode,
                      args.num_workers, args.device, knn_k, args.probe_epochs, args.label_fraction,
                      tuple(shlex.split(args.knn_args)), tuple(shlex.split(args.linear_args)))
    evaluations = plan_evaluations(args.eval, ev)
    jobs = build_jobs(settings, parse_pretrain_args, num_images)
    return settings, jobs, evaluations


def report(args: argparse.Namespace, settings: Settings, jobs: List[Job]) -> str:
    """Write the table and the figure from the finished jobs; returns the markdown table."""
    folders: Dict[str, List[str]] = {}
    for job in jobs:
        folders.setdefault(job.row, []).append(job.folder)
    rows = collect(folders)
    title = args.title or f"{', '.join(m.label for m in settings.methods)}: {settings.budget.describe()}, " \
                          f"seeds {' '.join(map(str, settings.seeds))}"
    text = write_tables(rows, args.out, title, {"argv": sys.argv[1:], "budget": settings.budget.describe(),
                                                 "data_dir": args.data_dir, "eval": args.eval})
    k = f"kNN top-1 k={args.monitor_k}"
    baselines = {r["row"]: r["metrics"][k][0] for r in rows if r["kind"] == "baseline" and k in r["metrics"]}
    curves = {m.label: [monitor_curve(j.folder) for j in jobs if j.row == m.label] for m in settings.methods}
    plot_comparison(curves, baselines, os.path.join(args.out, "curves.png"), title,
                    ylabel=f"kNN monitor top-1, k={args.monitor_k} (%)")
    return text


def main(argv: Optional[List[str]] = None, runner_factory=Runner) -> str:
    args = parse_args(argv)
    settings, jobs, evaluations = plan(args)
    os.makedirs(args.out, exist_ok=True)
    runner = runner_factory(args.out, args.python, ROOT, settings.budget, evaluations)
    print(f"[compare] {len(jobs)} runs ({sum(os.path.isfile(os.path.join(j.folder, 'result.json')) for j in jobs)} "
          f"finished already) in {args.out}/runs", flush=True)
    try:
        failed = runner.run(jobs)
    finally:   # also after a stop signal: the table of the runs finished so far
        text = report(args, settings, jobs)
    print(text, flush=True)
    print(f"[compare] table: {args.out}/results.md (.csv, .json), figure: {args.out}/curves.png", flush=True)
    if failed:
        raise ComparisonError(f"{len(failed)} run(s) failed: {', '.join(failed)} (their .out files say why); "
                              "rerun the same command to retry them")
    return text
