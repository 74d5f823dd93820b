"""One-shot GPU check: every registered method trains, fp32 on the GPU equals the CPU, and how fast.

For every method of ``contrast.models.METHODS`` (so methods added later are included; multi-crop
methods also get a multi-crop setting), on synthetic data, through the real training loop
(``contrast.engine.Trainer``) and the flags' own resolution (``contrast.option``):

1. **Correctness**: the first ``--check-steps`` losses of an fp32 run on the device equal those of
   the same run on the CPU (same weights, same batches, TF32 off) within ``--tolerance`` (1e-4).
   InstDisc draws its negatives from a generator on its bank's device, and CUDA and CPU generators
   give different numbers for one seed, so for this check its negatives are drawn on the CPU.
2. **Precision**: every method trains ``--iters`` iterations in fp32, fp16 + GradScaler
   (``--amp-opt-level O1`` on CUDA) and bf16 (``O2``) with finite losses.
3. **Speed**: images/s per method (ResNet-50 at 224 px, multi-crop 160 + 3 x 96 px, 64 images per
   step, the release's per-GPU batch) for each precision with channels-last off and on, and for fp16
   (the GPU default, ``--amp-opt-level auto``) with channels-last + ``torch.compile``.

The table is printed and written as JSON (``--out``, a relative path by default). The exit code is
1 when a check fails or a run errors. ``--time-budget`` (seconds) stops starting new speed runs once
exceeded, so the full mode stays under 8 minutes (see ``benchmarks/gpu_check.sh`` for the estimate).

``--tiny`` runs the same code on the CPU in seconds (ResNet-18 at 32 px, multi-crop 32 + 2 x 24 (not
smaller: torch 2.14.1's CPU bf16 convolution backward is unreliable at 16 px),
batch 8, 2 iterations, fp32 and bf16 + channels-last, compile off, 2 steps compared), for CI.

    bash benchmarks/gpu_check.sh            # full mode on the GPU
    bash benchmarks/gpu_check.sh --tiny     # CI
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from contrast import engine  # noqa: E402
from contrast.distributed import DistEnv  # noqa: E402
from contrast.logger import TensorBoard, setup_logger  # noqa: E402
from contrast.option import gpu_check_parser  # noqa: E402
from contrast.models import METHODS, build_method  # noqa: E402
from contrast.models.views import MULTI_CROP_AUG  # noqa: E402
from contrast.optim import build_optimizer, build_scheduler  # noqa: E402
from contrast.option import method_config, parse_pretrain_args  # noqa: E402
from contrast.precision import resolve_precision  # noqa: E402

#: precision name -> --amp-opt-level on CUDA (on a CPU, O1 and O2 are both bf16)
PRECISIONS = {"fp32": "O0", "fp16": "O1", "bf16": "O2"}
#: optimiser per method where its recipe (scripts/<method>.sh) differs from SGD
OPTIMIZER = {"SimCLR": "lars", "BYOL": "lars", "SwAV": "lars"}


@dataclass(frozen=True)
class Mode:
    arch: str
    size: int
    #: multi-crop: large and small crop sides (the release: 160 and 96 for 224 px training)
    multi_crop_sizes: Tuple[int, int]
    num_crop2: int
    batch: int
    iters: int
    warmup_iters: int
    num_instances: int
    num_negative: int
    #: (precision, channels_last, compile) combinations timed per setting
    combos: Tuple[Tuple[str, bool, bool], ...]
    check_arch: str
    check_size: int
    check_multi_crop_sizes: Tuple[int, int]
    check_batch: int
    check_instances: int


FULL = Mode("resnet50", 224, (160, 96), 3, 64, 20, 5, 1281167, 65536,
            (("fp32", False, False), ("fp32", True, False), ("fp16", False, False), ("fp16", True, False),
             ("bf16", False, False), ("bf16", True, False), ("fp16", True, True)),
            "resnet18", 64, (48, 32), 16, 4096)
TINY = Mode("resnet18", 32, (32, 24), 2, 8, 2, 1, 64, 16,
            (("fp32", False, False), ("bf16", True, False)),
            "resnet18", 32, (32, 24), 8, 64)


@dataclass(frozen=True)
class Setting:
    name: str
    model: str
    multi_crop: bool


def settings() -> List[Setting]:
    """One setting per registered method with its own --aug, plus a multi-crop one for methods that take
    it (a method whose own --aug is MultiCrop gets the multi-crop one only)."""
    out = []
    for name, cls in METHODS.items():
        if cls.views.aug != MULTI_CROP_AUG:
            out.append(Setting(name, name, False))
        if cls.views.multi_crop:
            out.append(Setting(f"{name} multi-crop", name, True))
    return out


def flags(setting: Setting, mode: Mode, arch: str, size: int, multi_crop_sizes: Tuple[int, int],
          batch: int) -> List[str]:
    """The command line of this setting (parsed by ``contrast.option`` like ``main_pretrain.py``'s):
    views of ``size`` px; multi-crop: ``multi_crop_sizes`` (large, small) with the release's crop
    scales (``--crop 0.08 --crop2 0.14``)."""
    argv = ["--model", setting.model, "--arch", arch, "--mlp-head", "--batch-size", str(batch),
            "--contrast-num-negative", str(mode.num_negative), "--optimizer", OPTIMIZER.get(setting.model, "sgd"),
            "--bn-splits", str(min(8, max(1, batch // 2)))]   # one-process split batch norm: >= 2 images per group
    if setting.multi_crop:
        argv += ["--aug", MULTI_CROP_AUG, "--image-size", str(multi_crop_sizes[0]), "--image-size2",
                 str(multi_crop_sizes[1]), "--num-crop2", str(mode.num_crop2), "--crop", "0.08", "--crop2", "0.14"]
    else:
        argv += ["--image-size", str(size)]
    return argv


def view_sizes(setting: Setting, args) -> List[int]:
    """Side of every view of one image, as the data pipeline would produce them."""
    cls = METHODS[setting.model]
    if setting.multi_crop:
        return [args.image_size] * args.num_crop + [args.image_size2] * args.num_crop2
    return [args.image_size] * cls.views.count


def make_batches(sizes: List[int], batch: int, num_instances: int, count: int, seed: int,
                 device: torch.device) -> List[Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        views = [torch.randn(batch, 3, s, s, generator=gen).to(device) for s in sizes]
        index = torch.randint(0, num_instances, (batch,), generator=gen).to(device)
        out.append((views, index, index.clone()))
    return out


def make_run(device: torch.device, logdir: str) -> engine.Run:
    logger = setup_logger(logdir, 0, name="contrast.gpu_check")
    for h in logger.handlers:
        if not hasattr(h, "baseFilename"):
            h.setLevel("WARNING")   # the per-epoch lines go to the log file only
    return engine.Run(DistEnv(0, 1, 0, device, None), logger, TensorBoard(logdir, False), logdir)


def build(setting: Setting, argv: List[str], num_instances: int, device: torch.device, channels_last: bool,
          compile_backbone: bool, total_steps: int, seed: int = 0, state: Optional[dict] = None):
    args = parse_pretrain_args(argv)
    torch.manual_seed(seed)
    method = build_method(method_config(args), num_instances)
    if state is not None:
        method.load_state_dict(state)
    method = engine.prepare_model(method, device, method.sync_batchnorm, channels_last, compile_backbone)
    lr = args.base_learning_rate * args.batch_size / 256
    optimizer = build_optimizer(method.param_groups(lr, args.weight_decay), args.optimizer, lr, args.momentum,
                                args.weight_decay, args.lars_form,
                                args.lars_trust_coefficient, args.lars_eps)
    scheduler = build_scheduler(optimizer, "cosine", 1, total_steps, 0)
    method.on_train_start(total_steps, total_steps)
    return args, method, optimizer, scheduler


def cpu_negatives(method) -> None:
    """InstDisc only (see the module docstring): draw its negatives on the CPU, then move them."""
    draw = method.draw_negatives

    def on_cpu(batch_size: int) -> torch.Tensor:
        bank = method.bank
        method.bank = bank.cpu()
        try:
            return draw(batch_size).to(bank.device)
        finally:
            method.bank = bank
    method.draw_negatives = on_cpu


def losses_of(setting: Setting, argv, mode: Mode, device: torch.device, run: engine.Run, steps: int,
              state: dict) -> List[float]:
    args, method, opt, sched = build(setting, argv, mode.check_instances, device, False, False, steps, state=state)
    if setting.model == "InstDisc" and device.type != "cpu":
        cpu_negatives(method)
    precision, _ = resolve_precision("O0", device)
    trainer = engine.Trainer(method, method, opt, sched, precision, run, engine.LoopOptions(10 ** 9, 1, False))
    torch.manual_seed(1)
    batches = make_batches(view_sizes(setting, args), mode.check_batch, mode.check_instances, steps, 7, device)
    return [trainer.train_epoch([b], 1, 1)["loss"] for b in batches]


def check_against_cpu(setting: Setting, mode: Mode, device: torch.device, run: engine.Run, steps: int,
                      tolerance: float) -> Dict:
    argv = flags(setting, mode, mode.check_arch, mode.check_size, mode.check_multi_crop_sizes, mode.check_batch)
    _, ref_method, _, _ = build(setting, argv, mode.check_instances, torch.device("cpu"), False, False, steps)
    state = copy.deepcopy(ref_method.state_dict())
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        cpu = losses_of(setting, argv, mode, torch.device("cpu"), run, steps, state)
        dev = losses_of(setting, argv, mode, device, run, steps, state)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    diff = max(abs(a - b) for a, b in zip(cpu, dev))
    return {"cpu_losses": cpu, "device_losses": dev, "max_abs_diff": diff,
            "ok": bool(diff <= tolerance and all(math.isfinite(x) for x in cpu + dev))}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(setting: Setting, mode: Mode, combo, device: torch.device, run: engine.Run) -> Dict:
    precision_name, channels_last, compile_backbone = combo
    argv = flags(setting, mode, mode.arch, mode.size, mode.multi_crop_sizes, mode.batch)
    steps = mode.warmup_iters + mode.iters
    args, method, opt, sched = build(setting, argv, mode.num_instances, device, channels_last, compile_backbone, steps)
    precision, note = resolve_precision(PRECISIONS[precision_name], device)
    trainer = engine.Trainer(method, method, opt, sched, precision, run,
                             engine.LoopOptions(10 ** 9, 3, channels_last))
    batches = make_batches(view_sizes(setting, args), mode.batch, mode.num_instances, 2, 3, device)
    t0 = time.perf_counter()
    warm = trainer.train_epoch([batches[i % 2] for i in range(mode.warmup_iters)], 1, 2)
    sync(device)
    t1 = time.perf_counter()
    stats = trainer.train_epoch([batches[i % 2] for i in range(mode.iters)], 2, 2)
    sync(device)
    t2 = time.perf_counter()
    ok = math.isfinite(warm["loss"]) and math.isfinite(stats["loss"])
    return {"images_per_s": mode.batch * mode.iters / (t2 - t1), "loss": stats["loss"], "finite": ok,
            "warmup_s": t1 - t0, "precision": note,
            "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None}


def combo_name(combo) -> str:
    p, cl, comp = combo
    return p + ("+cl" if cl else "") + ("+compile" if comp else "")


def main(argv: Optional[List[str]] = None) -> int:
    args = gpu_check_parser(__doc__).parse_args(argv)
    mode = TINY if args.tiny else FULL
    if args.check_steps is None:
        args.check_steps = 2 if args.tiny else 3
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --tiny for the CPU check", file=sys.stderr)
        return 2
    if device.type == "cpu" and not args.tiny:
        torch.set_num_threads(os.cpu_count() or 1)
    out_path = args.out or ("benchmarks/results/gpu_check_tiny.json" if args.tiny else "benchmarks/results/gpu_check.json")
    start = time.perf_counter()
    logdir = tempfile.mkdtemp(prefix="gpu_check_")
    run = make_run(device, logdir)
    chosen = [s for s in settings() if args.methods is None or s.name in args.methods]
    results: Dict = {"checks": {}, "speed": {}}
    failures = []
    for s in chosen:
        try:
            c = check_against_cpu(s, mode, device, run, args.check_steps, args.tolerance)
        except (Exception, SystemExit) as e:  # noqa: BLE001  report and go on (SystemExit: a flag error)
            c = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        results["checks"][s.name] = c
        if not c["ok"]:
            failures.append(f"check {s.name}: {c.get('error') or c['max_abs_diff']}")
        print(f"[check] {s.name:22s} fp32 {device.type} vs cpu: " +
              (f"max |loss diff| {c['max_abs_diff']:.2e} over {args.check_steps} steps "
               f"{'ok' if c['ok'] else 'FAILED'}" if "max_abs_diff" in c else f"ERROR {c['error']}"), flush=True)
    for s in chosen:
        row = results["speed"].setdefault(s.name, {})
        for combo in mode.combos:
            name = combo_name(combo)
            if time.perf_counter() - start > args.time_budget:
                row[name] = {"skipped": f"time budget {args.time_budget:.0f} s exceeded"}
                continue
            try:
                r = throughput(s, mode, combo, device, run)
                if not r["finite"]:
                    failures.append(f"{s.name} {name}: non-finite loss")
            except (Exception, SystemExit) as e:  # noqa: BLE001
                r = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                failures.append(f"{s.name} {name}: {r['error']}")
            row[name] = r
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
        print(f"[speed] {s.name:22s} " + "  ".join(
            f"{n} {v['images_per_s']:.0f}" if "images_per_s" in v else f"{n} {'skip' if 'skipped' in v else 'ERR'}"
            for n, v in row.items()) + " img/s", flush=True)

    names = [combo_name(c) for c in mode.combos]
    lines = ["| setting | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for s in chosen:
        row = results["speed"][s.name]
        lines.append(f"| {s.name} | " + " | ".join(
            f"{row[n]['images_per_s']:.0f}" if "images_per_s" in row[n] else ("skipped" if "skipped" in row[n]
                                                                                else "error") for n in names) + " |")
    table = "\n".join(lines)
    total = time.perf_counter() - start
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    doc = {"mode": "tiny" if args.tiny else "full", "device": str(device), "gpu": gpu,
           "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "arch": mode.arch,
           "image_size": mode.size, "multi_crop": f"{mode.multi_crop_sizes[0]}+{mode.num_crop2}x{mode.multi_crop_sizes[1]}",
           "batch": mode.batch, "iters": mode.iters,
           "warmup_iters": mode.warmup_iters, "check": {"arch": mode.check_arch, "size": mode.check_size,
                                                        "batch": mode.check_batch, "steps": args.check_steps,
                                                        "tolerance": args.tolerance},
           "seconds": total, "failures": failures, "table": table, **results}
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(doc, f, indent=2, default=str)
    print(f"\nimages/s, {mode.arch}, batch {mode.batch}, {device} ({gpu or doc['cpu']}):\n{table}")
    print(f"\n{len(chosen)} settings in {total:.0f} s; {len(failures)} failure(s); wrote {out_path}")
    for f_ in failures:
        print(f"FAILED: {f_}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
