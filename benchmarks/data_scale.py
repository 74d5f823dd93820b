"""Data layer at ImageNet scale and beyond (issue 15): today's design vs the indexed one.

Builds synthetic ImageNet-style zips in a temporary folder (stored entries of 8 bytes each, the
entry's number, under a ``train/`` top-level folder like real ImageNet zips, names
``train/n<class>/n<class>_<k>.JPEG``, 1000 classes, a matching ``train_map.txt``), plus the same
entries as a sharded set (``train-00000.zip ...``), and measures in one run, each measurement in
a fresh forked process:

* dataset init: baseline = a copy of the previous ``ZipImageDataset`` (Python map parsing,
  ``zipfile.ZipFile(...).infolist()`` dict); ours = ``ZipImageDataset`` with the index present
  (and, reported separately, the one-off index build when it is missing);
* a DataLoader worker as it starts: fork after the dataset is built (and read once) in the parent,
  then the first read in the child (after a ``gc.collect()``, which privatises the interpreter's
  own objects in any design): its latency and the child's extra private memory (Private_Dirty,
  what each additional worker costs; see :func:`proc_status`) and VmRSS after the first read and
  after 1000 random reads;
* random-read throughput in one process (entries/s, 20k uniformly random entries, page cache warm);
* samplers: peak extra RSS of a process that builds the sampler, calls ``set_epoch`` and draws
  its whole share (rank 0 of 8, W = 131072, S = 16384, epoch 5), and the time of ``set_epoch`` +
  the first index, at N = 1.28M, 10M and 100M; baseline = a copy of the previous samplers.

Results go to ``--out`` (JSON) and a Markdown table on stdout.

    python benchmarks/data_scale.py [--sizes 1281167 10000000] [--sampler-sizes 1281167 10000000 100000000]
        [--baseline-max 10000000] [--sampler-baseline-max 100000000] [--shards 16] [--workdir /tmp]
        [--out benchmarks/results/data_scale.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import shutil
import struct
import sys
import tempfile
import time
import zipfile
import zlib
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from contrast.data import ZipImageDataset  # noqa: E402
from contrast.data.samplers import ResumableDistributedSampler, SlidingWindowSampler  # noqa: E402
from contrast.option import new_parser  # noqa: E402
from contrast.seeding import stream_generator  # noqa: E402


def data_scale_parser(doc: str = "") -> argparse.ArgumentParser:
    """``benchmarks/data_scale.py``."""
    p = new_parser("data_scale.py", doc)
    p.add_argument("--sizes", type=int, nargs="*", default=[1281167, 10000000], help="dataset sizes N")
    p.add_argument("--sampler-sizes", type=int, nargs="*", default=[1281167, 10000000, 100000000],
                   help="sampler sizes N")
    p.add_argument("--baseline-max", type=int, default=10000000, help="largest N of the baseline dataset")
    p.add_argument("--sampler-baseline-max", type=int, default=100000000, help="largest N of the baseline samplers")
    p.add_argument("--shards", type=int, default=16, help="shards of the sharded set (0: skip it)")
    p.add_argument("--reads", type=int, default=20000, help="random reads per throughput measurement")
    p.add_argument("--workdir", default=None, help="where the synthetic zips go (default: a temp dir)")
    p.add_argument("--output-json", "--out", dest="out", default="benchmarks/results/data_scale.json",
                   help="results (--out: alias)")
    return p


_LOCAL = struct.Struct("<4s5H3L2H")        # signature, version, flags, method, time, date, crc, comp, size, n, m
_CENTRAL = struct.Struct("<4s6H3L5H2L")    # + version made by, comment len, disk, internal/external attrs, offset
_EOCD = struct.Struct("<4s4H2LH")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_LOCATOR = struct.Struct("<4sLQL")
_U32, _U16 = 0xFFFFFFFF, 0xFFFF


# ------------------------------------------------------------------------------------------------
# Fast writer of stored zips (tests/test_data_scale.py checks it against zipfile)
# ------------------------------------------------------------------------------------------------

def write_stored_zip(path: str, entries: Iterable[Tuple[bytes, bytes]], force_zip64: bool = False,
                     utf8: bool = True) -> int:
    """Write ``(name, data)`` entries as a stored zip (ZIP64 records where counts or offsets need
    them, or everywhere with ``force_zip64``); returns the entry count. ``utf8=False`` leaves the
    UTF-8 flag off (names are then CP437 for readers)."""
    flags = 0x800 if utf8 else 0
    cd_tmp = path + ".cd"
    count = offset = 0
    with open(path, "wb") as f, open(cd_tmp, "wb") as cd:
        for name, data in entries:
            crc = zlib.crc32(data)
            big = force_zip64 or offset >= _U32
            f.write(_LOCAL.pack(b"PK\x03\x04", 45 if big else 20, flags, 0, 0, 0x21, crc, len(data), len(data),
                                len(name), 0) + name + data)
            extra = struct.pack("<2HQ", 1, 8, offset) if big else b""
            cd.write(_CENTRAL.pack(b"PK\x01\x02", 45 if big else 20, 45 if big else 20, flags, 0, 0, 0x21, crc,
                                   len(data), len(data), len(name), len(extra), 0, 0, 0, 0o100644 << 16,
                                   _U32 if big else offset) + name + extra)
            offset += _LOCAL.size + len(name) + len(data)
            count += 1
    cd_size = os.path.getsize(cd_tmp)
    with open(path, "ab") as f, open(cd_tmp, "rb") as cd:
        shutil.copyfileobj(cd, f, 1 << 24)
        zip64 = force_zip64 or count >= _U16 or offset >= _U32 or cd_size >= _U32
        if zip64:
            eocd64_at = offset + cd_size
            f.write(_EOCD64.pack(b"PK\x06\x06", _EOCD64.size - 12, 45, 45, 0, 0, count, count, cd_size, offset))
            f.write(_LOCATOR.pack(b"PK\x06\x07", 0, eocd64_at, 1))
        counts = (_U16, _U16, _U32, _U32) if zip64 else (count, count, cd_size, offset)
        f.write(_EOCD.pack(b"PK\x05\x06", 0, 0, *counts, 0))
    os.remove(cd_tmp)
    return count


def synthetic_names(n: int, classes: int = 1000) -> Iterator[Tuple[str, int]]:
    """ImageNet-style ``n<class>/n<class>_<k>.JPEG`` names (k varies in length) and labels."""
    per = -(-n // classes)
    for i in range(n):
        c = i // per
        yield f"n{c:08d}/n{c:08d}_{(i % per) * 7 + 10}.JPEG", c


def write_synthetic(root: str, n: int, shards: int = 0, prefix: str = "train/") -> None:
    """``root/train.zip`` + ``train_map.txt`` (or ``shards`` shards), entry i holding ``i`` (8 bytes)."""
    os.makedirs(root, exist_ok=True)
    per = -(-n // shards) if shards else n
    names = synthetic_names(n)
    with open(os.path.join(root, "train_map.txt"), "w") as mf:
        for s in range(max(shards, 1)):
            lo, hi = s * per, min(n, (s + 1) * per)
            zname = f"train-{s:05d}.zip" if shards else "train.zip"
            lines: List[str] = []

            def entries() -> Iterator[Tuple[bytes, bytes]]:
                for i in range(lo, hi):
                    name, label = next(names)
                    lines.append(f"{zname + '/' if shards else ''}{name}\t{label}\n")
                    if len(lines) >= 65536:
                        mf.write("".join(lines))
                        lines.clear()
                    yield (prefix + name).encode(), struct.pack("<Q", i)

            write_stored_zip(os.path.join(root, zname), entries())
            mf.write("".join(lines))


# ------------------------------------------------------------------------------------------------
# Baseline: the previous design, kept here (not in the package) to measure against
# ------------------------------------------------------------------------------------------------

class BaselineZipDataset:
    """The previous ``ZipImageDataset`` data path: Python-list map parsing, a dict of ``ZipInfo``
    for the whole zip in the parent, a ``zipfile.ZipFile`` per worker pid, ``read(name)``."""

    def __init__(self, root: str, split: str = "train") -> None:
        self.zip_path = os.path.join(root, f"{split}.zip")
        paths, labels = [], []
        with open(os.path.join(root, f"{split}_map.txt"), "r", encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                parts = line.split("\t")
                paths.append(parts[0])
                labels.append(int(parts[1]))
        with zipfile.ZipFile(self.zip_path) as zf:
            infos = {i.filename: i for i in zf.infolist()}
        first = paths[0]
        self.prefix = "" if first in infos else [n for n in infos if n.endswith("/" + first)][0][: -len(first)]
        missing = [p for p in paths if self.prefix + p not in infos]
        assert not missing
        self._sizes = np.array([infos[self.prefix + p].file_size for p in paths], dtype=np.int64)
        self._paths = np.array(paths)
        self._labels = np.array(labels, dtype=np.int64)
        self._zip, self._zip_pid = None, None

    def __len__(self) -> int:
        return len(self._labels)

    def read_bytes(self, index: int) -> bytes:
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.zip_path)
            self._zip_pid = os.getpid()
        return self._zip.read(self.prefix + str(self._paths[index]))


class BaselineSlidingWindow:
    """The previous sliding-window sampler: int64 ``arange(N)`` + a stored ``randperm(N)``."""

    def __init__(self, n: int, window_size: int, window_stride: int, num_replicas: int, rank: int, seed: int = 0):
        self._indices = torch.arange(n)
        self.n, self.w, self.s, self.world, self.rank, self.seed = n, min(window_size, n), window_stride, \
            num_replicas, rank, seed
        self.num_samples = math.ceil(self.w / num_replicas)
        self.epoch, self._perm = 0, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self._perm is None:
            self._perm = torch.randperm(self.n, generator=stream_generator(self.seed, 0, 0))
        pos = self.epoch * self.s + torch.arange(self.w)
        win = self._perm[pos % self.n][torch.randperm(self.w, generator=stream_generator(self.seed, 1, self.epoch))]
        total = self.num_samples * self.world
        if total > win.numel():
            win = win.repeat(math.ceil(total / win.numel()))
        return iter(self._indices[win[:total][self.rank::self.world]].tolist())


class BaselineDistributed(torch.utils.data.DistributedSampler):
    """The previous default sampler: ``DistributedSampler``'s Python list of all N indices."""

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__()))


# ------------------------------------------------------------------------------------------------
# Measurement helpers
# ------------------------------------------------------------------------------------------------

def proc_status() -> Dict[str, float]:
    """VmRSS, VmHWM and Private_Dirty of this process in MB.

    After a fork every page is shared with the parent; what a worker writes (new objects, even
    in memory the parent had freed) becomes private and dirty: Private_Dirty is the memory each
    extra worker adds. (VmRSS also counts pages of memory-mapped files the worker reads: page
    cache, shared with every process that maps the file.)
    """
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) / 1024
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key == "Private_Dirty":
                out["private"] = int(rest.split()[0]) / 1024
    return out


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def in_child(fn: Callable[[], dict]) -> dict:
    """Run ``fn`` in a forked process and return its result (memory released afterwards)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = {"ok": True, **fn()}
        except BaseException as e:  # report, never fall through into the parent's code
            out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        with os.fdopen(w, "w") as f:
            json.dump(out, f)
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    out = json.loads(data)
    if not out.pop("ok"):
        raise RuntimeError(out["error"])
    return out


def worker_probe(ds, n: int, reads: int = 1000) -> dict:
    """What a DataLoader worker forked now pays: first-read latency and extra RSS."""
    def child() -> dict:
        rng = random.Random(1)
        gc.collect()  # privatises the interpreter's own objects, as any worker's first collection does
        before = proc_status()
        t = time.perf_counter()
        data = ds.read_bytes(rng.randrange(n))
        first = time.perf_counter() - t
        assert len(data) == 8
        after1 = proc_status()
        for _ in range(reads):
            ds.read_bytes(rng.randrange(n))
        after = proc_status()
        return {"first_read_ms": first * 1e3,
                "private_first_mb": after1["private"] - before["private"],
                "private_1000_mb": after["private"] - before["private"],
                "rss_first_mb": after1["VmRSS"] - before["VmRSS"], "rss_1000_mb": after["VmRSS"] - before["VmRSS"]}
    return in_child(child)


def throughput(ds, n: int, reads: int = 20000) -> float:
    rng = np.random.default_rng(2)
    idx = rng.integers(0, n, reads).tolist()
    for i in idx[:min(1000, reads)]:
        ds.read_bytes(i)
    t = time.perf_counter()
    for i in idx:
        data = ds.read_bytes(i)
    dt = time.perf_counter() - t
    assert struct.unpack("<Q", data)[0] == idx[-1], "read returned the wrong entry"
    return reads / dt


def measure_dataset(make: Callable[[], object], label: str, reads: int = 20000) -> dict:
    """Init time + RSS, a forked worker's first read, one-process throughput."""
    def run() -> dict:
        base = proc_status()
        t = time.perf_counter()
        ds = make()
        init = time.perf_counter() - t
        n = len(ds)
        out = {"init_s": init, "init_rss_mb": proc_status()["VmRSS"] - base["VmRSS"]}
        ds.read_bytes(0)  # the parent has read once (as the main process does before workers start)
        out.update(worker_probe(ds, n, min(reads, 1000)))
        out["reads_per_s"] = throughput(ds, n, reads)
        return out
    out = in_child(run)
    print(f"  {label}: " + ", ".join(f"{k} {v:.3g}" for k, v in out.items()), flush=True)
    return out


def measure_sampler(make: Callable[[], object], epoch: int = 5) -> dict:
    def run() -> dict:
        reset_peak()
        base = proc_status()["VmRSS"]
        t = time.perf_counter()
        sampler = make()
        sampler.set_epoch(epoch)
        it = iter(sampler)
        first = next(it)
        t_first = time.perf_counter() - t
        count = 1 + sum(1 for _ in it)
        total = time.perf_counter() - t
        return {"set_epoch_first_s": t_first, "epoch_s": total, "count": count, "first": int(first),
                "peak_mb": proc_status()["VmHWM"] - base}
    return in_child(run)


# ------------------------------------------------------------------------------------------------

def run_datasets(n: int, workdir: str, shards: int, baseline: bool, reads: int = 20000) -> dict:
    res: Dict[str, dict] = {"n": n}
    single, sharded = os.path.join(workdir, f"single-{n}"), os.path.join(workdir, f"sharded-{n}")
    t = time.perf_counter()
    write_synthetic(single, n)
    res["write_single_s"] = time.perf_counter() - t
    res["zip_mb"] = os.path.getsize(os.path.join(single, "train.zip")) / 2 ** 20
    print(f"n={n}: wrote {res['zip_mb']:.0f} MB zip in {res['write_single_s']:.0f} s", flush=True)
    if baseline:
        res["baseline"] = measure_dataset(lambda: BaselineZipDataset(single), "baseline", reads)

    def build(root: str) -> dict:
        def run() -> dict:
            t = time.perf_counter()
            reset_peak()
            base = proc_status()["VmRSS"]
            ZipImageDataset(root, "train")
            return {"build_s": time.perf_counter() - t, "build_peak_mb": proc_status()["VmHWM"] - base}
        out = in_child(run)
        out["index_mb"] = os.path.getsize(os.path.join(root, "train_map.idx")) / 2 ** 20
        return out

    res["ours_index"] = build(single)
    print(f"  ours index build: {res['ours_index']}", flush=True)
    res["ours"] = measure_dataset(lambda: ZipImageDataset(single, "train"), "ours", reads)
    shuffled = os.path.join(workdir, f"shuffled-{n}")  # the map in another order than the zip
    os.makedirs(shuffled)
    os.link(os.path.join(single, "train.zip"), os.path.join(shuffled, "train.zip"))
    with open(os.path.join(single, "train_map.txt")) as f:
        lines = f.readlines()
    with open(os.path.join(shuffled, "train_map.txt"), "w") as f:
        f.writelines(lines[i] for i in np.random.default_rng(0).permutation(len(lines)))
    del lines
    res["ours_index_shuffled_map"] = build(shuffled)
    print(f"  ours index build, shuffled map: {res['ours_index_shuffled_map']}", flush=True)
    shutil.rmtree(shuffled)
    shutil.rmtree(single)
    if shards:
        t = time.perf_counter()
        write_synthetic(sharded, n, shards=shards)
        res["write_sharded_s"] = time.perf_counter() - t
        res["ours_sharded_index"] = build(sharded)
        print(f"  ours sharded index build: {res['ours_sharded_index']}", flush=True)
        res["ours_sharded"] = measure_dataset(lambda: ZipImageDataset(sharded, "train"), f"ours ({shards} shards)",
                                              reads)
        shutil.rmtree(sharded)
    return res


def run_samplers(n: int, baseline: bool, world: int = 8, w: int = 131072, s: int = 16384) -> dict:
    res: Dict[str, object] = {"n": n}
    data = range(n)
    cases = {"ours_window": lambda: SlidingWindowSampler(data, w, s, world, 0, seed=0),
             "ours_default": lambda: ResumableDistributedSampler(data, world, 0, seed=0)}
    if baseline:
        cases = {"baseline_window": lambda: BaselineSlidingWindow(n, w, s, world, 0), **cases,
                 "baseline_default": lambda: BaselineDistributed(data, world, 0, seed=0)}
    for name, make in cases.items():
        res[name] = measure_sampler(make)
        print(f"  sampler n={n} {name}: {res[name]}", flush=True)
    return res


def table(results: dict) -> str:
    rows = ["| N | layout | init (s) | worker: first read (ms) | worker: extra private memory after 1 / 1000 "
            "reads (MB) | worker: extra VmRSS after 1000 reads (MB) | reads/s (1 process) | index build (s) (map "
            "in zip order / shuffled) |",
            "|---|---|---|---|---|---|---|---|"]
    for d in results["datasets"]:
        for key, name, build in (("baseline", "previous (zipfile)", None), ("ours", "one zip, index", "ours_index"),
                                 ("ours_sharded", f"{results['shards']} shards, index", "ours_sharded_index")):
            if key in d:
                r = d[key]
                b = f"{d[build]['build_s']:.1f}" if build else "-"
                if key == "ours" and "ours_index_shuffled_map" in d:
                    b += f" / {d['ours_index_shuffled_map']['build_s']:.1f}"
                rows.append(f"| {d['n']:,} | {name} | {r['init_s']:.2f} | {r['first_read_ms']:.1f} | "
                            f"{r['private_first_mb']:.1f} / {r['private_1000_mb']:.1f} | {r['rss_1000_mb']:.1f} | "
                            f"{r['reads_per_s']:,.0f} | {b} |")
    rows += ["", "| N | sampler | set_epoch + first index (s) | whole share (s) | peak extra RSS (MB) |",
             "|---|---|---|---|---|"]
    for d in results["samplers"]:
        for key, name in (("baseline_window", "sliding window, previous"), ("ours_window", "sliding window, ours"),
                          ("baseline_default", "default, previous"), ("ours_default", "default, ours")):
            if key in d:
                r = d[key]
                rows.append(f"| {d['n']:,} | {name} | {r['set_epoch_first_s']:.3f} | {r['epoch_s']:.2f} | "
                            f"{r['peak_mb']:.0f} |")
    return "\n".join(rows)


def main(argv: Optional[List[str]] = None) -> int:
    args = data_scale_parser(__doc__).parse_args(argv)
    torch.set_num_threads(1)
    workdir = tempfile.mkdtemp(prefix="data_scale-", dir=args.workdir)
    machine = f"{platform.node()} {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}"
    results = {"machine": machine,
               "load_before": os.getloadavg(), "shards": args.shards, "datasets": [], "samplers": []}
    t0 = time.time()
    try:
        for n in args.sizes:
            results["datasets"].append(run_datasets(n, workdir, args.shards, n <= args.baseline_max, args.reads))
        for n in args.sampler_sizes:
            results["samplers"].append(run_samplers(n, n <= args.sampler_baseline_max))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["load_after"] = os.getloadavg()
    results["wall_s"] = time.time() - t0
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
