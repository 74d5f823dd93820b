"""Samplers: PIC's sliding-window data scheduler and a resumable distributed sampler.

Sliding window (Cao et al., "Parametric Instance Classification for Unsupervised Visual Feature
Learning", NeurIPS 2020, Sec. 4.1): the data is a fixed seeded permutation ``perm`` of the N
indices; window-epoch ``e`` covers the stream positions ``[e * S, e * S + W)`` **modulo N** (the
public release took them modulo W, so its window never left the first W entries), shuffled inside
the window with a generator seeded by ``(seed, epoch)``. Every instance is therefore seen in W/S
consecutive windows, and a classifier row is updated W/S times within a short span of steps.
``perm`` is computed, not stored (:class:`FeistelPermutation`): memory and time per window-epoch
are O(W) whatever N is (100M images cost nothing more than 1.28M).

Both samplers are deterministic for a given ``(seed, epoch)`` on every rank, give every rank the
same number of indices, and can resume in the middle of an epoch:
``state_dict(consumed=k)`` records that this rank already consumed the first ``k`` indices of
the current epoch, and after ``load_state_dict`` iteration skips them (``set_epoch`` with the
restored epoch keeps the offset; any other epoch clears it). ``__len__`` is always this rank's
full share of the epoch; ``num_remaining`` is what the next iteration yields.

Both draw from ``indices`` (default ``range(len(dataset))``) and yield the global dataset indices
stored there; with ``--cache-mode part`` that is the rank's cached shard (see :func:`build_sampler`).

Per-sample augmentation seeds: every index is yielded as a :class:`SampleIndex`, an ``int`` that
also carries ``aug_seed = sample_seed(seed, epoch, position)``, where ``position`` is the
sample's place in the epoch's *global* order (rank ``r`` of ``w`` yields positions
``r, r + w, r + 2w, ...``). The datasets seed the worker-side transform with it, so a sample's
crops depend only on (seed, epoch, position): not on the worker that loads it, on the number of
workers, on a mid-epoch resume, or on the world size (for the same global position).
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, Optional, Sequence, Sized

import numpy as np
import torch
from torch.utils.data import DistributedSampler, Sampler

from contrast.distributed import get_rank, get_world_size
from contrast.seeding import GOLDEN64, MASK63, mix64, mix_int, stream_generator

_CHUNK = 1 << 16  # indices converted to Python objects at a time
_PASS_PERMUTATIONS, _WINDOW_SHUFFLES = 0, 1  # the streams of stream_generator


def sample_seeds(seed: int, epoch: int, positions: np.ndarray) -> np.ndarray:
    """63-bit augmentation seeds (int64) of the samples at ``positions`` of epoch ``epoch``."""
    base = mix_int(mix_int(seed) + epoch * GOLDEN64)
    z = mix64(positions.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03) + np.uint64(base))
    return (z & np.uint64(MASK63)).astype(np.int64)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of the sample at global ``position`` of ``epoch`` (see module doc)."""
    return int(sample_seeds(seed, epoch, np.array([position]))[0])


class SampleIndex(int):
    """A dataset index (an ``int``) that carries ``aug_seed`` for the worker-side transform."""

    def __new__(cls, index: int, aug_seed: int) -> "SampleIndex":
        obj = super().__new__(cls, index)
        obj.aug_seed = aug_seed
        return obj

    def __reduce__(self):
        return SampleIndex, (int(self), self.aug_seed)

    def __repr__(self) -> str:
        return f"SampleIndex({int(self)}, aug_seed={self.aug_seed})"


class FeistelPermutation:
    """A seeded pseudo-random permutation of ``range(n)``, evaluated element-wise, never stored.

    A balanced Feistel network (6 rounds, SplitMix64 round function) permutes the ``2^(2h)``
    integers of ``2h`` bits, ``2^(2h) < 4n``; values that land outside ``[0, n)`` are sent
    through it again (cycle walking), which keeps a bijection of ``range(n)`` (Black & Rogaway,
    "Ciphers with arbitrary finite domains", 2002). Evaluating m positions costs O(m) time and
    memory.
    """

    ROUNDS = 6

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError(f"FeistelPermutation needs n >= 1, got {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = [np.uint64(mix_int(mix_int(key) + r * GOLDEN64)) for r in range(self.ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = x >> half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (mix64(right ^ k) & self.mask)
        return (left << half) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """``perm[positions]`` (int64) for positions in ``[0, n)``."""
        y = self._encrypt(np.asarray(positions, dtype=np.int64).astype(np.uint64))
        out = np.flatnonzero(y >= np.uint64(self.n))
        while len(out):
            y[out] = self._encrypt(y[out])
            out = out[y[out] >= np.uint64(self.n)]
        return y.astype(np.int64)


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


def _as_indices(dataset: Sized, indices: Optional[Sequence[int]]) -> tuple:
    """``(N, index tensor or None for range(N))``."""
    if indices is None:
        n = len(dataset)
        if n == 0:
            raise ValueError("cannot sample from an empty dataset")
        return n, None
    idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64).flatten()
    if idx.numel() == 0:
        raise ValueError("cannot sample from an empty dataset")
    return idx.numel(), idx


class ResumableSampler(Sampler[int]):
    """What the training loop needs of a sampler (:meth:`contrast.trainer.Trainer.fit`): ``set_epoch``,
    ``state_dict`` / ``load_state_dict`` (saved in every checkpoint), ``set_consumed`` and
    ``num_remaining`` (a mid-epoch resume continues after the samples already consumed), ``len``.

    Subclasses implement ``_share(k0, k1) -> LongTensor``: the dataset indices at this rank's
    share positions ``k0 .. k1-1`` of the current epoch; ``state_dict`` and ``load_state_dict``.
    An evaluation sampler (:class:`contrast.eval.features.ShardSampler`) need not be one.
    """

    epoch: int
    consumed: int
    num_samples: int
    num_replicas: int
    rank: int
    seed: int
    _key_offset: int = 0
    _key_stride: int = 1

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

    def global_positions(self, k0: int, k1: int) -> np.ndarray:
        """Positions in the epoch's global order of this rank's share entries ``k0 .. k1-1``."""
        local = self.rank + self.num_replicas * np.arange(k0, k1, dtype=np.int64)
        return self._key_offset + self._key_stride * local

    def _iterate(self, share) -> Iterator[SampleIndex]:
        for k0 in range(self.consumed, self.num_samples, _CHUNK):
            k1 = min(k0 + _CHUNK, self.num_samples)
            seeds = sample_seeds(self.seed, self.epoch, self.global_positions(k0, k1)).tolist()
            for i, s in zip(share(k0, k1).tolist(), seeds):
                yield SampleIndex(i, s)

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

    def state_dict(self, consumed: Optional[int] = None) -> Dict:
        """Everything needed to continue the exact sequence; ``consumed``: indices of the current
        epoch this rank already used (default: the current resume offset)."""
        raise NotImplementedError

    def load_state_dict(self, state: Dict) -> None:
        raise NotImplementedError

    def _check(self, state: Dict, keys: Sequence[str]) -> None:
        own = self.state_dict()
        for key in keys:
            if state.get(key) != own[key]:
                raise ValueError(f"sampler state_dict does not match this run: {key} is {state.get(key)} in the "
                                 f"checkpoint but {own[key]} here (dataset, window or flags changed?)")
        if state["consumed"] and state["num_replicas"] != own["num_replicas"]:
            raise ValueError(f"cannot resume mid-epoch (consumed={state['consumed']}) with num_replicas "
                             f"{own['num_replicas']}: the checkpoint used {state['num_replicas']}")


class SlidingWindowSampler(ResumableSampler):
    """PIC's sliding-window scheduler, split across ranks like ``DistributedSampler``.

    Args:
        dataset: sized dataset (only its length is used when ``indices`` is None).
        window_size: W, images per window-epoch over all ranks; clamped to N when larger.
        window_stride: S in ``[1, W]``, stream positions the window advances per window-epoch.
        num_replicas, rank: default to the process group's world size and rank.
        seed: seeds the permutation(s), the in-window shuffles and the augmentation seeds.
        shuffle_per_epoch: if True, draw a fresh permutation for each pass over the data (stream
            position ``q`` maps to ``perm_{q // N}[q % N]``), so windows keep sliding contiguously
            but the neighbourhood of an instance changes between passes. A window that straddles
            two passes may hold an index twice.
        drop_last: False pads the shuffled window by repeating its first entries until W_eff is
            divisible by ``num_replicas``; True truncates it. Rank r takes ``window[r::num_replicas]``.
        indices: global indices to draw from (default ``range(len(dataset))``); N is their number.
        key_offset, key_stride: augmentation-seed positions are ``key_offset + key_stride * p``
            for global position p (``build_sampler`` sets them so that ranks sampling their own
            cached shards get distinct seeds).

    Memory is O(W): the pass permutation is a :class:`FeistelPermutation`. A state dict saved
    before the permutation was computed (no ``"permutation"`` key) restores the stored
    ``torch.randperm`` permutation it used, so old runs resume on the same sequence.
    """

    def __init__(self, dataset: Sized, window_size: int, window_stride: int, num_replicas: Optional[int] = None,
                 rank: Optional[int] = None, seed: int = 0, shuffle_per_epoch: bool = False, drop_last: bool = False,
                 indices: Optional[Sequence[int]] = None, key_offset: int = 0, key_stride: int = 1) -> None:
        if window_size < 1 or not 1 <= window_stride <= window_size:
            raise ValueError(f"need window_size >= 1 and 1 <= window_stride <= window_size, got "
                             f"window_size={window_size}, window_stride={window_stride}")
        self.num_replicas, self.rank = _resolve_world(num_replicas, rank)
        self.dataset_size, self._indices = _as_indices(dataset, indices)
        self.window_size, self.window_stride = window_size, window_stride
        self.effective_window = min(window_size, self.dataset_size)
        self.seed, self.shuffle_per_epoch, self.drop_last = seed, shuffle_per_epoch, drop_last
        self._key_offset, self._key_stride = key_offset, key_stride
        if drop_last:
            self.num_samples = self.effective_window // self.num_replicas
            if self.num_samples == 0:
                raise ValueError(f"drop_last with a window of {self.effective_window} images leaves nothing "
                                 f"for {self.num_replicas} ranks")
        else:
            self.num_samples = math.ceil(self.effective_window / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self.epoch, self.consumed = 0, 0
        self.permutation = "feistel"
        self._legacy_perms: Dict[int, torch.Tensor] = {}
        self._window_cache: Optional[tuple] = None

    def _permute(self, data_pass: int, positions: np.ndarray) -> np.ndarray:
        """``perm_pass[positions]``: the pass's permutation of ``range(N)`` at ``positions``."""
        key = data_pass if self.shuffle_per_epoch else 0
        if self.permutation == "feistel":
            return FeistelPermutation(self.dataset_size, mix_int(self.seed) ^ key).__call__(positions)
        if key not in self._legacy_perms:  # state dicts of older versions: the stored randperm
            if len(self._legacy_perms) >= 2:
                self._legacy_perms.pop(min(self._legacy_perms))
            generator = stream_generator(self.seed, _PASS_PERMUTATIONS, key)
            self._legacy_perms[key] = torch.randperm(self.dataset_size, generator=generator)
        return self._legacy_perms[key][torch.from_numpy(positions)].numpy()

    def window(self, epoch: int) -> torch.Tensor:
        """Positions into ``indices`` of window-epoch ``epoch``, shuffled, before the rank split."""
        key = (epoch, self.seed, self.permutation)
        if self._window_cache is not None and self._window_cache[0] == key:
            return self._window_cache[1]
        n = self.dataset_size
        pos = epoch * self.window_stride + np.arange(self.effective_window, dtype=np.int64)
        passes = pos // n
        out = np.empty_like(pos)
        for p in np.unique(passes).tolist():
            sel = passes == p
            out[sel] = self._permute(p, pos[sel] % n)
        shuffle = torch.randperm(self.effective_window, generator=stream_generator(self.seed, _WINDOW_SHUFFLES, epoch))
        win = torch.from_numpy(out)[shuffle]
        self._window_cache = (key, win)
        return win

    def _share(self, k0: int, k1: int) -> torch.Tensor:
        win = self.window(self.epoch)
        local = self.rank + self.num_replicas * torch.arange(k0, k1)
        pos = win[local % win.numel()]  # padding repeats the window's first entries
        return pos if self._indices is None else self._indices[pos]

    def __iter__(self) -> Iterator[int]:
        return self._iterate(self._share)

    def state_dict(self, consumed: Optional[int] = None) -> Dict:
        """Everything needed to continue the exact sequence; ``consumed``: indices of the current
        epoch this rank already used (default: the current resume offset)."""
        return {"kind": "sliding_window", "seed": self.seed, "epoch": self.epoch,
                "consumed": self.consumed if consumed is None else int(consumed),
                "window_size": self.window_size, "window_stride": self.window_stride,
                "num_samples": self.dataset_size, "shuffle_per_epoch": self.shuffle_per_epoch,
                "drop_last": self.drop_last, "num_replicas": self.num_replicas, "rank": self.rank,
                "permutation": self.permutation}

    def load_state_dict(self, state: Dict) -> None:
        self._check(state, ("kind", "num_samples", "window_size", "window_stride", "shuffle_per_epoch", "drop_last"))
        self.seed, self.epoch = state["seed"], state["epoch"]
        self.permutation = state.get("permutation", "randperm")
        self._legacy_perms, self._window_cache = {}, None
        self.set_consumed(state["consumed"])


class ResumableDistributedSampler(ResumableSampler, DistributedSampler):
    """``torch.utils.data.DistributedSampler`` (shuffled by ``seed + epoch``, padded or truncated
    to equal rank lengths) over ``indices``, with ``state_dict`` / ``load_state_dict`` and a
    mid-epoch resume offset. In one process it is a seeded random (or sequential) sampler.

    The same index sequence as ``DistributedSampler``, in int32 memory: the epoch's
    ``torch.randperm(N)`` (int32, 4N bytes) lives only while this rank's share (4N/world bytes)
    is gathered, and indices become Python ints a chunk at a time.
    """

    def __init__(self, dataset: Sized, num_replicas: Optional[int] = None, rank: Optional[int] = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 indices: Optional[Sequence[int]] = None, key_offset: int = 0, key_stride: int = 1) -> None:
        num_replicas, rank = _resolve_world(num_replicas, rank)
        n, self._indices = _as_indices(dataset, indices)
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        if self.num_samples == 0:
            raise ValueError(f"drop_last with {n} images leaves nothing for {num_replicas} ranks")
        self.consumed = 0
        self._key_offset, self._key_stride = key_offset, key_stride

    def _rank_share(self) -> torch.Tensor:
        n = len(self.dataset)
        dtype = torch.int32 if n < 2 ** 31 else torch.int64
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g, dtype=dtype)
        else:
            order = torch.arange(n, dtype=dtype)
        if self.total_size > n:  # padding repeats the order from its start, as DistributedSampler
            order = order.repeat(math.ceil(self.total_size / n))
        share = order[self.rank:self.total_size:self.num_replicas].clone()
        del order
        return share if self._indices is None else self._indices[share.long()]

    def __iter__(self) -> Iterator[int]:
        share = self._rank_share()
        return self._iterate(lambda k0, k1: share[k0:k1])

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
                  shuffle: bool = True, drop_last: bool = False,
                  subset: Optional[Sequence[int]] = None) -> ResumableSampler:
    """The training sampler for ``dataset`` (``subset``: sample only these indices, e.g. a label subset).

    With ``--cache-mode part`` (``dataset.local_indices`` is set) each rank samples only its own
    cached shard: the shards already split the data, so the sampler runs as a single replica over
    the shard, and a sliding window uses ``ceil(W / world)`` and ``ceil(S / world)`` per rank; the
    augmentation seeds then use position ``p * world + rank`` so ranks do not share them.
    ``shuffle`` applies to the default sampler only (a sliding window is always shuffled).
    """
    num_replicas, rank = _resolve_world(num_replicas, rank)
    local = getattr(dataset, "local_indices", None)
    if subset is not None and local is not None:
        raise ValueError("a subset of the training images cannot be sampled with --cache-mode part")
    key_offset, key_stride = 0, 1
    if local is not None:
        window_size = math.ceil(window_size / num_replicas)
        window_stride = math.ceil(window_stride / num_replicas)
        key_offset, key_stride = rank, num_replicas
        num_replicas, rank = 1, 0
    if sliding_window:
        return SlidingWindowSampler(dataset, window_size, window_stride, num_replicas, rank, seed=seed,
                                    shuffle_per_epoch=shuffle_per_epoch, drop_last=drop_last,
                                    indices=local if subset is None else subset,
                                    key_offset=key_offset, key_stride=key_stride)
    return ResumableDistributedSampler(dataset, num_replicas, rank, shuffle=shuffle, seed=seed, drop_last=drop_last,
                                       indices=local if subset is None else subset, key_offset=key_offset,
                                       key_stride=key_stride)
