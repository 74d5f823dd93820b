"""Run a function on N real gloo processes on the CPU (for distributed tests).

Usage::

    def _worker(rank, world_size, out_dir, *args):   # module level, picklable
        ...                                            # process group is ready here
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))

    results = run_distributed(_worker, world_size=2, args=(...))   # list, one per rank

:func:`train_like_ddp` runs a method through the loop's hooks on this rank's slice of each global
batch with gradients averaged over ranks (what DDP does); :func:`assert_same_training` compares its
records of 2 ranks x B/2 with 1 process x B.
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


def train_like_ddp(method, optimizer, global_views: Sequence[Sequence[torch.Tensor]], rank: int,
                   world_size: int) -> dict:
    """The training loop's steps on this rank's slice of each global batch, gradients averaged over
    ranks as DDP does: forward, backward, mean of every gradient over ranks, ``on_before_optimizer_step``,
    ``optimizer.step()``, ``on_train_step_end``.

    ``global_views[s]`` are the (G, ...) views of step s. Returns ``loss`` (per step, averaged over
    ranks), ``grads`` (per step, name -> averaged gradient after the pre-step hook), ``out`` (per
    step, this rank's other outputs as floats) and ``state`` (the state dict at the end).
    """
    from contrast import distributed as cd
    record: dict = {"loss": [], "grads": [], "out": []}
    for step, views in enumerate(global_views):
        b = views[0].shape[0] // world_size
        optimizer.zero_grad()
        out = method([v[rank * b:(rank + 1) * b] for v in views], torch.arange(b))
        out["loss"].backward()
        for p in method.parameters():
            if p.grad is not None:
                cd.all_reduce_mean(p.grad)
        method.on_before_optimizer_step(step)
        record["grads"].append({n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None})
        optimizer.step()
        method.on_train_step_end(step, optimizer.param_groups[0]["lr"])
        record["loss"].append(cd.all_reduce_mean(out["loss"].detach().clone()))
        record["out"].append({k: float(v) for k, v in out.items() if k != "loss"})
    record["state"] = {n: t.detach().clone() for n, t in method.state_dict().items()}
    return record


def assert_same_training(got: dict, ref: dict, zero_grads: Sequence[str] = (), atol: float = 1e-5,
                         rtol: float = 1e-4) -> None:
    """``got`` and ``ref`` (records of :func:`train_like_ddp`) agree: losses, gradients (non-zero, except
    ``zero_grads``: parameters whose true gradient is zero, e.g. a bias feeding batch norm, compared as
    both below 1e-4) and the final state."""
    def close(a, b):
        return torch.allclose(a, b, atol=atol, rtol=rtol)

    for step, (loss, grads) in enumerate(zip(ref["loss"], ref["grads"])):
        assert close(got["loss"][step], loss), step
        assert got["grads"][step].keys() == grads.keys(), step
        for n, g in grads.items():
            if n in zero_grads:
                assert max(g.abs().max(), got["grads"][step][n].abs().max()) < 1e-4, (step, n)
            else:
                assert g.abs().sum() > 0 and close(got["grads"][step][n], g), (step, n)
    for n, t in ref["state"].items():
        assert torch.equal(got["state"][n], t) if t.dtype == torch.long else close(got["state"][n], t), n
