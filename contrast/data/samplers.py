"""Samplers: PIC's sliding-window data scheduler and a resumable distributed sampler.

Sliding window (Cao et al., "Parametric Instance Classification for Unsupervised Visual Feature
Learning", NeurIPS 2020, Sec. 4.1): the data is a fixed seeded permutation ``perm`` of the N
indices; window-epoch ``e`` covers the stream positions ``[e * S, e * S + W)`` **modulo N** (the
public release took them modulo W, so its window never left the first W entries), shuffled inside
the window with a generator seeded by ``(seed, epoch)``. Every instance is therefore seen in W/S
consecutive windows, and a classifier row is updated W/S times within a short span of steps.

Both samplers are deterministic for a given ``(seed, epoch)`` on every rank, give every rank the
same number of indices, and can resume in the middle of an epoch:
``state_dict(consumed=k)`` records that this rank already consumed the first ``k`` indices of
the current epoch, and after ``load_state_dict`` iteration skips them (``set_epoch`` with the
restored epoch keeps the offset; any other epoch clears it). ``__len__`` is always this rank's
full share of the epoch; ``num_remaining`` is what the next iteration yields.

Both draw from ``indices`` (default ``range(len(dataset))``) and yield the global dataset indices
stored there; with ``--cache-mode part`` that is the rank's cached shard (see :func:`build_sampler`).
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, Optional, Sequence, Sized

import torch
from torch.utils.data import DistributedSampler, Sampler

from contrast.distributed import get_rank, get_world_size

_MASK63 = (1 << 63) - 1


def _generator(seed: int, stream: int, k: int) -> torch.Generator:
    """A generator for stream ``stream`` (0: pass permutations, 1: in-window shuffles), item ``k``."""
    g = torch.Generator()
    g.manual_seed((seed * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9 + k * 0x94D049BB133111EB) & _MASK63)
    return g


def window_epochs(epochs: int, num_samples: int, window_size: int) -> int:
    """Window-epochs that visit as many images as ``epochs`` plain epochs: ``ceil(epochs * N / W)``.

    W is clamped to N, as :class:`SlidingWindowSampler` does (a window cannot exceed the data).
    """
    if epochs < 0 or num_samples < 1 or window_size < 1:
        raise ValueError(f"window_epochs needs epochs >= 0, num_samples >= 1, window_size >= 1; "
                         f"got {epochs}, {num_samples}, {window_size}")
    return -(-epochs * num_samples // min(window_size, num_samples))


def _resolve_world(num_replicas: Optional[int], rank: Optional[int]) -> tuple:
    num_replicas = get_world_size() if num_replicas is None else num_replicas
    rank = get_rank() if rank is None else rank
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"invalid rank {rank} for num_replicas {num_replicas}")
    return num_replicas, rank


def _as_index_tensor(dataset: Sized, indices: Optional[Sequence[int]]) -> torch.Tensor:
    idx = torch.arange(len(dataset)) if indices is None else torch.as_tensor(indices, dtype=torch.int64).flatten()
    if idx.numel() == 0:
        raise ValueError("cannot sample from an empty dataset")
    return idx


class _Resumable:
    """Epoch + in-epoch offset bookkeeping shared by both samplers."""

    epoch: int
    consumed: int
    num_samples: int

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a different epoch than the restored one clears the resume offset."""
        if epoch != self.epoch:
            self.consumed = 0
        self.epoch = epoch

    def set_consumed(self, consumed: int) -> None:
        """Skip the first ``consumed`` indices of this rank's share in the coming iterations."""
        if not 0 <= consumed <= self.num_samples:
            raise ValueError(f"consumed={consumed} is not in [0, {self.num_samples}]")
        self.consumed = consumed

    @property
    def num_remaining(self) -> int:
        return self.num_samples - self.consumed

    def __len__(self) -> int:
        return self.num_samples

    def resume_global(self, state: Dict, global_consumed: int) -> None:
        """Continue the epoch of ``state`` (a rank's ``state_dict`` of a run with another number of
        replicas) after the first ``global_consumed`` entries of its global order.

        Rank ``r`` of ``w`` takes the global positions ``r, r + w, ...``, so when all ranks of the
        old run had taken ``k`` indices, the first ``k * w_old`` global positions are done; this
        rank skips ``global_consumed // num_replicas`` of its share (rounded down when it does not
        divide: up to ``num_replicas - 1`` samples are then seen twice).
        """
        self.load_state_dict({**state, "consumed": 0, "num_replicas": self.num_replicas, "rank": self.rank})
        self.set_consumed(min(int(global_consumed) // self.num_replicas, self.num_samples))

    def _check(self, state: Dict, keys: Sequence[str]) -> None:
        own = self.state_dict()
        for key in keys:
            if state.get(key) != own[key]:
                raise ValueError(f"sampler state_dict does not match this run: {key} is {state.get(key)} in the "
                                 f"checkpoint but {own[key]} here (dataset, window or flags changed?)")
        if state["consumed"] and state["num_replicas"] != own["num_replicas"]:
            raise ValueError(f"cannot resume mid-epoch (consumed={state['consumed']}) with num_replicas "
                             f"{own['num_replicas']}: the checkpoint used {state['num_replicas']}")


class SlidingWindowSampler(_Resumable, Sampler[int]):
    """PIC's sliding-window scheduler, split across ranks like ``DistributedSampler``.

    Args:
        dataset: sized dataset (only its length is used when ``indices`` is None).
        window_size: W, images per window-epoch over all ranks; clamped to N when larger.
        window_stride: S in ``[1, W]``, stream positions the window advances per window-epoch.
        num_replicas, rank: default to the process group's world size and rank.
        seed: seeds the permutation(s) and the in-window shuffles.
        shuffle_per_epoch: if True, draw a fresh permutation for each pass over the data (stream
            position ``q`` maps to ``perm_{q // N}[q % N]``), so windows keep sliding contiguously
            but the neighbourhood of an instance changes between passes. A window that straddles
            two passes may hold an index twice.
        drop_last: False pads the shuffled window by repeating its first entries until W_eff is
            divisible by ``num_replicas``; True truncates it. Rank r takes ``window[r::num_replicas]``.
        indices: global indices to draw from (default ``range(len(dataset))``); N is their number.
    """

    def __init__(self, dataset: Sized, window_size: int, window_stride: int, num_replicas: Optional[int] = None,
                 rank: Optional[int] = None, seed: int = 0, shuffle_per_epoch: bool = False, drop_last: bool = False,
                 indices: Optional[Sequence[int]] = None) -> None:
        if window_size < 1 or not 1 <= window_stride <= window_size:
            raise ValueError(f"need window_size >= 1 and 1 <= window_stride <= window_size, got "
                             f"window_size={window_size}, window_stride={window_stride}")
        self.num_replicas, self.rank = _resolve_world(num_replicas, rank)
        self._indices = _as_index_tensor(dataset, indices)
        self.dataset_size = self._indices.numel()
        self.window_size, self.window_stride = window_size, window_stride
        self.effective_window = min(window_size, self.dataset_size)
        self.seed, self.shuffle_per_epoch, self.drop_last = seed, shuffle_per_epoch, drop_last
        if drop_last:
            self.num_samples = self.effective_window // self.num_replicas
            if self.num_samples == 0:
                raise ValueError(f"drop_last with a window of {self.effective_window} images leaves nothing "
                                 f"for {self.num_replicas} ranks")
        else:
            self.num_samples = math.ceil(self.effective_window / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self.epoch, self.consumed = 0, 0
        self._perms: Dict[int, torch.Tensor] = {}

    def _permutation(self, data_pass: int) -> torch.Tensor:
        key = data_pass if self.shuffle_per_epoch else 0
        if key not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[key] = torch.randperm(self.dataset_size, generator=_generator(self.seed, 0, key))
        return self._perms[key]

    def window(self, epoch: int) -> torch.Tensor:
        """Positions into ``indices`` of window-epoch ``epoch``, shuffled, before the rank split."""
        n = self.dataset_size
        pos = epoch * self.window_stride + torch.arange(self.effective_window)
        passes = pos // n
        out = torch.empty_like(pos)
        for p in torch.unique(passes).tolist():
            sel = passes == p
            out[sel] = self._permutation(p)[pos[sel] % n]
        return out[torch.randperm(self.effective_window, generator=_generator(self.seed, 1, epoch))]

    def _rank_share(self) -> torch.Tensor:
        win = self.window(self.epoch)
        if self.total_size > win.numel():
            win = win.repeat(math.ceil(self.total_size / win.numel()))
        return self._indices[win[: self.total_size][self.rank:: self.num_replicas]]

    def __iter__(self) -> Iterator[int]:
        return iter(self._rank_share()[self.consumed:].tolist())

    def state_dict(self, consumed: Optional[int] = None) -> Dict:
        """Everything needed to continue the exact sequence; ``consumed``: indices of the current
        epoch this rank already used (default: the current resume offset)."""
        return {"kind": "sliding_window", "seed": self.seed, "epoch": self.epoch,
                "consumed": self.consumed if consumed is None else int(consumed),
                "window_size": self.window_size, "window_stride": self.window_stride,
                "num_samples": self.dataset_size, "shuffle_per_epoch": self.shuffle_per_epoch,
                "drop_last": self.drop_last, "num_replicas": self.num_replicas, "rank": self.rank}

    def load_state_dict(self, state: Dict) -> None:
        self._check(state, ("kind", "num_samples", "window_size", "window_stride", "shuffle_per_epoch", "drop_last"))
        self.seed, self._perms = state["seed"], {}
        self.epoch = state["epoch"]
        self.set_consumed(state["consumed"])


class ResumableDistributedSampler(_Resumable, DistributedSampler):
    """``torch.utils.data.DistributedSampler`` (shuffled by ``seed + epoch``, padded or truncated
    to equal rank lengths) over ``indices``, with ``state_dict`` / ``load_state_dict`` and a
    mid-epoch resume offset. In one process it is a seeded random (or sequential) sampler."""

    def __init__(self, dataset: Sized, num_replicas: Optional[int] = None, rank: Optional[int] = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 indices: Optional[Sequence[int]] = None) -> None:
        num_replicas, rank = _resolve_world(num_replicas, rank)
        self._indices = _as_index_tensor(dataset, indices)
        super().__init__(range(self._indices.numel()), num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)
        if self.num_samples == 0:
            raise ValueError(f"drop_last with {self._indices.numel()} images leaves nothing for {num_replicas} ranks")
        self.consumed = 0

    def __iter__(self) -> Iterator[int]:
        positions = list(super().__iter__())[self.consumed:]
        return iter(self._indices[positions].tolist())

    def state_dict(self, consumed: Optional[int] = None) -> Dict:
        return {"kind": "distributed", "seed": self.seed, "epoch": self.epoch,
                "consumed": self.consumed if consumed is None else int(consumed),
                "num_samples": len(self.dataset), "shuffle": self.shuffle, "drop_last": self.drop_last,
                "num_replicas": self.num_replicas, "rank": self.rank}

    def load_state_dict(self, state: Dict) -> None:
        self._check(state, ("kind", "num_samples", "shuffle", "drop_last"))
        self.seed, self.epoch = state["seed"], state["epoch"]
        self.set_consumed(state["consumed"])


def build_sampler(dataset: Sized, sliding_window: bool, window_size: int, window_stride: int, seed: int,
                  shuffle_per_epoch: bool, num_replicas: Optional[int] = None, rank: Optional[int] = None,
                  shuffle: bool = True, drop_last: bool = False):
    """The training sampler for ``dataset``.

    With ``--cache-mode part`` (``dataset.local_indices`` is set) each rank samples only its own
    cached shard: the shards already split the data, so the sampler runs as a single replica over
    the shard, and a sliding window uses ``ceil(W / world)`` and ``ceil(S / world)`` per rank.
    ``shuffle`` applies to the default sampler only (a sliding window is always shuffled).
    """
    num_replicas, rank = _resolve_world(num_replicas, rank)
    local = getattr(dataset, "local_indices", None)
    if local is not None:
        window_size = math.ceil(window_size / num_replicas)
        window_stride = math.ceil(window_stride / num_replicas)
        num_replicas, rank = 1, 0
    if sliding_window:
        return SlidingWindowSampler(dataset, window_size, window_stride, num_replicas, rank, seed=seed,
                                    shuffle_per_epoch=shuffle_per_epoch, drop_last=drop_last, indices=local)
    return ResumableDistributedSampler(dataset, num_replicas, rank, shuffle=shuffle, seed=seed, drop_last=drop_last,
                                       indices=local)
