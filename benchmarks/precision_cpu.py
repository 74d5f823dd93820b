"""fp32 vs bf16 autocast training steps on this CPU (what ``--amp-opt-level auto`` decides between).

One process, same model weights and inputs for both modes, rounds alternate between the modes so
that load from other processes hits both alike; the figure is the median step time per mode and
the ratio fp32 / bf16 (> 1: bf16 is faster). Also prints what ``auto`` picks on this CPU and why.

    python benchmarks/precision_cpu.py            # --arch resnet18 --size 112 --batch 16 --rounds 7

To see a CPU without native bf16 on a CPU that has it, cap oneDNN's instruction set (the ``auto``
line still reports the real CPU):

    ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI python benchmarks/precision_cpu.py \
        --out benchmarks/results/precision_cpu_avx512_vnni.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from contrast.models import ARCHS, build_backbone  # noqa: E402
from contrast.precision import resolve_precision  # noqa: E402
from contrast.option import new_parser  # noqa: E402


def precision_cpu_parser(doc: str = "") -> argparse.ArgumentParser:
    """``benchmarks/precision_cpu.py``."""
    p = new_parser("precision_cpu.py", doc)
    p.add_argument("--arch", default="resnet18", choices=ARCHS, help="backbone")
    p.add_argument("--image-size", "--size", dest="size", type=int, default=112, help="image side (--size: alias)")
    p.add_argument("--batch-size", "--batch", dest="batch", type=int, default=16, help="batch (--batch: alias)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds per precision")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--output-json", "--out", dest="out", default="benchmarks/results/precision_cpu.json",
                   help="results (--out: alias)")
    return p


def step_time(net, opt, x, y, dtype) -> float:
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = net(x)
    loss = F.cross_entropy(out.float(), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main() -> None:
    args = precision_cpu_parser(__doc__).parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net, dim = build_backbone(args.arch)
    net.fc = torch.nn.Linear(dim, 10)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.randn(args.batch, 3, args.size, args.size), torch.randint(0, 10, (args.batch,))
    modes = {"fp32": None, "bf16": torch.bfloat16}
    for dtype in modes.values():   # warm-up: oneDNN primitive creation
        step_time(net, opt, x, y, dtype)
    times = {m: [] for m in modes}
    for _ in range(args.rounds):
        for m, dtype in modes.items():
            times[m].append(step_time(net, opt, x, y, dtype))
    med = {m: statistics.median(v) for m, v in times.items()}
    _, why = resolve_precision("auto", torch.device("cpu"))
    result = {"arch": args.arch, "size": args.size, "batch": args.batch, "threads": args.threads,
              "rounds": args.rounds, "median_step_s": med, "fp32_over_bf16": med["fp32"] / med["bf16"],
              "auto": why, "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "(unset)"),
              "loadavg": os.getloadavg(), "torch": torch.__version__}
    print(json.dumps(result, indent=1))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
