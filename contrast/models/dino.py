"""DINO (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021), with the
ResNet-50 recipe of its official code (facebookresearch/dino, README "ResNet-50 and other convnets").

* student: backbone -> :class:`DINOHead` (3-layer GELU MLP 2048 -> 2048 -> bottleneck 256,
  L2-normalisation, weight-normalised linear layer to K = ``--feature-dim`` 65536 outputs whose norms
  ``weight_g`` stay 1 with ``--dino-norm-last-layer``), on every crop: 2 global crops then
  ``--num-crop2`` local ones, each resolution through the backbone as one batch, then all crops
  through the head together (``utils.MultiCropWrapper``).
* teacher: a :class:`~contrast.models.momentum.MomentumEncoder` copy of backbone + head (its backbone
  built without stochastic depth, as ``main_dino.py`` builds it, then given the student's weights), fed
  only the 2 global crops, updated after each step with the cosine momentum 0.996 -> 1 (``--contrast-momentum``).
* loss: :func:`~contrast.models.losses.dino_loss` with student temperature ``--contrast-temperature``
  and the teacher temperature warmed up linearly per epoch (``--dino-warmup-teacher-temp`` ->
  ``--dino-teacher-temp`` over ``--dino-warmup-teacher-temp-epochs``); the teacher's outputs are
  centred by ``center``, an EMA (``--dino-center-momentum``) of the mean teacher output over the
  global batch (all ranks), updated after each real step.
* the last layer gets no update during the first ``--dino-freeze-last-layer`` epochs (its gradients
  are dropped before the step); weight decay schedule and per-parameter gradient clipping are the
  shared ``--weight-decay-end`` and ``--clip-grad``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from contrast import distributed as cd
from contrast.config import Flag, MethodConfig
from contrast.models.base import BaseMethod
from contrast.models.losses import dino_loss
from contrast.models.momentum import MomentumEncoder
from contrast.models.recipe import Recipe
from contrast.models.views import Views


class WeightNormLinear(nn.Module):
    """``x @ W.T`` with ``W[i] = weight_g[i] * weight_v[i] / ||weight_v[i]||`` (no bias): what
    ``nn.utils.weight_norm(nn.Linear(in, out, bias=False))`` computes, with its parameter names;
    ``fix_norm`` freezes ``weight_g`` (at 1)."""

    def __init__(self, in_dim: int, out_dim: int, fix_norm: bool = True) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fix_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.weight_v
        return F.linear(x, self.weight_g * v / v.norm(dim=1, keepdim=True))


class DINOHead(nn.Module):
    """DINO's projection head (``vision_transformer.py`` ``DINOHead``), (B, in_dim) -> (B, out_dim)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: List[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers += ([nn.BatchNorm1d(dims[i + 1])] if use_bn else []) + [nn.GELU()]
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def teacher_temperature(epoch: int, warmup: float, final: float, warmup_epochs: int) -> float:
    """The teacher temperature of 0-based ``epoch``: ``np.linspace(warmup, final, warmup_epochs)[epoch]``
    during the warm-up, then ``final`` (``DINOLoss.teacher_temp_schedule``)."""
    if epoch >= warmup_epochs:
        return final
    return warmup if warmup_epochs == 1 else warmup + (final - warmup) * epoch / (warmup_epochs - 1)


class DINO(BaseMethod):
    """Student ``backbone`` + ``head`` (:class:`DINOHead`), EMA ``teacher``, ``center`` buffer."""

    name = "DINO"
    views = Views(count=2, multi_crop=True)
    #: facebookresearch/dino README (ResNet-50 command) over main_dino.py's defaults (docs/methods.md cites each)
    recipe = Recipe(aug="BYOLMultiCrop", crop=0.05, crop2=0.14, image_size=224, image_size2=96, num_crop2=8,
                    mlp_head=True, feature_dim=65536, mlp_hidden_dim=2048, view_batching="joint",
                    contrast_temperature=0.1, contrast_momentum=0.996, optimizer="sgd", base_learning_rate=0.03,
                    lr_scaling="linear", weight_decay=1e-4, weight_decay_end=None, clip_grad=3.0, momentum=0.9,
                    lr_scheduler="cosine", warmup_epoch=10, warmup_multiplier=1e6, sync_batchnorm=True)
    #: facebookresearch/dino main_dino.py defaults: the README's ViT-S/16 100-epoch command gives only --arch
    #: vit_small (docs/backbones.md cites each value); the method flags' defaults are these defaults too
    vit_recipe = Recipe(aug="BYOLMultiCrop", crop=0.05, crop2=0.4, image_size=224, image_size2=96, num_crop2=8,
                        mlp_head=True, feature_dim=65536, mlp_hidden_dim=2048, view_batching="joint",
                        contrast_temperature=0.1, contrast_momentum=0.996, optimizer="adamw",
                        base_learning_rate=0.0005, lr_scaling="linear", weight_decay=0.04, weight_decay_end=0.4,
                        clip_grad=3.0, lr_scheduler="cosine", warmup_epoch=10, warmup_multiplier=1e6,
                        drop_path=0.1, global_pool="token", freeze_patch_embed=False, sync_batchnorm=True)
    flags = (
        Flag("--dino-bottleneck-dim", int, 256, "(new) DINO: bottleneck width before the weight-normalised last layer"),
        Flag("--dino-norm-last-layer", bool, True, "(new) DINO: keep the norms (weight_g) of the last layer at 1"),
        Flag("--dino-use-bn-in-head", bool, False, "(new) DINO: batch norm in the head's MLP"),
        Flag("--dino-teacher-temp", float, 0.04, "(new) DINO: teacher temperature after the warm-up"),
        Flag("--dino-warmup-teacher-temp", float, 0.04, "(new) DINO: teacher temperature of the first epoch"),
        Flag("--dino-warmup-teacher-temp-epochs", int, 0, "(new) DINO: epochs of linear teacher-temperature warm-up"),
        Flag("--dino-center-momentum", float, 0.9, "(new) DINO: EMA momentum of the center"),
        Flag("--dino-freeze-last-layer", int, 1, "(new) DINO: epochs during which the last layer is not updated"),
    )

    def __init__(self, backbone: nn.Module, feat_dim: int, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, norm_last_layer: bool = True, use_bn_in_head: bool = False,
                 student_temperature: float = 0.1, teacher_temp: float = 0.04, warmup_teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 0, center_momentum: float = 0.9, base_momentum: float = 0.996,
                 freeze_last_layer: int = 1, view_batching: str = "joint", multi_crop: bool = False,
                 teacher_backbone: Optional[nn.Module] = None) -> None:
        """``teacher_backbone``: the teacher's (no stochastic depth), given the student's weights here;
        None: a copy of ``backbone``."""
        super().__init__(backbone, feat_dim, view_batching, multi_crop)
        self.head = DINOHead(feat_dim, out_dim, hidden_dim, bottleneck_dim, use_bn=use_bn_in_head,
                             norm_last_layer=norm_last_layer)
        if teacher_backbone is None:
            teacher_backbone = self.backbone
        else:
            teacher_backbone.load_state_dict(self.backbone.state_dict())
        self.teacher = MomentumEncoder(teacher_backbone, self.head, base_momentum)
        self.register_buffer("center", torch.zeros(1, out_dim))
        #: steps taken (the trainer's step after the last real one): the epoch of the teacher temperature
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.student_temperature, self.center_momentum = student_temperature, center_momentum
        self.teacher_temps = (warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
        self.freeze_last_layer = freeze_last_layer
        self.steps_per_epoch, self._step = 0, 0
        self._batch_center: Optional[torch.Tensor] = None

    @classmethod
    def check_config(cls, cfg: MethodConfig) -> None:
        if not cfg.mlp_head:
            raise ValueError(f"{cls.name}'s head is always its MLP; --no-mlp-head is not supported")
        o = cfg.option
        if not 0.0 <= cfg.momentum <= 1.0 or not 0.0 <= o("dino_center_momentum") <= 1.0:
            raise ValueError(f"{cls.name}: --contrast-momentum and --dino-center-momentum must be in [0, 1], got "
                             f"{cfg.momentum} and {o('dino_center_momentum')}")
        if min(cfg.temperature, o("dino_teacher_temp"), o("dino_warmup_teacher_temp")) <= 0:
            raise ValueError(f"{cls.name}: --contrast-temperature, --dino-teacher-temp and --dino-warmup-teacher-temp "
                             f"must be > 0")
        if o("dino_warmup_teacher_temp_epochs") < 0 or o("dino_freeze_last_layer") < 0 or o("dino_bottleneck_dim") < 1:
            raise ValueError(f"{cls.name}: --dino-warmup-teacher-temp-epochs and --dino-freeze-last-layer must be "
                             f">= 0, --dino-bottleneck-dim >= 1")

    @classmethod
    def from_config(cls, cfg: MethodConfig, num_instances: int) -> "DINO":
        backbone, feat_dim = cls.build_backbone(cfg)
        with torch.random.fork_rng(devices=[]):   # its weights are the student's: draws nothing from the stream
            teacher, _ = cls.build_backbone(replace(cfg, backbone=replace(cfg.backbone, drop_path=0.0)))
        o = cfg.option
        return cls(backbone, feat_dim, cfg.feature_dim, cfg.head_hidden_dim, o("dino_bottleneck_dim"),
                   o("dino_norm_last_layer"), o("dino_use_bn_in_head"), cfg.temperature, o("dino_teacher_temp"),
                   o("dino_warmup_teacher_temp"), o("dino_warmup_teacher_temp_epochs"), o("dino_center_momentum"),
                   cfg.momentum, o("dino_freeze_last_layer"), cfg.view_batching, cfg.multi_crop, teacher)

    def on_train_start(self, total_steps: int, steps_per_epoch: int) -> None:
        self.teacher.start(total_steps)
        self.steps_per_epoch = steps_per_epoch
        self._step = int(self.steps_done)   # once per run: the restored count

    def teacher_temperature_at(self, step: int) -> float:
        epoch = step // self.steps_per_epoch if self.steps_per_epoch > 0 else 0
        return teacher_temperature(epoch, *self.teacher_temps)

    def param_groups(self, base_lr: float, weight_decay: float) -> List[dict]:
        """Biases and 1-d parameters without weight decay (``utils.get_params_groups``)."""
        decay, rest = [], []
        for n, p in self.named_parameters():
            if p.requires_grad:
                (rest if n.endswith(".bias") or p.ndim == 1 else decay).append(p)
        return [{"params": decay}, {"params": rest, "weight_decay": 0.0}]

    def _outputs(self, backbone: nn.Module, head: nn.Module, views: List[torch.Tensor]) -> List[torch.Tensor]:
        features = self.encode(backbone, views)
        return list(head(torch.cat(features)).chunk(len(views)))

    def training_loss(self, views: List[torch.Tensor], index: torch.Tensor) -> Dict[str, torch.Tensor]:
        student = self._outputs(self.backbone, self.head, views)
        with torch.no_grad():
            teacher = self._outputs(self.teacher.backbone, self.teacher.head, views[:2])
        temperature = self.teacher_temperature_at(self._step)
        with torch.autocast(device_type=student[0].device.type, enabled=False):
            loss = dino_loss(student, teacher, self.center, self.student_temperature, temperature)
            with torch.no_grad():
                total = cd.all_reduce_sum(torch.cat(teacher).float().sum(dim=0, keepdim=True))
                self._batch_center = total / (2 * teacher[0].shape[0] * cd.get_world_size())
        return {"loss": loss, "teacher_temperature": torch.tensor(temperature)}

    def on_before_optimizer_step(self, step: int) -> None:
        if step < self.freeze_last_layer * self.steps_per_epoch:
            for p in self.head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def on_train_step_end(self, step: int, lr: float, grad_scale: float = 1.0) -> None:
        self.teacher.update(self.backbone, self.head, self.teacher.momentum_at(step))
        if self._batch_center is not None:
            m = self.center_momentum
            self.center.mul_(m).add_(self._batch_center.to(self.center.dtype), alpha=1.0 - m)
            self._batch_center = None
        self._step = step + 1
        self.steps_done.fill_(step + 1)
