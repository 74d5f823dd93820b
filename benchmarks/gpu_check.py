"""The first-GPU-run check: the real entry scripts, run as a user runs them, on a generated dataset.

Every row of the check is one or two processes of ``main_pretrain.py``, ``main_linear.py`` or
``main_knn.py`` (subprocesses, their own command lines) on a tiny image-folder dataset written by
``tools/make_demo_dataset.py``, with DataLoader workers and the device augmentation stage (never
``--plain-aug``). The plan comes from the registry (``contrast.models.METHODS``) and each class's
declarations: one pretraining setting per method with its own ``--aug``, plus ``--aug MultiCrop``
for a method whose ``views`` accept it (with the release's multi-crop ``--crop 0.08``); the methods'
own defaults are kept (no per-method flags; ``--tiny`` cuts MLP widths above 2048 to 2048, so that
8192-wide projectors fit the CPU budget). The kill is a SIGKILL of every process of the run at once
(torchrun, each rank's own session, the DataLoader workers); rows are judged in
``benchmarks/gpu_check_report.py``.

* every setting in fp32 (with ``--knn-monitor``), fp16 (``--amp-opt-level O1``: fp16 + GradScaler
  on CUDA; "n/a on cpu") and bf16 (``O2``);
* every setting on a ViT (``vit_small`` patch 8 at 64 px; ``--tiny``: ``vit_tiny`` patch 4 at 32 px,
  the first setting only) with the method's ViT recipe in bf16, the first one killed and resumed;
* save, SIGKILL after the first committed checkpoint (its manifest exists), ``--auto-resume`` to the
  end: the fp16 run of every setting on a GPU, the fp32 run of the first one on a CPU;
* ``main_linear.py`` and ``main_knn.py`` on the checkpoint of that resumed run;
* with 2+ GPUs, every setting on 2 processes over NCCL (torchrun), the first one killed and resumed
  on 1 process that sees 1 GPU (same total batch); on a CPU (``--tiny``) one gloo pair, the first
  setting whose class declares ``sync_batchnorm``, killed and resumed on 1 process.

A row passes when its processes exit 0 (the killed one by our SIGKILL), the final checkpoint holds
the last epoch, every logged loss is finite, the kNN monitor / resume / evaluation lines are in the
log, and some optimiser steps were real: GradScaler-skipped steps are counted from the checkpoint's
scaler state (every skip halves the scale from 2**16; no growth before 2000 steps) plus the
non-finite-loss skips the log warns about, and an fp16 run whose steps were all skipped FAILS. A row
not started because the time budget would be exceeded is NOT RUN and fails the check, as does one
the budget cuts short. images/s: the last epoch's mean from ``log.txt`` (all ranks); peak memory:
the log's ``mem`` (peak CUDA memory allocated; peak RSS on a CPU), rank 0.

    bash benchmarks/gpu_check.sh            # one GPU: ResNet-50, 64 px, batch 32; --time-budget 480 s
    bash benchmarks/gpu_check.sh --tiny     # CPU (CI): ResNet-18, 32 px, batch 16, a subset, every method once

The markdown table is printed and written, with the rest, as JSON (``--out``; paths in it are
relative to the work folder: a temporary one deleted at the end unless ``--keep-work``, or
``--workdir``). Exit code 0: every row passed or is n/a; 1: a row failed or was not run; 2: full mode
without CUDA, a non-empty ``--workdir`` or no method matching ``--methods``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

from benchmarks.gpu_check_report import (FAILED, KNN_K, NOT_RUN, OK, failures, judge,  # noqa: E402
                                         table)
from contrast.checkpoint import CheckpointError, load_file  # noqa: E402
from contrast.models import METHODS  # noqa: E402
from contrast.models.backbone_factory import recipe_for  # noqa: E402
from contrast.models.views import MULTI_CROP_AUG, MULTI_CROP_AUGS  # noqa: E402
from contrast.option import new_parser  # noqa: E402
from tools.make_demo_dataset import make_dataset  # noqa: E402


def gpu_check_parser(doc: str = "") -> argparse.ArgumentParser:
    """``benchmarks/gpu_check.py``."""
    p = new_parser("gpu_check.py", doc)
    p.add_argument("--tiny", action="store_true", help="CPU, ResNet-18 at 32 px, a subset in which every method "
                   "runs (CI)")
    p.add_argument("--device", default=None, help="default: cuda (full mode needs it), cpu for --tiny")
    p.add_argument("--output-json", "--out", dest="out", default=None,
                   help="JSON output (default benchmarks/results/gpu_check[_tiny].json; --out: alias)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds for the whole check: a row that would "
                   "not fit is NOT RUN (a failure) (default 480 on one GPU, +180 with 2+ GPUs, 600 with --tiny)")
    p.add_argument("--methods", nargs="*", default=None, help="only these methods or settings (default: all)")
    p.add_argument("--workdir", default=None, help="an empty or new folder for the data and the runs, kept "
                   "(default: a temporary one)")
    p.add_argument("--keep-work", action="store_true", help="keep the temporary work folder (logs, the evaluated "
                   "checkpoint)")
    return p


SCRIPTS = ("main_pretrain.py", "main_linear.py", "main_knn.py")
PRECISIONS = {"fp32": "O0", "fp16": "O1", "bf16": "O2"}
#: --crop of a --aug MultiCrop setting added to a method whose own recipe has other crop scales: the
#: release's multi-crop recipe (small crops 0.08-0.14, large 0.14-1; scripts/PIC.sh)
MULTI_CROP_SCALE = 0.08


@dataclass(frozen=True)
class Mode:
    name: str
    arch: str
    image_size: int
    image_size2: int        # MultiCrop's small crops
    num_crop2: int
    batch: int              # total over the processes of a run (one-process MoCo splits it into 8 BN groups)
    epochs: int
    kill_epochs: int        # the killed-and-resumed runs (killed after their first checkpoint)
    data_px: int
    train_per_class: int    # x 10 classes (tools/make_demo_dataset.py)
    val_per_class: int
    workers: int
    subset: bool            # bf16 and kill/resume only for the first setting (the others "not in --tiny")
    budget_s: float         # one device; 2+ GPUs add MULTI_GPU_BUDGET_S
    process_s: float        # guessed seconds of one process until one has been timed
    head_cap: int = 0       # > 0: recipes' --mlp-hidden-dim / --feature-dim above it are cut to it (CPU time)
    vit_arch: str = "vit_tiny"   # the ViT rows' backbone and patch side (image_size / patch: an 8 x 8 grid)
    vit_patch: int = 4


TINY = Mode("tiny", "resnet18", 32, 24, 2, 16, 2, 3, 40, 8, 2, 2, True, 600.0, 10.0, 2048)
FULL = Mode("full", "resnet50", 64, 32, 2, 32, 2, 3, 80, 32, 8, 2, False, 480.0, 12.0, 0, "vit_small", 8)
MULTI_GPU_BUDGET_S = 180.0


@dataclass
class Setting:
    """One row: a pretraining run (``kind`` "pretrain") or an evaluation of ``source``'s checkpoint."""

    name: str
    kind: str = "pretrain"
    model: str = ""
    multi_crop: bool = False
    precision: str = "fp32"
    nproc: int = 1
    knn_monitor: bool = False
    kill: bool = False
    resume_nproc: int = 0   # processes of the resume (0: nproc)
    extra: Tuple[str, ...] = ()   # flags after the others (the ViT rows' --arch and --patch-size)
    not_run: str = ""       # why it is listed but not run (one of NOT_APPLICABLE)
    source: str = ""

    @property
    def processes(self) -> int:
        return 0 if self.not_run else 2 if self.kill else 1


def variants(only: Optional[List[str]] = None) -> List[Tuple[str, bool]]:
    """(method, multi-crop) of every registered method, in registry order (``only``: names to keep)."""
    out = []
    for name, cls in METHODS.items():
        if cls.recipe.aug not in MULTI_CROP_AUGS:
            out.append((name, False))
        if cls.views.multi_crop:
            out.append((name, True))
    return [v for v in out if only is None or v[0] in only or label(*v) in only]


def label(model: str, multi_crop: bool) -> str:
    return f"{model} multi-crop" if multi_crop and METHODS[model].recipe.aug not in MULTI_CROP_AUGS else model


def plan(mode: Mode, cuda: bool, gpus: int, only: Optional[List[str]] = None) -> List[Setting]:
    """The rows, the evaluated (killed and resumed) run first, then its evaluations."""
    vs = variants(only)
    if not vs:
        raise ValueError(f"--methods {only}: no registered method matches ({', '.join(METHODS)})")
    killed = "fp16" if cuda else "fp32"
    rows = []
    for i, (model, mc) in enumerate(vs):
        for prec in PRECISIONS:
            s = Setting(f"{label(model, mc)} {prec}", model=model, multi_crop=mc, precision=prec,
                        knn_monitor=prec == "fp32", kill=prec == killed and (i == 0 or not mode.subset))
            if prec == "fp16" and not cuda:
                s.not_run = "n/a on cpu"
            elif prec == "bf16" and i > 0 and mode.subset:
                s.not_run = "not in --tiny"
            rows.append(s)
    vit = ("--arch", mode.vit_arch, "--patch-size", str(mode.vit_patch))
    for i, (model, mc) in enumerate(vs):   # each method on a ViT with its ViT recipe, bf16 (its default on GPUs)
        rows.append(Setting(f"{label(model, mc)} {mode.vit_arch} bf16", model=model, multi_crop=mc, precision="bf16",
                            extra=vit, kill=i == 0, not_run="not in --tiny" if i > 0 and mode.subset else ""))
    source = rows.pop(next(i for i, r in enumerate(rows) if r.kill))
    rows[:0] = [source, Setting("main_linear.py", "linear", source=source.name),
                Setting("main_knn.py", "knn", source=source.name)]
    if cuda and gpus >= 2:
        rows += [Setting(f"{label(m, mc)} fp16 2-proc nccl", model=m, multi_crop=mc, precision="fp16", nproc=2,
                         kill=i == 0, resume_nproc=1) for i, (m, mc) in enumerate(vs)]
    elif not cuda:
        m, mc = next((v for v in vs if METHODS[v[0]].recipe.sync_batchnorm), vs[0])
        rows.append(Setting(f"{label(m, mc)} fp32 2-proc gloo", model=m, multi_crop=mc, nproc=2, kill=True,
                            resume_nproc=1))
    return rows


def run_dir(s: Setting) -> str:
    return os.path.join("runs", re.sub(r"[^A-Za-z0-9]+", "-", s.name.replace(".py", "")).strip("-"))


def pretrain_argv(s: Setting, mode: Mode, device: str, nproc: int) -> List[str]:
    """``main_pretrain.py`` flags of ``s`` on ``nproc`` processes (the total batch does not depend on it)."""
    epochs = mode.kill_epochs if s.kill else mode.epochs
    argv = ["--data-dir", "data", "--output-dir", run_dir(s), "--model", s.model, "--arch", mode.arch,
            "--image-size", str(mode.image_size), "--batch-size", str(mode.batch // nproc),
            "--epochs", str(epochs), "--warmup-epoch", "0", "--num-workers", str(mode.workers),
            "--amp-opt-level", PRECISIONS[s.precision], "--device", device, "--print-freq", "1000",
            "--no-tensorboard", "--save-every-minutes", "0", "--seed", "0"]
    extra = dict(zip(s.extra[::2], s.extra[1::2]))
    recipe = recipe_for(METHODS[s.model], extra.get("--arch", mode.arch))
    for flag, width in (("--mlp-hidden-dim", recipe.mlp_hidden_dim), ("--feature-dim", recipe.feature_dim)):
        if 0 < mode.head_cap < width:
            argv += [flag, str(mode.head_cap)]
    if s.multi_crop and recipe.aug not in MULTI_CROP_AUGS:
        argv += ["--aug", MULTI_CROP_AUG, "--crop", str(MULTI_CROP_SCALE)]
    if s.multi_crop or recipe.aug in MULTI_CROP_AUGS:
        argv += ["--image-size2", str(mode.image_size2), "--num-crop2", str(mode.num_crop2)]
    if s.knn_monitor:
        argv += ["--knn-monitor", "--knn-freq", str(epochs), "--knn-k", str(KNN_K)]
    return argv + list(s.extra)


def eval_argv(s: Setting, source_dir: str, mode: Mode, device: str) -> List[str]:
    ckpt = os.path.join(source_dir, "current.pth")
    common = ["--pretrained-model", ckpt, "--data-dir", "data", "--num-workers", str(mode.workers), "--device", device]
    if s.kind == "linear":
        return common + ["--output-dir", run_dir(s), "--epochs", "1", "--total-batch-size", str(mode.batch),
                         "--print-freq", "1000", "--no-tensorboard", "--save-every-minutes", "0"]
    return common + ["--knn-k", str(KNN_K), "--batch-size", str(mode.batch), "--output-json",
                     os.path.join(run_dir(s), "knn.json")]


# ------------------------------------------------------------------------------------------ running them
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(script: str, argv: List[str], nproc: int) -> List[str]:
    """The command line, with the script relative to the repository (as recorded in the JSON)."""
    if nproc > 1:
        return ["python", "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
                script, *argv]
    return ["python", script, *argv]


def children(pid: int) -> List[int]:
    """The child processes of ``pid`` (from /proc; none once it is gone)."""
    kids: List[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return kids


def process_tree(pid: int) -> List[int]:
    """``pid`` and its descendants (torchrun starts each rank in a session of its own)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL the process groups of ``pid`` and of all its descendants at once (a node failure)."""
    for p in process_tree(pid):
        for kill in (lambda: os.killpg(os.getpgid(p), signal.SIGKILL), lambda: os.kill(p, signal.SIGKILL)):
            try:
                kill()
            except OSError:
                pass


def run_process(cmd: List[str], cwd: str, console: str, timeout: float, env: Optional[Dict[str, str]] = None,
                kill_when: Optional[Callable[[], bool]] = None) -> Dict:
    """Run ``cmd`` (``python`` -> this interpreter, the script from the repository) in its own process
    group; SIGKILL it and every descendant when ``kill_when()`` turns true or after ``timeout`` s."""
    argv = [sys.executable] + [os.path.join(ROOT, a) if a in SCRIPTS else a for a in cmd[1:]]
    full_env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    start, killed, timed_out = time.monotonic(), False, False
    with open(console, "a") as out:
        p = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=full_env,
                             start_new_session=True)
        while p.poll() is None:
            over = time.monotonic() - start > timeout
            if over or (kill_when is not None and kill_when()):
                killed, timed_out = not over, over
                kill_tree(p.pid)
                p.wait()
                break
            time.sleep(0.01)
    return {"rc": p.returncode, "seconds": time.monotonic() - start, "killed": killed, "timed_out": timed_out}


def read_text(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def last_line(console: str) -> str:
    return ([x for x in read_text(console).splitlines() if x.strip()] or [""])[-1][-300:]


class Check:
    """Runs the rows of a plan within a time budget; each row's processes run in ``work``."""

    def __init__(self, mode: Mode, device: str, work: str, budget_s: float) -> None:
        self.mode, self.device, self.work, self.budget = mode, device, work, budget_s
        self.start = time.monotonic()
        self.durations: List[float] = []

    def remaining(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def estimate(self, s: Setting) -> float:
        one = sum(self.durations) / len(self.durations) if self.durations else self.mode.process_s
        return s.processes * one * (1.5 if s.nproc > 1 else 1.0)

    def process(self, cmd: List[str], console: str, **kw) -> Dict:
        r = run_process(cmd, self.work, console, max(self.remaining(), 1.0), **kw)
        self.durations.append(r["seconds"])
        return r

    def run(self, s: Setting, done: Dict[str, Dict]) -> Dict:
        base = {"name": s.name, "kind": s.kind, "model": s.model, "precision": s.precision, "nproc": s.nproc}
        if s.not_run:
            return {**base, "status": s.not_run}
        if self.remaining() < self.estimate(s):
            return {**base, "status": NOT_RUN, "reason": f"the {self.budget:.0f} s time budget would be exceeded ("
                    f"{self.remaining():.0f} s left, ~{self.estimate(s):.0f} s needed)"}
        if s.source and done.get(s.source, {}).get("status") != OK:
            return {**base, "status": FAILED, "error": f"its checkpoint's run ({s.source}) failed"}
        out = os.path.join(self.work, run_dir(s))
        os.makedirs(out, exist_ok=True)
        console = os.path.join(out, "console.txt")
        if s.kind == "pretrain":
            row = self.pretrain(s, out, console, base)
        else:
            cmd = command("main_linear.py" if s.kind == "linear" else "main_knn.py",
                          eval_argv(s, run_dir(Setting(s.source)), self.mode, self.device), 1)
            r = self.process(cmd, console)
            knn = os.path.join(out, "knn.json")
            row = {**base, "commands": [cmd], **judge(
                s, r["rc"], read_text(os.path.join(out, "log.txt")), None, 1, timed_out=r["timed_out"],
                knn_json=json.loads(read_text(knn)) if os.path.exists(knn) else None), "seconds": r["seconds"]}
        if row["status"] != OK:
            row["console_last_line"] = last_line(console).replace(self.work, ".").replace(ROOT, "<repo>")
        return row

    def pretrain(self, s: Setting, out: str, console: str, base: Dict) -> Dict:
        nproc2 = s.resume_nproc or s.nproc
        cmd = command("main_pretrain.py", pretrain_argv(s, self.mode, self.device, s.nproc), s.nproc)
        manifest = os.path.join(out, "current.manifest.json")
        r = self.process(cmd, console, kill_when=(lambda: os.path.exists(manifest)) if s.kill else None)
        commands, seconds, log = [cmd], r["seconds"], read_text(os.path.join(out, "log.txt"))
        resume_log, final = "", r
        if s.kill and r["killed"]:
            first_gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
            env = {"CUDA_VISIBLE_DEVICES": first_gpu} if nproc2 < s.nproc and self.device != "cpu" else None
            cmd2 = command("main_pretrain.py", pretrain_argv(s, self.mode, self.device, nproc2) + ["--auto-resume"],
                           nproc2)
            final = self.process(cmd2, console, env=env)
            commands.append(cmd2 if env is None else [f"CUDA_VISIBLE_DEVICES={first_gpu}"] + cmd2)
            seconds += final["seconds"]
            resume_log = read_text(os.path.join(out, "log.txt"))[len(log):]
        try:
            ckpt = load_file(os.path.join(out, "current.pth"))
        except CheckpointError:   # missing or unreadable: judged as "no final checkpoint"
            ckpt = None
        epochs = self.mode.kill_epochs if s.kill else self.mode.epochs
        return {**base, "commands": commands, "total_batch": self.mode.batch, **judge(
            s, final["rc"], log, ckpt, epochs, killed=r["killed"], resume_log=resume_log,
            timed_out=final["timed_out"]), "seconds": seconds}


def tidy(work: str, row: Dict, keep: set) -> None:
    """Delete a finished row's checkpoints unless an evaluation still needs them (disk stays small)."""
    if row["name"] in keep:
        return
    folder = os.path.join(work, run_dir(Setting(row["name"])))
    for dirpath, _, files in os.walk(folder):
        for f in files:
            if f.endswith(".pth"):
                os.remove(os.path.join(dirpath, f))


def main(argv: Optional[List[str]] = None) -> int:
    args = gpu_check_parser(__doc__).parse_args(argv)
    mode = TINY if args.tiny else FULL
    device = args.device or ("cpu" if args.tiny else "cuda")
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --tiny for the CPU check", file=sys.stderr)
        return 2
    gpus = torch.cuda.device_count() if cuda else 0
    budget = args.time_budget or mode.budget_s + (MULTI_GPU_BUDGET_S if gpus >= 2 else 0.0)
    out_path = args.out or f"benchmarks/results/gpu_check{'_tiny' if args.tiny else ''}.json"
    try:
        rows_plan = plan(mode, cuda, gpus, args.methods)
    except ValueError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    if args.workdir and os.path.isdir(args.workdir) and os.listdir(args.workdir):
        print(f"gpu_check: --workdir {args.workdir} is not empty", file=sys.stderr)
        return 2
    work = args.workdir or tempfile.mkdtemp(prefix="gpu_check_")
    check = Check(mode, "auto" if device == "cuda" else device, work, budget)
    make_dataset(os.path.join(work, "data"), mode.train_per_class, mode.val_per_class, mode.data_px)
    done: Dict[str, Dict] = {}
    keep = {s.source for s in rows_plan if s.source}
    try:
        for s in rows_plan:
            row = check.run(s, done)
            done[s.name] = row
            tidy(work, row, keep)
            print(f"[gpu_check] {s.name:34s} {row['status']:10s} "
                  + (f"{row['seconds']:.0f} s " if "seconds" in row else "")
                  + (row.get("error") or row.get("reason") or ""), flush=True)
    finally:
        if not args.keep_work and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    rows = list(done.values())
    text = table(rows, mode.batch)
    failed = failures(rows)
    total = time.monotonic() - check.start
    gpu = torch.cuda.get_device_name(0) if cuda else None
    doc = {"mode": mode.name, "device": device, "gpu": gpu, "gpus": gpus,
           "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "settings": asdict(mode), "methods": list(METHODS), "time_budget_s": budget, "seconds": total,
           "failures": failed, "table": text, "rows": rows,
           "paths": "relative to the work folder (data/, runs/<setting>/); python = this interpreter"}
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(doc, f, indent=2, default=str)
    print(f"\nfirst-GPU-run check, {mode.name} mode, {device} ({gpu or doc['cpu']}), {mode.arch} at "
          f"{mode.image_size} px, total batch {mode.batch}:\n\n{text}\n")
    print(f"{len(rows)} rows in {total:.0f} s (budget {budget:.0f} s); {len(failed)} failed or not run; "
          f"wrote {out_path}" + (f"; work folder kept: {work}" if args.keep_work or args.workdir else ""))
    for f_ in failed:
        print(f"FAILED: {f_}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
