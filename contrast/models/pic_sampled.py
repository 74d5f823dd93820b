"""PIC at any scale: recent negative sampling, weight update correction, sharded host storage.

Cao et al., "Parametric Instance Classification for Unsupervised Visual Feature
Learning" (NeurIPS 2020, arXiv 2006.14618), section 4: instead of a softmax over
all N instances, each step classifies against the rows of the instances visited
in the last iterations only ("recent negative sampling"), and rows skipped by
the sampling later receive the motion that momentum SGD with weight decay would
have given them ("classification weight update correction").

Three parts, each usable on its own:

* :class:`MotionLog` -- the per-step 2x2 motion matrices of a row with zero
  gradient, ``[w; u]_{t+1} = A_t [w; u]_t`` with
  ``A_t = [[1 - eta_t*lambda, -eta_t*m], [lambda, m]]`` (PyTorch SGD:
  ``u <- m u + g + lambda w; w <- w - eta u``), and the product over any gap
  ``[s, T)`` in O(log T) float64 2x2 products (dyadic blocks, see
  ``docs/pic_at_scale.md``).
* :class:`RowShard` -- this rank's contiguous block of rows (weight, momentum,
  last-updated step) in host memory or in memory-mapped files on disk, rows
  materialised lazily from a counter-based N(0, 0.01) initialiser, brought up to
  date by the correction when read.
* :class:`SampledInstanceClassifier` -- the ``nn.Module`` with the call signature
  of :class:`contrast.models.pic.DenseInstanceClassifier`; only the rows in play
  are read, moved to the training device, given gradients and updated.
"""
from __future__ import annotations

import math
import mmap
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from contrast import distributed as cd
from contrast.models.heads import normalize_fp32
from contrast.models.instance_classifier import InstanceClassifier
from contrast.models.losses import pic_loss

STORAGES = ("memory", "disk")
_MASK32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------- initialisation
def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mix (int64 tensors holding values in [0, 2^32)); no overflow."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def init_rows(ids: torch.Tensor, dim: int, seed: int = 0, std: float = 0.01) -> torch.Tensor:
    """Initial rows W[ids] ~ N(0, std^2), a pure function of (seed, id, column).

    Counter-based (hash + Box-Muller), so any subset of rows can be created on
    demand, by whichever rank owns it, identically for every world size.

    Args:
        ids: (R,) int64 row ids.
    Returns:
        (R, dim) float64.
    """
    key = ids.to(torch.int64).view(-1, 1) * dim + torch.arange(dim, dtype=torch.int64)
    lo, hi = key & _MASK32, key >> 32
    uniform = []
    for stream in (0, 1):
        h = _hash32(_hash32((hi + 2 * seed + stream) & _MASK32) ^ lo)
        uniform.append((h.double() + 0.5) / 2.0 ** 32)
    return std * torch.sqrt(-2.0 * torch.log(uniform[0])) * torch.cos(2.0 * math.pi * uniform[1])


# ----------------------------------------------------------------------------- motion log
class MotionLog:
    """Learning rates of all past steps and products of their zero-gradient motion matrices.

    Level k >= 1 keeps the products of the aligned blocks of 2^k steps
    ``[j 2^k, (j+1) 2^k)`` (latest step on the left), level 0 is computed from the
    learning rates. A gap ``[s, T)`` splits into at most 2 log2(T) such blocks.
    Memory: 8 + 32 bytes per step (float64); cost per appended step: amortised O(1).
    """

    def __init__(self, momentum: float, weight_decay: float) -> None:
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.num_steps = 0
        self._etas = torch.empty(1024, dtype=torch.float64)
        self._levels: List[torch.Tensor] = []   # _levels[k - 1]: (capacity, 2, 2) for level k

    def matrices(self, etas: torch.Tensor) -> torch.Tensor:
        """(S,) float64 learning rates -> (S, 2, 2) motion matrices A_t."""
        a = torch.empty(etas.shape[0], 2, 2, dtype=torch.float64)
        a[:, 0, 0] = 1.0 - etas * self.weight_decay
        a[:, 0, 1] = -etas * self.momentum
        a[:, 1, 0] = self.weight_decay
        a[:, 1, 1] = self.momentum
        return a

    @property
    def etas(self) -> torch.Tensor:
        return self._etas[: self.num_steps]

    def _node(self, level: int, j: torch.Tensor) -> torch.Tensor:
        return self.matrices(self._etas[j]) if level == 0 else self._levels[level - 1][j]

    @staticmethod
    def _grown(buf: torch.Tensor, size: int) -> torch.Tensor:
        if size <= buf.shape[0]:
            return buf
        out = buf.new_empty((max(size, 2 * buf.shape[0]),) + tuple(buf.shape[1:]))
        out[: buf.shape[0]] = buf
        return out

    def append(self, eta: float) -> None:
        """Log the learning rate of the step just taken (step ``num_steps``)."""
        t = self.num_steps
        self._etas = self._grown(self._etas, t + 1)
        self._etas[t] = eta
        self.num_steps = t + 1
        level = 1
        while (t + 1) % (1 << level) == 0:
            j = (t + 1) // (1 << level) - 1
            node = self._node(level - 1, torch.tensor([2 * j + 1])) @ self._node(level - 1, torch.tensor([2 * j]))
            if len(self._levels) < level:
                self._levels.append(torch.empty(16, 2, 2, dtype=torch.float64))
            self._levels[level - 1] = self._grown(self._levels[level - 1], j + 1)
            self._levels[level - 1][j] = node[0]
            level += 1

    def products(self, starts: torch.Tensor) -> torch.Tensor:
        """``A_{T-1} ... A_{s}`` for each s in (Q,) int64 ``starts`` (T = num_steps) -> (Q, 2, 2) float64.

        An empty gap (s == T) gives the identity.
        """
        total = self.num_steps
        out = torch.eye(2, dtype=torch.float64).repeat(starts.shape[0], 1, 1)
        cur = starts.to(torch.int64).clone()
        if (cur < 0).any() or (cur > total).any():
            raise ValueError(f"gap starts must lie in [0, {total}]")
        active = (cur < total).nonzero().squeeze(1)
        while active.numel() > 0:
            c = cur[active]
            # largest k with c divisible by 2^k and c + 2^k <= T (frexp: exact floor(log2) for ints < 2^53)
            low_bit = torch.where(c > 0, c & -c, torch.full_like(c, 1 << 62))
            k = torch.minimum(torch.frexp(low_bit.double())[1] - 1,
                              torch.frexp((total - c).double())[1] - 1).to(torch.int64)
            for level in k.unique().tolist():
                sel = active[k == level]
                out[sel] = self._node(level, cur[sel] >> level) @ out[sel]
                cur[sel] += 1 << level
            active = active[cur[active] < total]
        return out

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"etas": self.etas.clone()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Restore the learning rates and rebuild every level with batched products."""
        etas = state["etas"].to(torch.float64)
        self.num_steps = etas.shape[0]
        self._etas = self._grown(torch.empty(1024, dtype=torch.float64), self.num_steps)
        self._etas[: self.num_steps] = etas
        self._levels = []
        nodes = self.matrices(etas)
        while nodes.shape[0] >= 2:
            pairs = nodes.shape[0] // 2
            nodes = nodes[1: 2 * pairs: 2] @ nodes[0: 2 * pairs: 2]
            self._levels.append(self._grown(nodes.clone(), 16))


# ----------------------------------------------------------------------------- row storage
class RowShard:
    """Rows ``[start, stop)`` of the table and their optimiser state, on the host.

    ``table`` (n, 2, D) in ``dtype`` holds each row's weight and momentum side by
    side (one gather / scatter per step touches both); ``version`` (n,) int64 is
    0 for a row never materialised, else 1 + the step count at which its stored
    (w, u) is valid. ``storage="memory"`` allocates uninitialised host memory
    (pages are committed when first written); ``storage="disk"`` maps sparse files
    in ``storage_dir`` (``mmap``), so a table larger than RAM costs only
    the pages of the rows actually used.
    """

    def __init__(self, start: int, stop: int, dim: int, storage: str, storage_dir: Optional[str],
                 dtype: torch.dtype, rank: int) -> None:
        self.start, self.stop, self.dim, self.dtype = start, stop, dim, dtype
        n = stop - start
        if storage == "memory":
            self.table = torch.empty(n, 2, dim, dtype=dtype)
            self.version = torch.zeros(n, dtype=torch.int64)
        elif storage == "disk":
            if not storage_dir:
                raise ValueError("--pic-storage disk needs a directory for the table files (storage_dir)")
            os.makedirs(storage_dir, exist_ok=True)
            self.table = self._mapped(storage_dir, f"pic_rank{rank}_table.bin", (n, 2, dim), dtype)
            self.version = self._mapped(storage_dir, f"pic_rank{rank}_version.bin", (n,), torch.int64)
        else:
            raise ValueError(f"--pic-storage must be one of {STORAGES}, got {storage!r}")

    @staticmethod
    def _mapped(directory: str, name: str, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor over a fresh sparse file of zeros (version 0 = never used), mapped shared.

        ``MADV_RANDOM`` turns off readahead: rows are read at random, and readahead of
        the holes around each row would fill the page cache with zero pages.
        """
        path = os.path.join(directory, name)
        numel = math.prod(shape)
        size = numel * torch.empty((), dtype=dtype).element_size()
        if size == 0:                    # an empty shard (more ranks than rows)
            return torch.empty(shape, dtype=dtype)
        with open(path, "w+b") as f:
            f.truncate(size)
            mapping = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED)
        mapping.madvise(mmap.MADV_RANDOM)
        return torch.frombuffer(mapping, dtype=dtype, count=numel).view(shape)

    def reset(self) -> None:
        """Forget every row (they become lazily re-initialised)."""
        self.version.zero_()


# ----------------------------------------------------------------------------- the classifier
class SampledInstanceClassifier(InstanceClassifier):
    """PIC classifier with recent negative sampling, weight update correction and sharded storage.

    Each step the candidates are ``unique(global batch ids U last K visited ids)``
    (sorted; all rows when K >= N); the loss is :func:`pic_loss` against
    ``normalize(W[candidates])`` (C, D) with targets = positions of the own ids.
    Rank r owns rows ``shard_range(N)`` and answers for them: candidate rows are
    assembled with one variable-size all-gather (shards are contiguous and
    candidates sorted, so rank order is candidate order); their gradient is
    summed over ranks and divided by the world size (DDP's averaging), and each
    owner applies momentum SGD to its rows in :meth:`on_train_step_end`.

    The table is not part of ``state_dict()``: see :meth:`rank_state_dict`.

    Args:
        num_instances: N.
        dim: D.
        temperature: tau of the cosine softmax.
        num_negative: K (> 0), number of recent ids kept as negatives.
        momentum, weight_decay: m and lambda of the SGD that trains the rows.
        weight_correction: apply the skipped zero-gradient motion when a row is used again.
        storage: "memory" (host RAM) or "disk" (memory-mapped files in ``storage_dir``).
        dtype: storage dtype of weight and momentum (float32; float64 for tests).
        seed: seed of the row initialiser :func:`init_rows`.
    """

    def __init__(self, num_instances: int, dim: int, temperature: float, num_negative: int,
                 momentum: float = 0.9, weight_decay: float = 1e-4, weight_correction: bool = True,
                 storage: str = "memory", storage_dir: Optional[str] = None,
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        super().__init__()
        if num_instances <= 0:
            raise ValueError(f"PIC needs a non-empty training set, got num_instances={num_instances}")
        if num_negative <= 0:
            raise ValueError(f"--pic-num-negative must be > 0 for the sampled classifier, got {num_negative}")
        self.num_instances, self.dim, self.temperature = num_instances, dim, temperature
        self.num_negative, self.momentum, self.weight_decay = num_negative, momentum, weight_decay
        self.weight_correction, self.seed = weight_correction, seed
        self.rank, self.world_size = cd.get_rank(), cd.get_world_size()
        start, stop = cd.shard_range(num_instances, self.rank, self.world_size)
        self.shard = RowShard(start, stop, dim, storage, storage_dir, dtype, self.rank)
        self.log = MotionLog(momentum, weight_decay)
        self.queue = torch.full((min(num_negative, num_instances),), -1, dtype=torch.int64)
        self.queue_ptr = 0
        self._pending: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self._target: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None)
        self._own_rows: Optional[torch.Tensor] = None
        self.last_stats: Dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ rows of this rank
    @torch.no_grad()
    def read_rows(self, local: torch.Tensor) -> torch.Tensor:
        """(R, 2, D) weight ``[:, 0]`` and momentum ``[:, 1]`` of this shard's rows ``local`` (R,)
        (offsets from ``shard.start``), brought to the current step. New rows are materialised and
        stale rows corrected (in float64); only those are written back."""
        s = self.shard
        version = s.version[local]
        rows = s.table[local]
        w, u = rows[:, 0], rows[:, 1]
        new = version == 0
        if new.any():
            w[new] = init_rows(local[new] + s.start, self.dim, self.seed).to(s.dtype)
            u[new] = 0
        changed = new
        if self.weight_correction:
            last = (version - 1).clamp(min=0)
            changed = last < self.log.num_steps
            if changed.any():
                starts, inverse = last[changed].unique(return_inverse=True)
                a = self.log.products(starts)[inverse]
                ws, us = w[changed].double(), u[changed].double()
                w[changed] = (a[:, 0, 0, None] * ws + a[:, 0, 1, None] * us).to(s.dtype)
                u[changed] = (a[:, 1, 0, None] * ws + a[:, 1, 1, None] * us).to(s.dtype)
        if changed.any():
            s.table[local[changed]] = rows[changed]
            s.version[local[changed]] = self.log.num_steps + 1
        return rows

    @torch.no_grad()
    def sgd_step(self, local: torch.Tensor, grad: torch.Tensor, lr: float,
                 current: Optional[torch.Tensor] = None) -> None:
        """One optimiser step of the whole table with learning rate ``lr``.

        Rows ``local`` (R,) of this shard get momentum SGD (PyTorch semantics,
        dampening 0, no Nesterov) with their (R, D) ``grad``; every other row has
        zero gradient and moves lazily (weight update correction). ``current``:
        their (R, 2, D) state from :meth:`read_rows` at this step, to skip reading them again.
        """
        rows = self.read_rows(local) if current is None else current
        w, u = rows[:, 0], rows[:, 1]
        d_p = grad.to(w.dtype).add(w, alpha=self.weight_decay)
        u.mul_(self.momentum).add_(d_p)
        w.add_(u, alpha=-lr)
        s = self.shard
        s.table[local] = rows
        s.version[local] = self.log.num_steps + 2
        self.log.append(float(lr))

    def _own_slice(self, candidates: torch.Tensor) -> Tuple[int, int]:
        lo, hi = torch.searchsorted(candidates, torch.tensor([self.shard.start, self.shard.stop])).tolist()
        return lo, hi

    # ------------------------------------------------------------------ training step
    def _candidates(self, batch_ids: torch.Tensor) -> torch.Tensor:
        if self.num_negative >= self.num_instances:
            return torch.arange(self.num_instances)
        queued = self.queue[self.queue >= 0]
        return torch.cat([batch_ids, queued]).unique()

    @torch.no_grad()
    def gather_rows(self, candidates: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(C,) sorted global ids -> (C, D) float32 rows on ``device``, assembled from their owners."""
        lo, hi = self._own_slice(candidates)
        self._own_rows = self.read_rows(candidates[lo:hi] - self.shard.start)
        rows = cd.all_gather_variable(self._own_rows[:, 0].to(device, torch.float32, copy=True))
        if rows.shape[0] != candidates.shape[0]:
            raise RuntimeError(f"ranks disagree on the PIC candidate set ({rows.shape[0]} rows gathered, "
                               f"{candidates.shape[0]} expected)")
        return rows

    def forward(self, z_large: torch.Tensor, index: torch.Tensor,
                z_small: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Loss of (B, D) normalised ``z_large`` with targets ``index`` (B,) against the rows in play;
        ``z_small`` (list of (B, D)) use a detached W. Returns an fp32 scalar."""
        index_host = index.detach().cpu()   # the table lives on the host: one copy of the ids, checked there
        if index_host.numel() and (int(index_host.min()) < 0 or int(index_host.max()) >= self.num_instances):
            raise ValueError(f"PIC index out of range [0, {self.num_instances}): "
                             f"min {int(index_host.min())}, max {int(index_host.max())}")
        gathered = cd.all_gather_variable(index.detach()).cpu() if cd.get_world_size() > 1 else index_host
        batch_ids = gathered.unique()
        candidates = self._candidates(batch_ids)
        weight = self.gather_rows(candidates, z_large.device).requires_grad_(torch.is_grad_enabled())
        target = torch.searchsorted(candidates, index_host).to(z_large.device, non_blocking=True)
        with torch.autocast(device_type=z_large.device.type, enabled=False):
            loss = pic_loss(z_large, weight, target, self.temperature, z_small)
        self._pending = (candidates, weight, batch_ids)
        self._target = (index, target)   # positive_similarity of this batch reuses it (no second host copy)
        norms = weight.detach().norm(dim=1)
        self.last_stats = {"w_norm_min": norms.min(), "w_norm_mean": norms.mean(), "w_norm_max": norms.max(),
                           "num_candidates": torch.tensor(float(candidates.shape[0]))}
        return loss

    @property
    def in_play(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(candidates (C,), rows (C, D)) of the last forward; ``rows.grad`` after backward."""
        if self._pending is None:
            raise RuntimeError("no rows in play: call the classifier first")
        return self._pending[0], self._pending[1]

    @torch.no_grad()
    def positive_similarity(self, z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Mean cosine similarity between (B, D) ``z`` and its own row (rows of the last forward)."""
        if self._pending is None:
            raise RuntimeError("positive_similarity needs a forward pass first")
        candidates, weight, _ = self._pending
        target = self._target[1] if self._target[0] is index else \
            torch.searchsorted(candidates, index.cpu()).to(weight.device)
        rows = weight.detach()[target]
        return (z * normalize_fp32(rows)).sum(dim=1).mean()

    def stats(self) -> Dict[str, torch.Tensor]:
        """||W|| min/mean/max over the rows in play and the candidate count, of the last forward."""
        return dict(self.last_stats)

    @torch.no_grad()
    def on_train_step_end(self, step: int, lr: float, grad_scale: float = 1.0) -> None:
        """Apply the optimiser step with learning rate ``lr`` to the rows in play and log ``lr``.

        Must be called exactly when the model's optimiser stepped (a skipped step
        moves no row, as in dense training). Time is counted in calls, so ``step``
        is not used. ``grad_scale`` is the AMP GradScaler's loss scale: the rows'
        gradients do not pass through the optimiser, so they are unscaled here.
        """
        if self._pending is None:
            self.sgd_step(torch.zeros(0, dtype=torch.int64), torch.zeros(0, self.dim), lr)
            return
        candidates, weight, batch_ids = self._pending
        grad = weight.grad if weight.grad is not None else torch.zeros_like(weight)
        grad = cd.all_reduce_sum(grad.detach().clone()).div_(self.world_size * grad_scale).cpu()
        lo, hi = self._own_slice(candidates)
        self.sgd_step(candidates[lo:hi] - self.shard.start, grad[lo:hi], lr, self._own_rows)
        self.enqueue(batch_ids)
        self._pending = self._own_rows = None

    def enqueue(self, ids: torch.Tensor) -> None:
        """Record (M,) visited ids as the most recent ones (oldest dropped beyond K)."""
        k = self.queue.shape[0]
        if ids.shape[0] >= k:
            self.queue.copy_(ids[-k:])
            self.queue_ptr = 0
            return
        self.queue[(self.queue_ptr + torch.arange(ids.shape[0])) % k] = ids
        self.queue_ptr = (self.queue_ptr + ids.shape[0]) % k

    # ------------------------------------------------------------------ whole-table access, checkpoints
    @torch.no_grad()
    def local_state(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, weight, momentum) of every row of this shard, brought to the current step (float64)."""
        local = torch.arange(self.shard.stop - self.shard.start)
        rows = self.read_rows(local).double()
        return local + self.shard.start, rows[:, 0], rows[:, 1]

    def rank_state_dict(self) -> dict:
        """This rank's shard (materialised rows only) + the replicated queue and learning-rate log."""
        s = self.shard
        used = (s.version > 0).nonzero().squeeze(1)
        return {"num_instances": self.num_instances, "dim": self.dim, "shard_range": (s.start, s.stop),
                "ids": used + s.start, "weight": s.table[used, 0].clone(), "momentum": s.table[used, 1].clone(),
                "last_step": s.version[used] - 1, "queue": self.queue.clone(), "queue_ptr": self.queue_ptr,
                "log": self.log.state_dict(), "seed": self.seed}

    def load_rank_state_dicts(self, shards: List[dict]) -> None:
        """Rebuild this rank's shard from the shards of all ranks of the saving run (any world size)."""
        if not shards:
            raise ValueError("load_rank_state_dicts: no PIC classifier shards given (rank*-of-*.pth files)")
        for i, sh in enumerate(shards):
            if (sh["num_instances"], sh["dim"]) != (self.num_instances, self.dim):
                raise ValueError(f"PIC classifier shard {i} holds a {sh['num_instances']} x {sh['dim']} table, "
                                 f"this run needs {self.num_instances} x {self.dim}")
        if shards[0]["queue"].shape != self.queue.shape:
            raise ValueError(f"PIC checkpoint was written with --pic-num-negative {shards[0]['queue'].shape[0]}, "
                             f"this run uses {self.queue.shape[0]}")
        s = self.shard
        s.reset()
        for sh in shards:
            mine = (sh["ids"] >= s.start) & (sh["ids"] < s.stop)
            local = sh["ids"][mine] - s.start
            s.table[local] = torch.stack([sh["weight"][mine], sh["momentum"][mine]], dim=1).to(s.dtype)
            s.version[local] = sh["last_step"][mine] + 1
        self.log.load_state_dict(shards[0]["log"])
        self.queue.copy_(shards[0]["queue"])
        self.queue_ptr = int(shards[0]["queue_ptr"])
        self.seed = int(shards[0]["seed"])
        self._pending = self._own_rows = None
