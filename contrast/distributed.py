"""Every distributed primitive the project uses, in one place.

All functions work unchanged in a single process without an initialised process
group (they become identities), so methods and losses can be unit tested without
``torch.distributed``. Launchers: ``torchrun``, ``python -m torch.distributed.launch``
(``--local_rank``/``--local-rank`` or ``LOCAL_RANK``) and plain ``python``.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """What a process knows about its place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_dist() -> bool:
    """True when a process group with more than zero peers is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def resolve_device(device: Optional[str] = None, local_rank: int = 0) -> torch.device:
    """``device`` None/"auto" picks ``cuda:<local_rank % visible GPUs>`` when CUDA exists, else the CPU.

    The modulo covers launchers that bind GPUs per task (``srun --gpus-per-task=1``: each process
    sees one GPU, index 0, whatever its ``LOCAL_RANK``) as well as torchrun (every process sees all
    of them)."""
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device} was asked for but CUDA is not available")
        visible = torch.cuda.device_count()
        if dev.index is not None and dev.index >= visible:
            raise RuntimeError(f"--device {device}: this process sees {visible} GPU(s) (CUDA_VISIBLE_DEVICES="
                               f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
        dev = torch.device("cuda", local_rank % visible if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: Optional[str] = None, local_rank: Optional[int] = None,
                     timeout_minutes: int = 30) -> DistEnv:
    """Initialise the process group from torchrun / launch environment variables.

    With ``WORLD_SIZE`` unset or 1 no process group is created. The backend is
    nccl on CUDA and gloo on the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if local_rank is None or local_rank < 0:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    backend = None
    if world_size > 1 and not is_dist():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if backend == "nccl":
            # NCCL's watchdog aborts the communicator and ends this process when a collective fails or
            # times out (a peer died), instead of leaving it blocked in a CUDA synchronisation
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    elif is_dist():
        backend = dist.get_backend()
    return DistEnv(rank=get_rank(), world_size=get_world_size(), local_rank=local_rank,
                   device=dev, backend=backend)


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- gathers
@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) from all ranks along dim 0, in rank order.

    No gradient flows back; use :func:`all_gather_with_grad` where the gathered
    rows take part in a loss whose gradient must reach the other ranks.
    """
    if get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 with autograd support.

    The backward pass sums, over ranks, the gradients flowing into each rank's
    slice and returns that sum to its owner (``torch.distributed.nn`` semantics, which
    torch deprecates).
    Combined with DDP's gradient averaging this yields the gradient of the
    global mean loss.
    """
    if get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x.contiguous())


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0; backward: the gradient of the whole output summed over ranks, this
    rank's slice kept (all_reduce rather than reduce_scatter, which gloo lacks)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        out = [torch.empty_like(x) for _ in range(get_world_size())]
        dist.all_gather(out, x)
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


class _AllReduceSumWithGrad(torch.autograd.Function):
    """all_reduce(SUM); backward: the incoming gradient summed over ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_gather_variable(x: torch.Tensor) -> torch.Tensor:
    """Like :func:`all_gather_no_grad` for tensors whose dim 0 differs between ranks."""
    if get_world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = all_gather_no_grad(n).tolist()
    longest = max(sizes)
    padded = x.new_zeros((longest,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    gathered = all_gather_no_grad(padded)
    return torch.cat([gathered[r * longest: r * longest + s] for r, s in enumerate(sizes)], dim=0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place and returned (no autograd)."""
    if get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, in place and returned (no autograd)."""
    if get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x.div_(get_world_size())
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks with autograd (backward: the incoming gradient summed over ranks)."""
    if get_world_size() == 1:
        return x
    return _AllReduceSumWithGrad.apply(x.contiguous())


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    if get_world_size() > 1:
        dist.broadcast(x, src)
    return x


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from ``src`` to every rank and return it."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> List:
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """True only when ``flag`` is true on every rank (used to skip a step everywhere)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


# ------------------------------------------------------------------ shuffling BN (MoCo)
@torch.no_grad()
def batch_shuffle(x: torch.Tensor, generator: Optional[torch.Generator] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Shuffle a batch across ranks (MoCo's shuffling BN).

    Gathers ``x`` (B, ...) from all ranks, applies one permutation chosen on
    rank 0 and broadcast, and returns this rank's B rows of the shuffled global
    batch together with the index that undoes the shuffle. In one process the
    batch is permuted locally, which by itself changes no batch-norm statistic
    (one-process MoCo pairs it with ``contrast.models.split_bn.SplitBatchNorm``).
    """
    batch_local = x.shape[0]
    x_all = all_gather_no_grad(x)
    total = x_all.shape[0]
    perm = torch.randperm(total, generator=generator, device="cpu").to(x.device)
    perm = broadcast(perm, src=0)
    unshuffle = torch.argsort(perm)
    rank = get_rank()
    mine = perm[rank * batch_local:(rank + 1) * batch_local]
    return x_all[mine], unshuffle


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, unshuffle: torch.Tensor) -> torch.Tensor:
    """Undo :func:`batch_shuffle` for the encoded batch ``x`` (B, ...)."""
    batch_local = x.shape[0]
    x_all = all_gather_no_grad(x)
    rank = get_rank()
    mine = unshuffle[rank * batch_local:(rank + 1) * batch_local]
    return x_all[mine]


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Batch norm whose batch statistics cover the batches of all ranks, on any device.

    ``torch.nn.SyncBatchNorm`` runs on accelerators only; this module does the same on
    the CPU (gloo): the per-channel sums of x and x^2 and the element count are summed
    over ranks with an autograd-aware all-reduce, so both the statistics and their
    gradients equal those of one process holding the whole global batch. Running
    statistics use the unbiased global variance, as ``BatchNorm2d`` does.
    Input: (B, C, ...) with the same C on every rank; B may differ.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects (B, C, ...) input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training or get_world_size() == 1:
            return super().forward(x)
        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        count = xf.new_tensor([x.numel() / channels])
        totals = all_reduce_sum_with_grad(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        n = totals[-1]
        mean = totals[:channels] / n
        var = (totals[channels:2 * channels] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Cross-rank batch norm when running on several ranks, the model unchanged otherwise.

    On accelerators torch's ``SyncBatchNorm``; on the CPU :class:`GlobalBatchNorm`
    (DDP refuses ``SyncBatchNorm`` on CPU modules). State-dict keys are unchanged.
    """
    if get_world_size() == 1:
        return model
    if device.type != "cpu":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _swap_batchnorm(model)


def _swap_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        bn = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats)
        bn.load_state_dict(module.state_dict())
        if module.affine:   # the same Parameters, as torch's convert: a frozen copy (BYOL's target) stays frozen
            bn.weight, bn.bias = module.weight, module.bias
        bn.train(module.training)
        return bn
    for name, child in module.named_children():
        setattr(module, name, _swap_batchnorm(child))
    return module


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (the module itself otherwise)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def shard_range(n: int, rank: Optional[int] = None, world_size: Optional[int] = None) -> Tuple[int, int]:
    """[start, stop) of the contiguous block of ``n`` items owned by ``rank``."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    per = (n + world_size - 1) // world_size
    start = min(rank * per, n)
    return start, min(start + per, n)


@torch.no_grad()
def gather_rows_to_cpu(x: torch.Tensor, dst: int = 0, chunk_rows: int = 16384) -> Optional[torch.Tensor]:
    """A copy of every rank's ``x`` (rows may differ between ranks) concatenated in rank order, on
    ``dst``'s CPU (None on the other ranks). Rows travel ``chunk_rows`` per rank at a time, so no device holds more
    than ``world_size * chunk_rows`` rows of it (all_gather: gloo and NCCL alike)."""
    if get_world_size() == 1:
        return x.to("cpu", copy=True)
    world, rank = get_world_size(), get_rank()
    sizes = all_gather_no_grad(torch.tensor([x.shape[0]], device=x.device)).tolist()
    pieces: List[List[torch.Tensor]] = [[] for _ in range(world)]
    for start in range(0, max(sizes), chunk_rows):
        chunk = x[start:start + chunk_rows]
        padded = x.new_zeros((chunk_rows,) + tuple(x.shape[1:]))
        padded[:chunk.shape[0]] = chunk
        gathered = all_gather_no_grad(padded)
        if rank == dst:
            for r in range(world):
                n = min(max(sizes[r] - start, 0), chunk_rows)
                pieces[r].append(gathered[r * chunk_rows:r * chunk_rows + n].cpu())
    if rank != dst:
        return None
    flat = [p for per_rank in pieces for p in per_rank]
    return torch.cat(flat) if flat else x.new_zeros((0,) + tuple(x.shape[1:]), device="cpu")
