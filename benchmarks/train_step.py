"""Images/s of one pretraining step (forward, backward, optimiser update, on_train_step_end).

For every registered method at its recipe's views (``contrast.option.resolve_pretrain``: e.g. the
multi-crop 160 + 3 x 96 of one recipe, 2 x 224 of the two-view ones) and optimiser, each
architecture, fp32 vs bf16 autocast, channels_last off/on, on CUDA when present, else the CPU.
Inputs are random tensors already on the device: this measures the model step only, not data
loading or augmentation. Images/s counts images, not views.

``--loop`` times the whole training loop instead (``Trainer.train_epoch`` over uint8 batches:
copy to the device, the augmentation's device stage, forward, backward, the agreement, the
optimiser step, logging every ``--print-freq`` 1000 steps), twice in the same process: "old"
with the host-device synchronisations of the loop before issue 29 emulated (the loss's
finiteness read on its own, every logged value read at every step, GradScaler's scale read
twice, the colour ops' ``nonzero`` path), "new" as it runs now; it prints steps/s and their ratio
(the gain is on accelerators: on a CPU a host read costs nothing).

    python benchmarks/train_step.py --quick                    # CPU smoke run
    python benchmarks/train_step.py --arch resnet18 resnet50   # full table
    python benchmarks/train_step.py --arch vit_small resnet50 --precisions bf16 --channels-last 0
                                                               # ViT-S/16 vs ResNet-50, every method
    python benchmarks/train_step.py --loop --arch resnet50 --precisions fp32 --channels-last 1
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from typing import Dict, List, Sequence

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from contrast import distributed as cd  # noqa: E402
from contrast import engine  # noqa: E402
from contrast.data.batched_ops import RandomOp  # noqa: E402
from contrast.data.transforms import build_augmentation, view_specs  # noqa: E402
from contrast.distributed import resolve_device  # noqa: E402
from contrast.logger import TensorBoard  # noqa: E402
from contrast.models import BACKBONE_ARCHS, METHODS, STEMS, build_method  # noqa: E402
from contrast.optim import build_optimizer  # noqa: E402
from contrast.option import (ListAction, add_debug_flag, add_device_flag, add_output_json_flag, add_seed_flag,
                             new_parser, resolve_pretrain)  # noqa: E402
from contrast.precision import Precision  # noqa: E402


def train_step_parser(doc: str = "", methods: Sequence[str] = (), output_json: str = "") -> argparse.ArgumentParser:
    """``benchmarks/train_step.py``: ``methods`` are its recipe names; list flags take words or commas."""
    p = new_parser("train_step.py", doc)
    p.add_argument("--arch", "--archs", dest="arch", action=ListAction, item_choices=BACKBONE_ARCHS,
                   default=["resnet18", "resnet50"], help="backbones, ResNets and ViTs (each with the method's "
                   "recipe for its family; --archs: alias)")
    p.add_argument("--stem", type=str, default="imagenet", choices=STEMS, help="layers before layer1")
    p.add_argument("--methods", action=ListAction, item_choices=tuple(methods), default=list(methods),
                   help="methods to time, each at its recipe's views (default: every registered method)")
    p.add_argument("--precisions", action=ListAction, item_choices=("fp32", "bf16"), default=["fp32", "bf16"],
                   help="fp32 and/or bf16 autocast")
    p.add_argument("--channels-last", action=ListAction, item_type=int, item_choices=(0, 1), default=[0, 1],
                   help="memory formats to time: 0 contiguous, 1 channels-last")
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=int, default=None,
                   help="images per step (default 64 on CUDA, 8 on CPU; --batch: alias)")
    p.add_argument("--iters", type=int, default=None, help="timed steps (default 20 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5 on CUDA, 1 on CPU)")
    p.add_argument("--num-instances", type=int, default=10000, help="training-set size N (methods with one "
                   "state row per image)")
    p.add_argument("--contrast-num-negative", "--num-negative", dest="contrast_num_negative", type=int,
                   default=None, help="negatives / queue length of the methods that use them (default: the "
                   "recipe's; --num-negative: alias)")
    p.add_argument("--quick", action="store_true", help="ResNet-18 only, batch 8, 2 timed steps")
    p.add_argument("--loop", action="store_true", help="time the training loop (Trainer.train_epoch: device "
                   "augmentation, agreement, logging) with the host reads of the loop before issue 29 emulated "
                   "(old) and without them (new), in the same process; prints steps/s and the ratio")
    add_device_flag(p)
    add_seed_flag(p)
    add_output_json_flag(p, output_json, "--out")
    add_debug_flag(p)
    return p


def parse_args(argv=None):
    p = train_step_parser(__doc__, list(METHODS), os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                               "results", "train_step.json"))
    args = p.parse_args(argv)
    args.device = resolve_device(args.device)
    cuda = args.device.type == "cuda"
    if args.quick:
        args.arch, args.batch_size, args.iters, args.warmup = ["resnet18"], args.batch_size or 8, args.iters or 2, 1
    args.batch_size = args.batch_size or (64 if cuda else 8)
    args.iters = args.iters or (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    return args


def recipe_of(args, arch: str, name: str):
    """(flags, method config, view sizes) of method ``name``'s recipe with this benchmark's backbone."""
    flags = ["--arch", arch, "--stem", args.stem, "--batch-size", str(args.batch_size)]
    if args.contrast_num_negative is not None:
        flags += ["--contrast-num-negative", str(args.contrast_num_negative)]
    run, cfg = resolve_pretrain(name, *flags)
    sizes = [v.size for v in view_specs(run.aug, cfg.num_crop, run.image_size, run.crop, run.image_size2,
                                        run.crop2, run.num_crop2)]
    return run, cfg, sizes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(args, arch: str, name: str, precision: str, channels_last: bool) -> Dict:
    run, cfg, sizes = recipe_of(args, arch, name)
    torch.manual_seed(args.seed)
    method = build_method(cfg, args.num_instances).to(args.device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    method = method.to(memory_format=fmt)
    opt = build_optimizer(method, run.optimizer, cfg.peak_lr, run.momentum, run.weight_decay, run.lars_form,
                          run.lars_trust_coefficient, run.lars_eps, no_decay=method.no_weight_decay_params())
    views = [torch.randn(args.batch_size, 3, s, s, device=args.device).contiguous(memory_format=fmt) for s in sizes]
    index = torch.randint(args.num_instances, (args.batch_size,), device=args.device)
    method.on_train_start(args.warmup + args.iters, args.warmup + args.iters)

    def step(i: int) -> float:
        with torch.autocast(device_type=args.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = method(views, index)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        method.on_before_optimizer_step(i)
        opt.step()
        method.on_train_step_end(i, cfg.peak_lr)
        return out["loss"].detach()

    for i in range(args.warmup):
        step(i)
    _sync(args.device)
    start = time.perf_counter()
    for i in range(args.iters):
        loss = step(args.warmup + i)
    _sync(args.device)
    seconds = time.perf_counter() - start
    row = dict(arch=arch, stem=args.stem, method=name, optimizer=run.optimizer, precision=precision,
               channels_last=channels_last, batch=args.batch_size, views="+".join(map(str, sizes)), iters=args.iters,
               seconds=round(seconds, 4),
               images_per_s=round(args.batch_size * args.iters / seconds, 2), loss=float(loss))
    if args.device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(args.device) / 2 ** 30, 2)
        torch.cuda.reset_peak_memory_stats(args.device)
    return row


class _Recorded(nn.Module):
    """The method, remembering its last output (for the old loop's per-step reads)."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method
        self.last: Dict = {}

    def forward(self, views, target):
        self.last = self.method(views, target)
        return self.last


class OldSyncTrainer(engine.Trainer):
    """The loop with the host reads it made before issue 29 added back."""

    def _agree(self, loss, overflow):
        bool(torch.isfinite(loss).item())
        if self.precision.scaler is not None:
            self.precision.scaler.get_scale()
        return super()._agree(loss, overflow)

    def _step(self, overflow: bool) -> None:
        super()._step(overflow)
        if self.precision.scaler is not None:
            self.precision.scaler.get_scale()
        for v in self.model.last.values():
            if torch.is_tensor(v):
                v.float().item()


def bench_loop(args, arch: str, name: str, precision: str, channels_last: bool) -> Dict:
    """steps/s of ``Trainer.train_epoch`` with the old loop's host reads emulated and without them."""
    run_args, cfg, _ = recipe_of(args, arch, name)
    if args.quick:
        run_args.image_size = max(16, run_args.image_size // 4)
        run_args.image_size2 = max(16, run_args.image_size2 // 4)
    aug = build_augmentation(run_args.aug, cfg.num_crop, run_args.image_size, run_args.crop, run_args.image_size2,
                             run_args.crop2, run_args.num_crop2)
    sizes = [v.size for v in view_specs(run_args.aug, cfg.num_crop, run_args.image_size, run_args.crop,
                                        run_args.image_size2, run_args.crop2, run_args.num_crop2)]
    g = torch.Generator().manual_seed(args.seed)
    pin = args.device.type == "cuda"
    batches = []
    for i in range(args.iters):
        views = [torch.randint(0, 256, (args.batch_size, 3, s, s), dtype=torch.uint8, generator=g) for s in sizes]
        batches.append(([v.pin_memory() if pin else v for v in views],
                        torch.randint(args.num_instances, (args.batch_size,), generator=g),
                        torch.zeros(args.batch_size, dtype=torch.long)))
    env = cd.DistEnv(rank=0, world_size=1, local_rank=0, device=args.device, backend=None)
    logger = logging.getLogger("contrast.train_step")
    logger.propagate = False
    run = engine.Run(env, logger, TensorBoard("", False), "")
    dtype = torch.bfloat16 if precision == "bf16" else None
    trainers = {}
    for mode, trainer_class in (("old", OldSyncTrainer), ("new", engine.Trainer)):
        torch.manual_seed(args.seed)
        method = engine.prepare_model(build_method(cfg, args.num_instances), args.device,
                                      channels_last=channels_last)
        opt = torch.optim.SGD(method.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        trainers[mode] = trainer_class(_Recorded(method), method, opt, sched, Precision(dtype, None), run,
                                       engine.LoopOptions(print_freq=1000, channels_last=channels_last,
                                                          seed=args.seed), aug.device)
    result = {"old": 0.0, "new": 0.0}
    for round_ in range(3):   # alternate, keep the best of each: load drifts on a shared machine
        for mode, sync_free in (("old", False), ("new", None)):
            for op in aug.device.modules():
                if isinstance(op, RandomOp):
                    op.sync_free = sync_free     # False: the nonzero path the colour ops took on every device
            if round_ == 0:
                trainers[mode].train_epoch(batches[:args.warmup], 1, 1)
            _sync(args.device)
            start = time.perf_counter()
            trainers[mode].train_epoch(batches, 1, 1)
            _sync(args.device)
            result[mode] = max(result[mode], args.iters / (time.perf_counter() - start))
    return dict(arch=arch, method=name, precision=precision, channels_last=channels_last, batch=args.batch_size,
                views="+".join(map(str, sizes)), iters=args.iters, steps_per_s_old=round(result["old"], 3),
                steps_per_s_new=round(result["new"], 3), ratio=round(result["new"] / result["old"], 3))


def run_table(args, bench, describe) -> List[Dict]:
    """``bench(args, arch, method, precision, channels_last)`` over every combination, each row printed."""
    rows = []
    for arch in args.arch:
        for name in args.methods:
            for precision in args.precisions:
                for cl in (bool(c) for c in args.channels_last):
                    row = bench(args, arch, name, precision, cl)
                    rows.append(row)
                    print(f"{arch:10s} {name:14s} {precision:5s} cl={int(cl)} {describe(row)}", flush=True)
    return rows


def write_result(args, path: str, rows: List[Dict], **facts) -> None:
    device = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else platform.processor() or "cpu"
    result = dict(device=device, device_type=args.device.type, torch=torch.__version__,
                  threads=torch.get_num_threads(), **facts, rows=rows)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {os.path.relpath(path)}")


def main(argv=None) -> List[Dict]:
    args = parse_args(argv)
    if args.loop:
        return main_loop(args)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rows = run_table(args, bench_one, lambda r: f"{r['images_per_s']:9.1f} img/s  loss {r['loss']:.3f}")
    write_result(args, args.output_json, rows, num_instances=args.num_instances,
                 num_negative=args.contrast_num_negative)
    return rows


def main_loop(args) -> List[Dict]:
    rows = run_table(args, bench_loop, lambda r: f"steps/s old {r['steps_per_s_old']:8.3f} new "
                                                 f"{r['steps_per_s_new']:8.3f}  ratio {r['ratio']:.3f}")
    root, ext = os.path.splitext(args.output_json)
    write_result(args, f"{root}_loop{ext or '.json'}", rows,
                 what="Trainer.train_epoch steps/s, old = host reads of the loop before issue 29 emulated")
    return rows


if __name__ == "__main__":
    engine.run_cli(main)
