"""SwAV (Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments", NeurIPS 2020; facebookresearch/swav ``main_swav.py``).

* network: backbone -> projection head (Linear -> BatchNorm1d -> ReLU -> Linear, 2048 -> 128) ->
  L2-normalise -> prototypes (Linear(128, K = 3000), no bias). The prototype rows are kept
  unit-norm: normalised at construction and after every optimiser step, so every forward sees
  unit rows (swav normalises them before every forward), and a resumed run continues from the
  saved rows bit for bit (normalising unit rows again would change their last bits).
* crops: ``views[:num_crop]`` are the large crops (``--num-crop``, 2 by default), the rest small ones
  (``--aug MultiCrop``). The assignment crops are named explicitly (``--swav-crops-for-assign``,
  swav's ``crops_for_assign``, default 0 1) and must be exactly the large crops: a ``--num-crop``
  that would send a small crop into Sinkhorn and the queue, or leave a large crop without a code, is
  refused. With
  ``--view-batching joint`` (SwAV's default) crops of equal size go through the backbone together
  and all crops through the head together, as ``main_swav.py`` does.
* codes: for each assignment crop, :func:`~contrast.models.losses.sinkhorn_knopp` over the global batch
  (row and column sums reduced over ranks with ``contrast.distributed.all_reduce_sum``), with the
  queue's scores prepended once the queue is full; only the batch's rows are kept.
* loss: :func:`~contrast.models.losses.swav_loss`, every other crop predicts each assignment crop's code.
* queue (small batches): each rank keeps the last floor(L / G) batches of its embeddings of the
  large crops (L = ``--swav-queue-length``, G = the global batch), written after each optimiser
  step from the step ``--swav-queue-start-epoch`` x iterations per epoch on, and used once full.
  Across ranks these are the embeddings of the last floor(L / G) global batches, the same set one
  process with the whole batch keeps. This is swav's queue (L rounded down to a multiple of G, then
  L / world_size rows per rank); it is per-rank state, saved with ``rank_state_dict``.
* prototypes are frozen (their gradient dropped) for the first ``--swav-freeze-prototypes-iters``
  iterations.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from contrast import distributed as cd
from contrast.config import Flag, MethodConfig
from contrast.models.base import BaseMethod
from contrast.models.heads import build_mlp, normalize_fp32
from contrast.models.losses import sinkhorn_knopp, swav_loss
from contrast.models.queue import FeatureQueue
from contrast.models.recipe import Recipe, vit_recipe_of
from contrast.models.views import Views


class RankQueue:
    """One rank's SwAV queue: a :class:`FeatureQueue` of (A, D) entries (the A assignment crops'
    embeddings of one sample), created at the first write, when the local batch b is known, with
    floor(L / (b x world size)) x b rows. Deliberately not an ``nn.Module``: its content differs
    between ranks, so it is saved per rank (:meth:`state_dict`), not in the model's state dict."""

    def __init__(self, length: int) -> None:
        if length < 0:
            raise ValueError(f"--swav-queue-length must be >= 0, got {length}")
        self.length = length
        self.queue: Optional[FeatureQueue] = None
        self.filled = 0
        self._warned = False

    @property
    def full(self) -> bool:
        return self.queue is not None and self.filled >= len(self.queue)

    @property
    def features(self) -> torch.Tensor:
        """(rows, A, D) stored embeddings (oldest rows not first: the order does not matter to Sinkhorn)."""
        if self.queue is None:
            raise ValueError("the SwAV queue is empty")
        return self.queue.features

    @torch.no_grad()
    def write(self, z: torch.Tensor) -> None:
        """Append this rank's (b, A, D) embeddings, overwriting the oldest rows once full."""
        world = cd.get_world_size()
        rows = self.length // (z.shape[0] * world) * z.shape[0]
        if rows == 0:
            if self.length > 0 and not self._warned:
                warnings.warn(f"--swav-queue-length {self.length} is shorter than the global batch "
                              f"{z.shape[0] * world}: no queue is used (swav rounds it down to a multiple of it)")
                self._warned = True
            return
        if self.queue is None or self.features.shape != (rows,) + tuple(z.shape[1:]):
            self.queue = FeatureQueue(rows, tuple(z.shape[1:]), init="zeros").to(z.device)
            self.filled = 0
        self.queue.enqueue(z)
        self.filled = min(self.filled + z.shape[0], rows)

    def state_dict(self) -> dict:
        q = self.queue
        return {"features": None if q is None else q.features.cpu(), "ptr": 0 if q is None else int(q.ptr),
                "filled": self.filled}

    def load_state_dicts(self, shards: List[dict], rank: int, world_size: int, device: torch.device) -> None:
        """This rank's shard (on ``device``) when the world size is unchanged; otherwise the queue
        starts empty (it refills within floor(L / G) steps) with a warning."""
        self.queue, self.filled = None, 0
        if len(shards) != world_size:
            warnings.warn(f"the SwAV queue was saved by {len(shards)} rank(s), this run has {world_size}: "
                          f"it starts empty and refills")
            return
        mine = shards[rank]
        if mine["features"] is not None:
            features = mine["features"]
            self.queue = FeatureQueue(features.shape[0], tuple(features.shape[1:]), init="zeros").to(device)
            self.queue.features.copy_(features)
            self.queue.ptr.fill_(mine["ptr"])
            self.filled = int(mine["filled"])


def check_crops_for_assign(crops: Sequence[int], num_crop: int) -> Tuple[int, ...]:
    """``crops`` as a tuple if they are exactly the ``num_crop`` large crops (any order); ``ValueError`` otherwise."""
    crops = tuple(int(c) for c in crops)
    given = " ".join(map(str, crops))
    if not crops or len(set(crops)) != len(crops) or min(crops) < 0:
        raise ValueError(f"SwAV: --swav-crops-for-assign {given!r} must name distinct crop indices >= 0")
    small = [c for c in crops if c >= num_crop]
    if small:
        raise ValueError(f"SwAV: --swav-crops-for-assign {given} names crop(s) {' '.join(map(str, small))}, which "
                         f"are not large crops (--num-crop {num_crop}: large crops 0..{num_crop - 1}); the codes "
                         f"come from large crops only")
    left = [c for c in range(num_crop) if c not in crops]
    if left:
        raise ValueError(f"SwAV: --num-crop {num_crop} gives large crop(s) {' '.join(map(str, left))} no code "
                         f"(--swav-crops-for-assign {given}); name every large crop or lower --num-crop")
    return crops


class SwAV(BaseMethod):
    """Backbone, ``head`` (projection MLP with BN), ``prototypes``; a per-rank queue."""

    name = "SwAV"
    views = Views(count=2, multi_crop=True)
    #: facebookresearch/swav, scripts/swav_800ep_pretrain.sh (batch 4096; base lr 4.8 = 0.3 per 256 images)
    #: and main_swav.py's defaults (docs/methods.md cites each value)
    recipe = Recipe(aug="MultiCrop", crop=0.05, crop2=0.14, image_size=224, image_size2=96, num_crop2=6,
                    mlp_head=True, feature_dim=128, mlp_hidden_dim=2048, view_batching="joint",
                    contrast_temperature=0.1, optimizer="lars", base_learning_rate=0.3, weight_decay=1e-6,
                    warmup_epoch=10, warmup_multiplier=16, lr_scheduler="cosine", sync_batchnorm=True)
    vit_recipe = vit_recipe_of(recipe)   # no published ViT recipe: MoCo v3's AdamW (docs/backbones.md)
    flags = (
        Flag("--swav-num-prototypes", int, 3000, "(new) SwAV: number of prototypes K"),
        Flag("--swav-epsilon", float, 0.05, "(new) SwAV: entropy regularisation of Sinkhorn-Knopp"),
        Flag("--swav-sinkhorn-iterations", int, 3, "(new) SwAV: Sinkhorn-Knopp iterations"),
        Flag("--swav-queue-length", int, 0, "(new) SwAV: queue length over all ranks, rounded down to a multiple "
             "of the global batch (0: no queue; swav uses 3840 for batch 256)"),
        Flag("--swav-queue-start-epoch", int, 15, "(new) SwAV: the queue fills from the first step after this many "
             "epochs and is used once full"),
        Flag("--swav-freeze-prototypes-iters", int, 313, "(new) SwAV: the prototypes are not updated during this "
             "many first iterations"),
        Flag("--swav-crops-for-assign", int, (0, 1), "(new) SwAV: the crops whose codes are computed (swav's "
             "crops_for_assign); they must be the large crops 0 .. --num-crop - 1", nargs="+"),
    )

    def __init__(self, backbone: nn.Module, feat_dim: int, feature_dim: int = 128, hidden_dim: int = 2048,
                 num_prototypes: int = 3000, temperature: float = 0.1, epsilon: float = 0.05,
                 sinkhorn_iterations: int = 3, queue_length: int = 0, queue_start_epoch: int = 15,
                 freeze_prototypes_iters: int = 313, view_batching: str = "joint", multi_crop: bool = False,
                 crops_for_assign: Sequence[int] = (0, 1), num_crop: int = 2) -> None:
        super().__init__(backbone, feat_dim, view_batching, multi_crop)
        self.crops_for_assign = check_crops_for_assign(crops_for_assign, num_crop)
        if num_prototypes < 1 or epsilon <= 0 or sinkhorn_iterations < 1:
            raise ValueError(f"SwAV needs --swav-num-prototypes >= 1, --swav-epsilon > 0 and "
                             f"--swav-sinkhorn-iterations >= 1, got {num_prototypes}, {epsilon}, {sinkhorn_iterations}")
        self.head = build_mlp(feat_dim, hidden_dim, feature_dim, batch_norm=True)
        self.prototypes = nn.Linear(feature_dim, num_prototypes, bias=False)
        self.normalize_prototypes()
        self.temperature, self.epsilon, self.sinkhorn_iterations = temperature, epsilon, sinkhorn_iterations
        self.queue = RankQueue(queue_length)
        self.queue_start_epoch = queue_start_epoch
        self.freeze_prototypes_iters = freeze_prototypes_iters
        self._queue_start_step: Optional[int] = None   # known at on_train_start
        self._pending: Optional[torch.Tensor] = None

    @classmethod
    def check_config(cls, cfg: MethodConfig) -> None:
        if not cfg.mlp_head:
            raise ValueError(f"{cls.name}'s projection head is always an MLP; --no-mlp-head is not supported")

    @classmethod
    def from_config(cls, cfg: MethodConfig, num_instances: int) -> "SwAV":
        backbone, feat_dim = cls.build_backbone(cfg)
        o = cfg.option
        return cls(backbone, feat_dim, cfg.feature_dim, cfg.head_hidden_dim, o("swav_num_prototypes"),
                   cfg.temperature, o("swav_epsilon"), o("swav_sinkhorn_iterations"), o("swav_queue_length"),
                   o("swav_queue_start_epoch"), o("swav_freeze_prototypes_iters"), cfg.view_batching, cfg.multi_crop,
                   o("swav_crops_for_assign"), cfg.num_crop)

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        w = self.prototypes.weight
        w.copy_(F.normalize(w.float(), dim=1).to(w.dtype))

    def on_train_start(self, total_steps: int, steps_per_epoch: int) -> None:
        self._queue_start_step = self.queue_start_epoch * steps_per_epoch

    @torch.no_grad()
    def codes(self, scores: torch.Tensor, crop: int) -> torch.Tensor:
        """(B, K) codes of one assignment crop from its (B, K) scores (and the queue once full)."""
        batch = scores.shape[0]
        if self.queue.full:
            stored = self.queue.features[:, crop].float()
            scores = torch.cat([F.linear(stored, self.prototypes.weight.float()), scores])
        return sinkhorn_knopp(scores, self.epsilon, self.sinkhorn_iterations, cd.all_reduce_sum)[-batch:]

    def training_loss(self, views: List[torch.Tensor], index: torch.Tensor) -> Dict[str, torch.Tensor]:
        z = [normalize_fp32(y) for y in self.encode(self.head, self.encode(self.backbone, views))]
        assign = self.crops_for_assign
        with torch.autocast(device_type=z[0].device.type, enabled=False):
            scores = [F.linear(e, self.prototypes.weight.float()) for e in z]
            code_of = {crop: self.codes(scores[crop].detach(), j) for j, crop in enumerate(assign)}
            # swav_loss takes the codes of crops 0 .. A - 1 in order; the assignment crops are exactly those
            loss = swav_loss(scores, [code_of[crop] for crop in range(len(assign))], self.temperature)
        self._pending = torch.stack([z[crop].detach() for crop in assign], dim=1)
        return {"loss": loss, "queue_used": torch.tensor(float(self.queue.full))}

    def on_before_optimizer_step(self, step: int) -> None:
        if step < self.freeze_prototypes_iters:
            self.prototypes.weight.grad = None

    @torch.no_grad()
    def on_train_step_end(self, step: int, lr: float, grad_scale: float = 1.0) -> None:
        self.normalize_prototypes()
        if self._pending is not None and self._queue_start_step is not None and step >= self._queue_start_step:
            self.queue.write(self._pending)
        self._pending = None

    def rank_state_dict(self) -> Optional[dict]:
        return self.queue.state_dict() if self.queue.length > 0 else None

    def load_rank_state_dicts(self, shards: List[dict]) -> None:
        self.queue.load_state_dicts(shards, cd.get_rank(), cd.get_world_size(), self.prototypes.weight.device)
