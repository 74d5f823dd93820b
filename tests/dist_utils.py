"""Run a function on N real gloo processes on the CPU (for distributed tests).

Usage::

    def _worker(rank, world_size, out_dir, *args):   # module level, picklable
        ...                                            # process group is ready here
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))

    results = run_distributed(_worker, world_size=2, args=(...))   # list, one per rank
"""
from __future__ import annotations

import os
import socket
import tempfile
from typing import Callable, List, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, out_dir: str, args: Sequence) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, out_dir, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, args: Sequence = ()) -> List:
    """Spawn ``world_size`` gloo processes running ``fn(rank, world_size, out_dir, *args)``.

    Returns what each rank saved to ``<out_dir>/<rank>.pt`` (None where nothing was saved).
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_entry, args=(world_size, free_port(), fn, out_dir, tuple(args)),
                           nprocs=world_size, join=True, start_method="spawn")
        results = []
        for r in range(world_size):
            path = os.path.join(out_dir, f"{r}.pt")
            results.append(torch.load(path, weights_only=False) if os.path.exists(path) else None)
        return results
