"""PIC: parametric instance classification (Cao et al., NeurIPS 2020, arXiv 2006.14618).

Every training image is its own class. The embedding ``z`` (normalised output of backbone + head)
is classified by a cosine softmax over a table W with one row per instance
(:func:`contrast.models.losses.pic_loss`). The table is an
:class:`~contrast.models.instance_classifier.InstanceClassifier`: the dense one here (full softmax,
trained by the optimiser like any parameter), or, with ``--pic-num-negative K``, the sampled one of
:mod:`contrast.models.pic_sampled` (recent negative sampling + weight update correction + sharded
storage).

Views: with ``--aug MultiCrop`` the first ``--num-crop`` views (1 by default) are the large crops,
classified against W, and the rest are small crops, classified against a detached W; the loss is
the mean cross-entropy over all crops, every crop weighing the same (the release's single
cross-entropy over the concatenated logits of the k + k_small crops). Otherwise the single view is
classified.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from contrast.config import Flag, MethodConfig
from contrast.models.base import BaseMethod
from contrast.models.heads import MLP_HIDDEN_DIM, build_head, normalize_fp32
from contrast.models.instance_classifier import InstanceClassifier
from contrast.models.losses import pic_loss
from contrast.models.pic_diagnostics import PICDiagnostics, window_steps_of
from contrast.models.pic_sampled import STORAGES, SampledInstanceClassifier
from contrast.models.recipe import Recipe, vit_recipe_of
from contrast.models.views import Views


class DenseInstanceClassifier(InstanceClassifier):
    """Full-softmax instance classifier holding W (N, D) as an ``nn.Parameter``.

    W is initialised N(0, 0.01) as in the paper and trained by the optimiser like any other
    parameter (under DDP its gradient is averaged over ranks, so every rank keeps the same table).

    ``table_lr > 0`` (``--pic-table-constant-lr``): W is a parameter group of its own with the
    constant lr ``table_lr`` (:meth:`PIC.param_groups`), so the optimiser moves W (weight decay
    included) as plain SGD at that lr while the rest follows the schedule. ``diagnostics``
    (``--pic-diagnostics``) observe every training batch.
    """

    def __init__(self, num_instances: int, dim: int, temperature: float, table_lr: float = 0.0,
                 diagnostics: Optional[PICDiagnostics] = None) -> None:
        super().__init__()
        if num_instances <= 0:
            raise ValueError(f"PIC needs a non-empty training set, got num_instances={num_instances}")
        if table_lr < 0:
            raise ValueError(f"PIC: the table lr must be >= 0, got {table_lr}")
        self.temperature = temperature
        self.weight = nn.Parameter(torch.randn(num_instances, dim) * 0.01)
        self.table_lr = table_lr
        self.diagnostics = diagnostics
        self._diag: Dict[str, float] = {}

    def forward(self, z_large: torch.Tensor, index: torch.Tensor,
                z_small: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        if self.diagnostics is not None and self.training:
            self._diag = self.diagnostics.observe(z_large, index, self.weight)
        with torch.autocast(device_type=z_large.device.type, enabled=False):
            return pic_loss(z_large, self.weight, index, self.temperature, z_small)

    @torch.no_grad()
    def positive_similarity(self, z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return (z * normalize_fp32(self.weight[index])).sum(dim=1).mean()

    @torch.no_grad()
    def stats(self) -> Dict[str, torch.Tensor]:
        """Row-norm statistics of W, and the diagnostics' scalars on the steps they measure."""
        norms = self.weight.float().norm(dim=1)
        out = {"w_norm_mean": norms.mean(), "w_norm_min": norms.min(), "w_norm_max": norms.max(), **self._diag}
        self._diag = {}
        return out

    @torch.no_grad()
    def on_train_step_end(self, step: int, lr: float, grad_scale: float = 1.0) -> None:
        if self.diagnostics is not None:
            self.diagnostics.set_lr(lr)


def build_pic_head(feat_dim: int, feature_dim: int, mlp_head: bool, hidden_dim: int = MLP_HIDDEN_DIM,
                   center: bool = False) -> nn.Module:
    """The projection head; ``center=True`` (``--pic-head-center``) appends a BatchNorm1d without
    affine parameters, so the embeddings are centred per batch before the L2 normalisation.

    With the sliding window and the full softmax, most rows belong to instances outside the window
    and act as fixed negatives; the head lowers the loss of every window instance at once by giving
    all embeddings a common component pointing away from those rows, the embeddings collapse into a
    small cap that keeps moving, and instances returning to the window find their rows where the cap
    was (docs/pic_stability.md). Centring removes the common component (the last BN of MoCo v3's
    projector, Chen et al. 2021, has no affine parameters either). The head's own state-dict keys are
    unchanged; the BN adds ``head.<last>.running_*`` buffers.
    """
    head = build_head(feat_dim, feature_dim, mlp_head, hidden_dim)
    if not center:
        return head
    layers = list(head) if isinstance(head, nn.Sequential) else [head]
    return nn.Sequential(*layers, nn.BatchNorm1d(feature_dim, affine=False))


def build_instance_classifier(num_instances: int, dim: int, temperature: float, num_negative: int = 0,
                              momentum: float = 0.9, weight_decay: float = 1e-4,
                              weight_correction: bool = True, storage: str = "memory",
                              storage_dir: str | None = None, seed: int = 0, table_lr: float = 0.0,
                              diagnostics: Optional[PICDiagnostics] = None) -> InstanceClassifier:
    """Dense classifier when ``num_negative == 0`` (``--pic-num-negative``), otherwise the sampled
    classifier of :mod:`contrast.models.pic_sampled` (recent negative sampling)."""
    if num_negative < 0:
        raise ValueError(f"--pic-num-negative must be >= 0, got {num_negative}")
    if num_negative == 0:
        return DenseInstanceClassifier(num_instances, dim, temperature, table_lr, diagnostics)
    if table_lr > 0 or diagnostics is not None:
        raise ValueError("PIC: --pic-table-constant-lr and --pic-diagnostics act on the dense table; "
                         "use them with --pic-num-negative 0")
    return SampledInstanceClassifier(num_instances, dim, temperature, num_negative, momentum=momentum,
                                     weight_decay=weight_decay, weight_correction=weight_correction,
                                     storage=storage, storage_dir=storage_dir, seed=seed)


class PIC(BaseMethod):
    """Backbone + head + instance classifier."""

    name = "PIC"
    views = Views(count=1, multi_crop=True)
    #: the release's scripts/PIC.sh, the paper's multi-crop recipe (docs/methods.md cites each value)
    recipe = Recipe(aug="MultiCrop", crop=0.08, image_size=160, image_size2=96, crop2=0.14, num_crop2=3,
                    use_sliding_window_sampler=True, window_size=131072, window_stride=16384,
                    shuffle_per_epoch=True, mlp_head=True, contrast_temperature=0.2, warmup_divisor=40)
    vit_recipe = vit_recipe_of(recipe)   # no published ViT recipe: MoCo v3's AdamW (docs/backbones.md)
    flags = (
        Flag("--pic-num-negative", int, 0, "(new) PIC recent negative sampling: number of negatives K "
             "(0 = full softmax over all instances)"),
        Flag("--pic-weight-correction", bool, True, "(new) PIC weight update correction for rows skipped by "
             "negative sampling"),
        Flag("--pic-storage", str, "memory", "(new) sampled PIC classifier: where each rank keeps its shard "
             "of the table (host memory, or memory-mapped files)", choices=STORAGES),
        Flag("--pic-storage-dir", str, "", "(new) folder of the table files with --pic-storage disk "
             "(default: <output-dir>/pic_table)"),
        Flag("--pic-head-center", bool, False, "(new) PIC: centre the embeddings per batch (BatchNorm1d "
             "without affine parameters after the head) before the L2 normalisation; keeps dense PIC with the "
             "sliding window stable in long runs (docs/pic_stability.md)"),
        Flag("--pic-table-constant-lr", bool, False, "(new) dense PIC: train the table at the peak lr "
             "throughout (an optimiser parameter group of its own) while the rest follows the schedule"),
        Flag("--pic-diagnostics", bool, False, "(new) dense PIC: log the table's geometry under train/diag/ "
             "every --pic-diagnostics-freq steps (staleness, positive vs max negative, stale rows vs embeddings)"),
        Flag("--pic-diagnostics-freq", int, 10, "(new) steps between --pic-diagnostics measurements"),
    )

    def __init__(self, backbone: nn.Module, feat_dim: int, num_instances: int, feature_dim: int = 128,
                 mlp_head: bool = True, temperature: float = 0.2, multi_crop: bool = False,
                 classifier: InstanceClassifier | None = None, view_batching: str = "separate",
                 hidden_dim: int = MLP_HIDDEN_DIM, num_crop: int = 1, head_center: bool = False) -> None:
        super().__init__(backbone, feat_dim, view_batching, multi_crop)
        self.head = build_pic_head(feat_dim, feature_dim, mlp_head, hidden_dim, head_center)
        self.classifier = classifier if classifier is not None else \
            DenseInstanceClassifier(num_instances, feature_dim, temperature)
        if num_crop < 1 or (num_crop > 1 and not multi_crop):
            raise ValueError(f"PIC: --num-crop {num_crop} needs --aug MultiCrop (it counts its large crops)")
        if num_crop > 1 and not isinstance(self.classifier, DenseInstanceClassifier):
            raise ValueError("PIC: --num-crop > 1 needs the dense classifier (--pic-num-negative 0)")
        self.num_crop = num_crop

    @classmethod
    def from_config(cls, cfg: MethodConfig, num_instances: int) -> "PIC":
        storage_dir = cfg.option("pic_storage_dir") or (os.path.join(cfg.output_dir, "pic_table")
                                                         if cfg.output_dir else None)
        classifier = build_instance_classifier(
            num_instances, cfg.feature_dim, cfg.temperature, cfg.option("pic_num_negative"),
            momentum=cfg.optimizer_momentum, weight_decay=cfg.weight_decay,
            weight_correction=cfg.option("pic_weight_correction"), storage=cfg.option("pic_storage"),
            storage_dir=storage_dir, seed=cfg.seed,
            table_lr=cfg.peak_lr if cfg.option("pic_table_constant_lr") else 0.0,
            diagnostics=cls.build_diagnostics(cfg, num_instances) if cfg.option("pic_diagnostics") else None)
        backbone, feat_dim = cls.build_backbone(cfg)
        return cls(backbone, feat_dim, num_instances, cfg.feature_dim, cfg.mlp_head, cfg.temperature,
                   cfg.multi_crop, classifier, cfg.view_batching, cfg.head_hidden_dim,
                   cfg.num_crop if cfg.multi_crop else 1, cfg.option("pic_head_center"))

    @staticmethod
    def build_diagnostics(cfg: MethodConfig, num_instances: int) -> PICDiagnostics:
        """Rows seen within the steps an instance stays in the sliding window count as fresh."""
        window = min(cfg.window_size or num_instances, num_instances)
        stride = min(cfg.window_stride or window, window)
        return PICDiagnostics(num_instances, window_steps_of(window, stride, cfg.total_batch_size),
                              every=cfg.option("pic_diagnostics_freq"), seed=cfg.seed)

    def training_loss(self, views: List[torch.Tensor], index: torch.Tensor) -> Dict[str, torch.Tensor]:
        k = self.num_crop
        if len(views) <= k and self.multi_crop:
            raise ValueError(f"PIC: --num-crop {k} large crops need at least one small crop, got {len(views)} views")
        zs = [normalize_fp32(y) for y in self.encode(lambda x: self.head(self.backbone(x)), views)]
        if k == 1:
            loss = self.classifier(zs[0], index, zs[1:])
        else:
            loss = self.several_large_crops_loss(zs[:k], zs[k:], index)
        return {"loss": loss, "pos_sim": self.classifier.positive_similarity(zs[0].detach(), index),
                **self.classifier.stats()}

    def several_large_crops_loss(self, z_large: List[torch.Tensor], z_small: List[torch.Tensor],
                                 index: torch.Tensor) -> torch.Tensor:
        """``--num-crop k > 1`` (dense table only): mean cross-entropy over the k large crops (against
        W) and the small crops (against a detached W), every crop weighing the same:
        ``(k CE_large + s CE_small) / (k + s)``, each CE a mean over its crops' rows."""
        clf = self.classifier
        k, s = len(z_large), len(z_small)
        with torch.autocast(device_type=index.device.type, enabled=False):
            loss = k * pic_loss(torch.cat(z_large), clf.weight, index.repeat(k), clf.temperature)
            if s:
                loss = loss + s * pic_loss(torch.cat(z_small), clf.weight.detach(), index.repeat(s),
                                           clf.temperature)
        return loss / (k + s)

    def param_groups(self, base_lr: float, weight_decay: float) -> List[dict]:
        """One group; with ``--pic-table-constant-lr`` the dense table is a second group at its constant
        lr (``table_lr``, the peak lr) with the same weight decay, untouched by the schedule."""
        clf = self.classifier
        if not (isinstance(clf, DenseInstanceClassifier) and clf.table_lr > 0):
            return super().param_groups(base_lr, weight_decay)
        rest = [p for p in self.parameters() if p.requires_grad and p is not clf.weight]
        return [{"params": rest},
                {"params": [clf.weight], "lr": clf.table_lr, "weight_decay": weight_decay, "constant_lr": True}]

    @torch.no_grad()
    def on_train_step_end(self, step: int, lr: float, grad_scale: float = 1.0) -> None:
        self.classifier.on_train_step_end(step, lr, grad_scale)

    def rank_state_dict(self) -> dict | None:
        return self.classifier.rank_state_dict()

    def load_rank_state_dicts(self, shards: List[dict]) -> None:
        self.classifier.load_rank_state_dicts(shards)
