"""Weighted k-nearest-neighbour evaluation (InstDisc, Wu et al. 2018, Sec. 3.4) and an online monitor.

A query ``q`` votes with its ``k`` most similar training features ``f_i`` (cosine
similarity ``s_i = q . f_i`` of L2-normalised features); neighbour ``i`` adds
``exp(s_i / T)`` to the score of its class, and the class scores are ranked for
top-1/top-5. InstDisc uses ``k = 200, T = 0.07`` on ImageNet.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from contrast import distributed as cd
from contrast.data import build_dataset
from contrast.data.transforms import VAL_CROP_FRACTION, build_augmentation
from contrast.eval.features import build_eval_loader, extract_features
from contrast.logger import Progress
from contrast.placement import place


_M32 = 0xFFFFFFFF
_NO_NEIGHBOUR = torch.iinfo(torch.int64).min   # a padding candidate's key, below every real one
BANK_CHUNK = 32768


def _encode(sim: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """int64 keys of fp32 similarities ``sim`` of the training rows ``index`` (broadcastable): a
    higher key is a higher similarity, and among equal similarities the lower global index (a
    strict total order).

    High 32 bits: the float's bits mapped to an order-preserving integer (-0.0 read as +0.0);
    low 32 bits: ``2^32 - 1 - index``. ``sim`` is overwritten (in place: ~12 bytes per entry at peak).
    """
    bits = sim.add_(0.0).view(torch.int32)
    bits ^= (bits >> 31) & 0x7FFFFFFF
    keys = bits.long()
    del sim, bits
    return keys.mul_(1 << 32).add_(_M32 - index)


def _decode(keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(similarities fp32, global indices int64)`` of :func:`_encode` keys."""
    high = keys >> 32
    bits = torch.where(high < 0, high ^ 0x7FFFFFFF, high).int()
    return bits.view(torch.float32), _M32 - (keys & _M32)


def _block_top(sim: torch.Tensor, first: int, k: int) -> torch.Tensor:
    """(Q, min(k, T)) keys of the top of a (Q, T) similarity block of training rows ``first, ...``.

    A float top-(k+1) picks the candidates; the rows whose (k+1)-th value equals the k-th (a tie
    at the boundary, where the float top-k's choice is arbitrary) are redone on the keys of the
    whole row, so the result is exact (one host sync per block).
    """
    columns = torch.arange(first, first + sim.shape[1], device=sim.device)
    if sim.shape[1] <= k:
        return _encode(sim, columns)
    values, where = sim.topk(k + 1, dim=1, sorted=True)
    tied = values[:, k] == values[:, k - 1]
    keys = _encode(values[:, :k].contiguous(), where[:, :k] + first)
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        keys[rows] = _encode(sim[rows], columns).topk(k, dim=1, sorted=False).values
    return keys


def _local_top(queries: torch.Tensor, bank: torch.Tensor, offset: int, k: int, bank_chunk: int) -> torch.Tensor:
    """(Q, k) keys of the queries' k most similar rows of this rank's ``bank`` (padded with
    ``_NO_NEIGHBOUR`` where the bank has fewer rows), one (Q, bank_chunk) block at a time."""
    best = queries.new_full((queries.shape[0], k), _NO_NEIGHBOUR, dtype=torch.long)
    for start in range(0, bank.shape[0], bank_chunk):
        tile = bank[start:start + bank_chunk].float()   # fp32 accumulation for fp16/bf16 storage
        keys = _block_top(queries @ tile.T, offset + start, k)
        del tile
        best = torch.cat([best, keys], dim=1).topk(k, dim=1, sorted=False).values
    return best


def _labels_of(keys: torch.Tensor, labels: torch.Tensor, offset: int) -> torch.Tensor:
    """Labels of the local training rows that ``keys`` name (-1 for ``_NO_NEIGHBOUR``)."""
    valid = keys != _NO_NEIGHBOUR
    if labels.numel() == 0:
        return torch.full_like(keys, -1)
    local = torch.where(valid, _M32 - (keys & _M32) - offset, 0)
    return torch.where(valid, labels[local], -1)


@torch.no_grad()
def knn_neighbours(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int,
                   chunk_size: int = 1024, bank_chunk: int = BANK_CHUNK, sharded: bool = False,
                   progress: str = "") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` nearest training rows of each query: ``(similarities (M, k) fp32, labels (M, k),
    global indices (M, k))``, most similar first, ties by lower global index.

    ``bank`` (N, D) and ``queries`` (M, D) are L2-normalised (any float dtype; similarities are
    accumulated in fp32). With ``sharded``, every argument is this rank's block: the banks of the
    ranks, in rank order, form the training set (global index = offset of the block + row); each
    round all ranks' next ``ceil(chunk_size / world)`` queries (fewer when no rank has that many) are
    all-gathered, each rank keeps its top ``k`` over its bank, and the (k per query) candidates are
    all-gathered and merged by their owner. ``k`` is capped at the training set's size.
    ``progress``: see :func:`knn_predict_multi`.
    """
    world = cd.get_world_size() if sharded else 1
    rank = cd.get_rank() if sharded else 0
    counts = torch.tensor([bank.shape[0], queries.shape[0]], device=bank.device)
    counts = (cd.all_gather_no_grad(counts) if sharded else counts).view(world, 2).tolist()
    offset, total = sum(c[0] for c in counts[:rank]), sum(c[0] for c in counts)
    if total == 0:
        raise ValueError("kNN needs at least one training feature")
    k = min(k, total)
    per = max(1, min(-(-chunk_size // world), max(c[1] for c in counts)))
    labels = bank_labels.long().to(bank.device)
    out = []
    with Progress(progress, total=queries.shape[0], unit="query", enabled=bool(progress)) as bar:
        for start in range(0, max(c[1] for c in counts), per):
            mine = queries[start:start + per].float().to(bank.device)
            batch = mine
            if sharded:
                batch = mine.new_zeros(per, queries.shape[1])
                batch[:mine.shape[0]] = mine
                batch = cd.all_gather_no_grad(batch)
            keys = _local_top(batch, bank, offset, k, bank_chunk)
            cand_labels = _labels_of(keys, labels, offset)
            if sharded:
                rows = slice(rank * per, rank * per + mine.shape[0])
                keys = cd.all_gather_no_grad(keys).view(world, -1, k)[:, rows]
                cand_labels = cd.all_gather_no_grad(cand_labels).view(world, -1, k)[:, rows]
                keys, cand_labels = keys.permute(1, 0, 2).flatten(1), cand_labels.permute(1, 0, 2).flatten(1)
            keys, pos = keys.topk(k, dim=1, sorted=True)
            sim, index = _decode(keys)
            out.append((sim, cand_labels.gather(1, pos), index))
            bar.update(mine.shape[0])
    if not out:
        empty = torch.zeros(0, k, dtype=torch.long, device=bank.device)
        return empty.float(), empty, empty
    return tuple(torch.cat(parts) for parts in zip(*out))


def _vote(sim: torch.Tensor, labels: torch.Tensor, temperature: float, num_classes: int) -> torch.Tensor:
    """Class scores (m, C) from the sorted similarities ``sim`` (m, k) of neighbours of class ``labels``.

    ``exp((s - s_max) / T)`` equals ``exp(s / T)`` up to a per-row factor, which the
    normalisation to a distribution removes; it cannot overflow for small ``T``.
    """
    weights = torch.exp((sim - sim[:, :1]) / temperature)
    scores = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=weights.dtype)
    scores.scatter_add_(1, labels, weights)
    return scores / scores.sum(dim=1, keepdim=True)


def _check(train_feats: torch.Tensor, train_labels: torch.Tensor, ks: Sequence[int], temperature: float) -> None:
    if train_feats.shape[0] != train_labels.shape[0]:
        raise ValueError(f"{train_feats.shape[0]} training features but {train_labels.shape[0]} labels")
    if min(ks) < 1 or temperature <= 0:
        raise ValueError(f"kNN needs k >= 1 and T > 0, got k={list(ks)} T={temperature}")


def l2_normalize_(x: torch.Tensor, block_rows: int = 65536) -> torch.Tensor:
    """L2-normalise the rows of ``x`` in place, ``block_rows`` at a time (no full-size temporary)."""
    for start in range(0, x.shape[0], block_rows):
        x[start:start + block_rows] = F.normalize(x[start:start + block_rows].float(), dim=1)
    return x


@torch.no_grad()
def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor,
               ks: Sequence[int], temperature: float, num_classes: int, chunk_size: int = 1024,
               progress: str = "", sharded: bool = False, normalized: bool = False,
               bank_chunk: int = BANK_CHUNK) -> Dict[int, torch.Tensor]:
    """``{k: (M, C) scores}`` of this rank's queries (all queries in one process); see :func:`knn_evaluate`."""
    _check(train_feats, train_labels, ks, temperature)
    bank = train_feats if normalized else F.normalize(train_feats.float(), dim=1)
    queries = query_feats if normalized else F.normalize(query_feats.float(), dim=1)
    sim, labels, _ = knn_neighbours(bank, train_labels, queries, max(ks), chunk_size, bank_chunk, sharded, progress)
    return {k: _vote(sim[:, :k], labels[:, :k], temperature, num_classes) for k in ks}


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor,
                k: int, temperature: float, num_classes: int, chunk_size: int = 1024) -> torch.Tensor:
    """Weighted kNN class distribution (M, C) of the queries.

    Args:
        train_feats: (N, D) training features (L2-normalised here).
        train_labels: (N,) int labels in ``[0, num_classes)``.
        query_feats: (M, D) query features (L2-normalised here).
        k: neighbours per query (at most N are used).
        temperature: ``T`` of the ``exp(s / T)`` weights.
        num_classes: C.
        chunk_size: queries per similarity block, bounding memory.

    Returns:
        (M, C) scores summing to 1 per row, proportional to the summed ``exp(s / T)``
        of each class among the ``k`` neighbours.
    """
    return knn_scores(train_feats, train_labels, query_feats, [k], temperature, num_classes, chunk_size)[k]


@torch.no_grad()
def knn_predict_multi(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor,
                      ks: Sequence[int], temperature: float, num_classes: int,
                      chunk_size: int = 1024, progress: str = "") -> Dict[int, torch.Tensor]:
    """:func:`knn_predict` for several ``k`` at once (one similarity pass): ``{k: (M, C) scores}``.
    ``progress``: a name to show the progress over the queries under (empty: silent)."""
    return knn_scores(train_feats, train_labels, query_feats, ks, temperature, num_classes, chunk_size, progress)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, topk: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """``{"top1": %, "top5": %}`` of (M, C) ``scores`` against (M,) ``labels``.

    Top-k with k >= C counts every query as correct.
    """
    labels = labels.to(scores.device).long()
    pred = scores.topk(min(max(topk), scores.shape[1]), dim=1).indices
    hit = pred == labels[:, None]
    return {f"top{k}": 100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in topk}


@torch.no_grad()
def knn_evaluate(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor,
                 query_labels: torch.Tensor, ks: Sequence[int], temperature: float, num_classes: int,
                 chunk_size: int = 1024, progress: str = "", sharded: bool = False, normalized: bool = False,
                 bank_chunk: int = BANK_CHUNK) -> Dict[int, Dict[str, float]]:
    """Top-1/top-5 accuracy (%) of weighted kNN for each ``k``: ``{k: {"top1", "top5"}}``.

    With ``sharded`` the tensors are this rank's contiguous blocks of the training and query sets
    (:func:`knn_neighbours`) and every rank returns the accuracy over all queries. ``normalized``:
    the features are already L2-normalised (used as they are, no copy). Classes of equal score rank
    by class index. ``chunk_size``: queries
    per round (all ranks together); ``bank_chunk``: training rows per similarity block.
    ``progress``: see :func:`knn_predict_multi`.
    """
    scores = knn_scores(train_feats, train_labels, query_feats, ks, temperature, num_classes, chunk_size,
                        progress, sharded, normalized, bank_chunk)
    labels = query_labels.to(train_feats.device).long()
    out = {}
    for k, s in scores.items():
        ranked = s.sort(dim=1, descending=True, stable=True).indices[:, :5]   # ties: the lower class
        hit = ranked == labels[:, None]
        counts = torch.stack([hit[:, :1].any(dim=1).sum(), hit.any(dim=1).sum(), labels.new_tensor(len(labels))])
        top1, top5, total = (cd.all_reduce_sum(counts) if sharded else counts).float()
        out[k] = {"top1": 100.0 * (top1 / total).item(), "top5": 100.0 * (top5 / total).item()}
    return out


class KNNMonitor:
    """Online kNN accuracy of a backbone during pretraining (solo-learn / lightly style).

    Each call encodes the (un-augmented, ``val`` transform) training and
    validation sets with the backbone in eval mode, sharded over ranks; each rank
    keeps only its block of both (L2-normalised once, at extraction), the
    validation set is classified by the sharded weighted kNN (:func:`knn_neighbours`;
    every rank gets the same result) and the best top-1 is remembered. The
    backbone's train/eval mode is restored.

    Usage in a training loop (the caller logs the returned values)::

        monitor = KNNMonitor.from_data_dir(data_dir, device, k=20)   # once
        if epoch % knn_freq == 0:
            acc = monitor(model_without_ddp.backbone)      # {"top1": %, "top5": %}
    """

    def __init__(self, train_set: Dataset, val_set: Dataset, device: torch.device, k: int = 200,
                 temperature: float = 0.07, batch_size: int = 256, num_workers: int = 0,
                 device_transform: Optional[nn.Module] = None, num_classes: Optional[int] = None) -> None:
        self.train_set, self.val_set = train_set, val_set
        self.device = torch.device(device)
        self.k, self.temperature = k, temperature
        self.batch_size, self.num_workers = batch_size, num_workers
        self.device_transform = place(device_transform, self.device)
        self.num_classes = num_classes if num_classes is not None else _num_classes(train_set)
        self.best: Dict[str, float] = {"top1": float("-inf"), "top5": float("-inf")}

    @classmethod
    def from_data_dir(cls, data_dir: str, device: torch.device, zip_mode: bool = False, cache_mode: str = "no",
                      image_size: int = 224, val_crop_fraction: float = VAL_CROP_FRACTION,
                      index_dir: Optional[str] = None, **kwargs) -> "KNNMonitor":
        """Build both splits of ``data_dir`` with the ``val`` transform (``build_dataset``).

        ``cache_mode="part"`` is read as ``"no"``: its rank shards do not match the
        contiguous evaluation blocks.
        """
        aug = build_augmentation("val", num_views=1, image_size=image_size, val_crop_fraction=val_crop_fraction)
        cache = "no" if cache_mode == "part" else cache_mode
        sets = [build_dataset(data_dir, split, zip_mode, cache, aug.cpu, 0, 1, index_dir=index_dir)
                for split in ("train", "val")]
        return cls(sets[0], sets[1], device, device_transform=aug.device, **kwargs)

    def _features(self, backbone: nn.Module, dataset: Dataset, split: str):
        loader = build_eval_loader(dataset, self.batch_size, self.num_workers)
        return extract_features(backbone, loader, self.device, device_transform=self.device_transform,
                                normalize=True, progress=f"knn monitor: {split} features", gather=False)

    @torch.no_grad()
    def __call__(self, backbone: nn.Module) -> Dict[str, float]:
        """``{"top1": %, "top5": %}`` of the current ``backbone`` (mode restored afterwards)."""
        train_feats, train_labels = self._features(backbone, self.train_set, "train")
        val_feats, val_labels = self._features(backbone, self.val_set, "val")
        acc = knn_evaluate(train_feats, train_labels, val_feats, val_labels, [self.k], self.temperature,
                           self.num_classes, progress="knn monitor: kNN" if cd.get_rank() == 0 else "",
                           sharded=True, normalized=True)[self.k]
        if acc["top1"] > self.best["top1"]:
            self.best = dict(acc)
        return acc


def _num_classes(dataset: Dataset) -> int:
    """``dataset.num_classes``, else ``len(dataset.classes)``, else ``1 + max(dataset.targets)``."""
    if hasattr(dataset, "num_classes"):
        return int(dataset.num_classes)
    if hasattr(dataset, "classes"):
        return len(dataset.classes)
    return int(max(dataset.targets)) + 1
