"""Time one PIC classifier step (forward, backward, optimiser update) and its extra memory.

Dense head: W (N, D) ``nn.Parameter`` + ``torch.optim.SGD`` (momentum 0.9, wd 1e-4), full softmax.
Sampled head: :class:`contrast.models.pic_sampled.SampledInstanceClassifier` with K recent
negatives, weight correction on, table in memory-mapped files on disk (``--storage disk``), so
N = 100M (51 GB of weights + 51 GB of momentum) runs on a 24 GiB machine.

Each configuration runs in its own subprocess. Extra memory = peak anonymous RSS during a step
minus the anonymous RSS before it (polled every millisecond from /proc/self/status); the table
itself (dense: W + momentum, anonymous; sampled: file pages) is excluded; workers run with
MALLOC_MMAP_THRESHOLD_=131072 so freed blocks leave the resident set at once. Sampled runs first fill
the recent-id queue (K ids visited) so the timed steps are in steady state.

    python benchmarks/pic_head.py                       # full table, writes benchmarks/results/pic_head.json
    python benchmarks/pic_head.py --sizes 100000 --reps 2 --dense-sizes 100000   # quick check

``--pic-storage-dir DIR`` puts the sampled head's table files in DIR (created if missing; each run uses
a temporary sub-folder it removes), e.g. on the disk a real run would use.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A fixed mmap threshold makes glibc return every large block to the OS when freed, so the
# resident size follows the live tensors (no heap kept from earlier steps hides a step's peak).
WORKER_ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
sys.path.insert(0, ROOT)
from contrast import engine  # noqa: E402
from contrast.option import add_debug_flag, add_output_json_flag, add_seed_flag, new_parser  # noqa: E402


def pic_head_parser(doc: str = "", output_json: str = "") -> argparse.ArgumentParser:
    p = new_parser("pic_head.py", doc)
    p.add_argument("--sizes", type=int, nargs="+", default=[1_280_000, 10_000_000, 100_000_000],
                   help="N of the sampled head")
    p.add_argument("--dense-sizes", type=int, nargs="*", default=[1_280_000], help="N of the dense head")
    p.add_argument("--feature-dim", "--dim", dest="feature_dim", type=int, default=128,
                   help="embedding dimension D (--dim: alias)")
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=int, default=256,
                   help="images per step (--batch: alias)")
    p.add_argument("--pic-num-negative", "--num-negative", dest="pic_num_negative", type=int, default=65536,
                   help="recent negatives K of the sampled head (--num-negative: alias)")
    p.add_argument("--reps", type=int, default=5, help="timed steps per configuration (the median is kept)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--pic-storage-dir", "--storage-root", dest="pic_storage_dir", default=None,
                   help="folder for the sampled head's table files, created if missing (default: the system's "
                        "temporary folder; --storage-root: alias)")
    add_seed_flag(p)
    add_output_json_flag(p, output_json, "--out")
    add_debug_flag(p)
    p.add_argument("--worker", choices=["dense", "sampled"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    return p


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakAnon:
    """Polls anonymous RSS in a thread while the block runs (torch kernels release the GIL)."""

    def __enter__(self):
        self.base = rss_anon_bytes()
        self.peak = self.base
        self._stop = False
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop:
            self.peak = max(self.peak, rss_anon_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.peak = max(self.peak, rss_anon_bytes())
        self._stop = True
        self._thread.join()

    @property
    def extra(self) -> int:
        return self.peak - self.base


def run_dense(n: int, d: int, b: int, reps: int) -> dict:
    from contrast.models.losses import pic_loss
    weight = torch.nn.Parameter(torch.randn(n, d) * 0.01)
    opt = torch.optim.SGD([weight], lr=0.03, momentum=0.9, weight_decay=1e-4)
    times, extras = [], []
    for rep in range(reps + 1):                       # rep 0 warms up (creates the momentum buffer)
        z = F.normalize(torch.randn(b, d), dim=1).requires_grad_()
        index = torch.randint(0, n, (b,))
        with PeakAnon() as mem:
            t0 = time.perf_counter()
            pic_loss(z, weight, index, 0.2).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
        if rep:
            times.append(dt)
            extras.append(mem.extra)
    return {"head": "dense", "N": n, "step_s": statistics.median(times), "extra_mb": statistics.median(extras) / 2**20,
            "table_mb": 2 * n * d * 4 / 2**20, "step_s_all": times}


def run_sampled(n: int, d: int, b: int, k: int, reps: int, storage_dir: str) -> dict:
    from contrast.models.pic_sampled import SampledInstanceClassifier
    t0 = time.perf_counter()
    clf = SampledInstanceClassifier(n, d, 0.2, num_negative=k, storage="disk", storage_dir=storage_dir)
    setup_s = time.perf_counter() - t0
    fill = 4096
    for step in range(k // fill + 1):   # earlier steps: K visited ids, their rows materialised and updated
        ids = torch.randint(0, n, (fill,)).unique()
        clf.sgd_step(ids, torch.randn(ids.shape[0], d) * 1e-3, 0.03)
        clf.enqueue(ids)
    times, extras = [], []
    for rep in range(reps + 1):
        z = F.normalize(torch.randn(b, d), dim=1).requires_grad_()
        index = torch.randint(0, n, (b,))
        with PeakAnon() as mem:
            t0 = time.perf_counter()
            clf(z, index, []).backward()
            clf.on_train_step_end(1000 + rep, 0.03)
            dt = time.perf_counter() - t0
        if rep:
            times.append(dt)
            extras.append(mem.extra)
    return {"head": "sampled", "N": n, "K": k, "step_s": statistics.median(times),
            "extra_mb": statistics.median(extras) / 2**20, "table_mb": 2 * n * d * 4 / 2**20,
            "num_candidates": int(clf.stats()["num_candidates"]), "setup_s": setup_s, "step_s_all": times}


def prepare_storage_dir(path):
    """Create ``--pic-storage-dir`` if missing; a path that cannot be a folder is a one-line error."""
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--pic-storage-dir {path}: cannot create the folder ({e.strerror or e})") from e
    return path


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.worker == "dense":
        out = run_dense(args.n, args.feature_dim, args.batch_size, args.reps)
    else:
        directory = tempfile.mkdtemp(prefix="pic_head_", dir=args.pic_storage_dir)
        try:
            out = run_sampled(args.n, args.feature_dim, args.batch_size, args.pic_num_negative, args.reps, directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    print("RESULT " + json.dumps(out), flush=True)


def main(argv=None) -> dict:
    p = pic_head_parser(__doc__, os.path.join(ROOT, "benchmarks", "results", "pic_head.json"))
    args = p.parse_args(argv)
    args.pic_storage_dir = prepare_storage_dir(args.pic_storage_dir)
    if args.worker:
        return worker(args)

    common = ["--feature-dim", str(args.feature_dim), "--batch-size", str(args.batch_size), "--pic-num-negative",
              str(args.pic_num_negative), "--reps", str(args.reps), "--threads", str(args.threads),
              "--seed", str(args.seed)]
    if args.pic_storage_dir:
        common += ["--pic-storage-dir", args.pic_storage_dir]
    runs = [("dense", n) for n in args.dense_sizes] + [("sampled", n) for n in args.sizes]
    results = []
    for head, n in runs:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", head, "--n", str(n)] + common,
                              capture_output=True, text=True, env=WORKER_ENV)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"{head} N={n} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        res = json.loads(lines[-1][len("RESULT "):])
        results.append(res)
        print(f"{head:8s} N={n:>11,d}  step {res['step_s'] * 1e3:9.1f} ms  extra memory {res['extra_mb']:9.1f} MB"
              f"  (table {res['table_mb']:,.0f} MB)", flush=True)

    summary = {}
    dense = {r["N"]: r for r in results if r["head"] == "dense"}
    sampled = {r["N"]: r for r in results if r["head"] == "sampled"}
    for n in sorted(set(dense) & set(sampled)):
        summary[f"dense/sampled at N={n}"] = {
            "time_ratio": dense[n]["step_s"] / sampled[n]["step_s"],
            "extra_memory_ratio": dense[n]["extra_mb"] / max(sampled[n]["extra_mb"], 1e-9)}
    if len(sampled) >= 2:
        lo, hi = min(sampled), max(sampled)
        summary[f"sampled N={hi} / N={lo}"] = {
            "time_ratio": sampled[hi]["step_s"] / sampled[lo]["step_s"],
            "extra_memory_ratio": sampled[hi]["extra_mb"] / max(sampled[lo]["extra_mb"], 1e-9)}
    for key, val in summary.items():
        print(f"{key}: time x{val['time_ratio']:.2f}, extra memory x{val['extra_memory_ratio']:.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("worker", "n", "debug")}
    config["output_json"] = os.path.relpath(os.path.abspath(args.output_json), ROOT)
    report = {"config": config,
              "torch": torch.__version__, "results": results, "summary": summary}
    with open(args.output_json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.output_json}")
    return report


if __name__ == "__main__":
    engine.run_cli(main)
