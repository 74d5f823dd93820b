"""Peak memory per rank of the kNN step: the gathered kNN of commit 400b33a vs the sharded kNN.

The step starts where feature extraction leaves each rank: its contiguous block of the
(L2-normalised) training and validation features. ``before`` is a copy of the previous design
(every rank gathers all features, labels and slots and reorders them, then runs the whole kNN on a
normalised copy with 1024 x N similarity chunks); ``after`` is ``knn_evaluate(sharded=True)``.
Each (design, world size) runs in fresh gloo processes on the CPU; the peak is the kernel's
resident high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` before the step)
minus the resident size before it. The script also prints the memory model of docs/evaluation.md
for this run and for ImageNet (N = 1.28M, D = 2048, 8 ranks).

    python benchmarks/knn_memory.py          # -> benchmarks/results/knn_memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.results_io import write_json  # noqa: E402
from contrast import distributed as cd  # noqa: E402
from contrast.eval.knn import BANK_CHUNK, knn_evaluate, l2_normalize_  # noqa: E402

GIB = 1024 ** 3


def memory_model(n, m, d, world, k, classes, chunk=1024, bank_chunk=BANK_CHUNK, storage_bytes=4):
    """Per-rank peak bytes of the kNN step (docs/evaluation.md), ``before`` and ``after``."""
    nw, mw = -(-n // world), -(-m // world)
    q = world * min(-(-chunk // world), mw)
    blocks = nw * (d * 4 + 8) + mw * (d * 4 + 8)
    gather = 2 * n * d * 4 + 2 * nw * d * 4                  # gathered list + cat, then the reordered copy
    knn = 2 * n * d * 4 + min(chunk, m) * n * 4              # gathered + normalised copy + similarity chunk
    before = blocks + max(gather, knn) + m * d * 4
    after = (nw * (d * storage_bytes + 8) + mw * (d * 4 + 8)          # the blocks, kept (normalised once)
             + q * d * 4 + q * bank_chunk * 12                       # a round's queries and similarity keys
             + (bank_chunk * d * 4 if storage_bytes < 4 else 0)      # an upcast fp16/bf16 bank block
             + q * k * 8 * 3 + world * q * k * 16                    # candidates, merged over ranks
             + 2 * mw * k * 20 + mw * classes * 16)                  # neighbours, class scores and their sort
    return {"before": before, "after": after}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _baseline(train, train_labels, val, val_labels, train_start, val_start, k, temperature, classes):
    """The kNN step as in commit 400b33a (contrast/eval/features.py gather + contrast/eval/knn.py)."""
    def gather(feats, labels, start):
        index = torch.arange(start, start + len(feats))
        feats, labels, index = cd.all_gather_variable(feats), cd.all_gather_variable(labels), \
            cd.all_gather_variable(index)
        order = torch.argsort(index)
        return feats[order], labels[order]

    train, train_labels = gather(train, train_labels, train_start)
    val, val_labels = gather(val, val_labels, val_start)
    bank = F.normalize(train.float(), dim=1)
    hits = 0
    for query, labels in zip(torch.split(val, 1024), torch.split(val_labels, 1024)):
        sim = F.normalize(query.float(), dim=1) @ bank.T
        top_sim, top_idx = sim.topk(min(k, bank.shape[0]), dim=1)
        weights = torch.exp((top_sim - top_sim[:, :1]) / temperature)
        scores = torch.zeros(len(query), classes).scatter_add_(1, train_labels[top_idx], weights)
        hits += int((scores.argmax(1) == labels).sum())
    return 100.0 * hits / len(val_labels)


def _worker(rank, world, port, design, cfg, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    n, m, d = cfg["n"], cfg["queries"], cfg["dim"]
    rss = _rss_kib("VmRSS")                 # the step's peak counts the blocks, as the model does
    train_start, train_stop = cd.shard_range(n)
    val_start, val_stop = cd.shard_range(m)
    g = torch.Generator().manual_seed(1000 + rank)
    train = l2_normalize_(torch.randn(train_stop - train_start, d, generator=g), 4096)
    val = l2_normalize_(torch.randn(val_stop - val_start, d, generator=g), 4096)
    train_labels = torch.randint(0, cfg["classes"], (len(train),), generator=g)
    val_labels = torch.randint(0, cfg["classes"], (len(val),), generator=g)
    cd.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                        # reset VmHWM to the current resident size
    start = time.perf_counter()
    if design == "before":
        top1 = _baseline(train, train_labels, val, val_labels, train_start, val_start, cfg["k"], 0.07,
                         cfg["classes"])
    else:
        top1 = knn_evaluate(train, train_labels, val, val_labels, [cfg["k"]], 0.07, cfg["classes"],
                            sharded=world > 1, normalized=True)[cfg["k"]]["top1"]
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM") - rss
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump({"peak_bytes": peak * 1024, "seconds": seconds, "top1": top1}, f)
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(design, world, cfg):
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world, _free_port(), design, cfg, out_dir), nprocs=world, join=True,
                           start_method="spawn")
        ranks = [json.load(open(os.path.join(out_dir, f"{r}.json"))) for r in range(world)]
    return {"peak_bytes_max_rank": max(r["peak_bytes"] for r in ranks),
            "seconds_max_rank": round(max(r["seconds"] for r in ranks), 3), "top1": ranks[0]["top1"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[100_000, 200_000], help="training features")
    p.add_argument("--queries", type=int, default=1000, help="validation features")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--output-json", default="benchmarks/results/knn_memory.json")
    args = p.parse_args(argv)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")   # freed tensors leave the resident set
    results = []
    mib = 1024 ** 2
    print(f"kNN step, D={args.dim} M={args.queries} k={args.k} C={args.classes}: peak MiB per rank (blocks included)")
    print(f"{'N':>8} {'world':>5} {'before':>8} {'after':>7} {'ratio':>6} {'model before':>13} {'model after':>12} "
          f"{'s before':>9} {'s after':>8} {'top-1 before':>13} {'top-1 after':>12}")
    for n in args.n:
        cfg = {"n": n, "queries": args.queries, "dim": args.dim, "k": args.k, "classes": args.classes}
        for world in args.worlds:
            row = {**cfg, "world_size": world,
                   **{design: measure(design, world, cfg) for design in ("before", "after")},
                   "model_bytes": memory_model(n, args.queries, args.dim, world, args.k, args.classes)}
            row["ratio"] = round(row["before"]["peak_bytes_max_rank"] / row["after"]["peak_bytes_max_rank"], 2)
            results.append(row)
            print(f"{n:>8} {world:>5} {row['before']['peak_bytes_max_rank'] / mib:>8.1f} "
                  f"{row['after']['peak_bytes_max_rank'] / mib:>7.1f} {row['ratio']:>6.2f} "
                  f"{row['model_bytes']['before'] / mib:>13.1f} {row['model_bytes']['after'] / mib:>12.1f} "
                  f"{row['before']['seconds_max_rank']:>9.2f} {row['after']['seconds_max_rank']:>8.2f} "
                  f"{row['before']['top1']:>13.2f} {row['after']['top1']:>12.2f}", flush=True)
    imagenet = {dtype: memory_model(1_281_167, 50_000, 2048, 8, 200, 1000, storage_bytes=b)
                for dtype, b in (("fp32", 4), ("bf16", 2))}
    print(f"model, ImageNet N=1281167 D=2048 M=50000 k=200 C=1000, 8 ranks: before "
          f"{imagenet['fp32']['before'] / GIB:.2f} GiB, after {imagenet['fp32']['after'] / GIB:.2f} GiB "
          f"(bf16 bank {imagenet['bf16']['after'] / GIB:.2f} GiB) per rank")
    out = {"command": "python benchmarks/knn_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "config": {"queries": args.queries, "dim": args.dim, "k": args.k, "classes": args.classes},
           "torch": torch.__version__, "results": results,
           "model_imagenet_8_ranks_bytes": imagenet}
    write_json(args.output_json, out)


if __name__ == "__main__":
    main()
