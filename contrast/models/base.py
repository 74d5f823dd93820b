"""The bases of everything the training loop drives (solo-learn style: the base owns the plumbing).

:class:`TrainModule` is the loop's whole view of a model: ``forward(views, target) -> dict`` with
an fp32 scalar ``"loss"`` (plus scalars to log), the choice of target (:meth:`TrainModule.target`)
and the hooks below, which the loop always calls (the defaults do nothing)::

    on_train_start(total_steps, steps_per_epoch)   once, before the first step (also after a resume)
    forward(views, target)                         every step, under autocast
    on_before_optimizer_step(step)                 after backward, before optimizer.step()
    on_train_step_end(step, lr, grad_scale)        after a real optimizer.step() (not on skipped steps)
    rank_state_dict() / load_rank_state_dicts()    per-rank state saved next to the checkpoint
    feature_module() / embedding_module()          what the online probe / the collapse monitors read

:class:`BaseMethod` adds what every pretraining method declares: its registry ``name``, its
:class:`~contrast.models.views.Views`, its published :class:`~contrast.models.recipe.Recipe` (the
values of the shared flags when not given), its own :class:`~contrast.config.Flag` declarations,
the checks of its configuration (:meth:`BaseMethod.check_config`), the migration of its older
checkpoint keys (:meth:`BaseMethod.migrate_state`) and :meth:`BaseMethod.from_config`. Subclasses
implement :meth:`BaseMethod.training_loss`; ``forward`` checks the number of views first.
:meth:`BaseMethod.param_groups` (always called by the entry script that builds the optimiser) gives
the optimiser's parameter groups: one by default, a method may give a part its own lr.
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from contrast.config import Flag, MethodConfig
from contrast.models.backbone_factory import make_backbone
from contrast.models.recipe import Recipe
from contrast.models.views import Views, encode_views


class TrainModule(nn.Module):
    """A module trained by :class:`contrast.trainer.Trainer` (see the module docstring)."""

    def target(self, index: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The second input of ``forward``: the dataset ``index`` (self-supervised) or the class ``label``."""
        return index

    def on_train_start(self, total_steps: int, steps_per_epoch: int) -> None:
        """Called once before the first step of a run (and of a resumed run) with the schedule length."""

    def on_before_optimizer_step(self, step: int) -> None:
        """Called after backward and before ``optimizer.step()`` (gradients may be edited here)."""

    @torch.no_grad()
    def on_train_step_end(self, step: int, lr: float, grad_scale: float = 1.0) -> None:
        """Called after a real ``optimizer.step()`` (not after a skipped one).

        ``grad_scale`` is the AMP loss scale (1 without a GradScaler; with one a 0-dim tensor on the
        device, so reading it costs no synchronisation), for state updated from gradients outside the
        optimiser (the sampled PIC table).
        """

    def rank_state_dict(self) -> Optional[dict]:
        """This rank's own state (saved by every rank next to the checkpoint), or None."""
        return None

    def load_rank_state_dicts(self, shards: List[dict]) -> None:
        """Restore from the per-rank states of all ranks of the saving run (any world size)."""
        raise ValueError(f"{type(self).__name__} keeps no per-rank state, but the checkpoint holds rank shards")

    def feature_module(self) -> Optional[nn.Module]:
        """The module whose output on the first view (its first call of a forward) is the feature the
        online probe classifies (``contrast.monitors``); None: no probe."""
        return None

    def embedding_module(self) -> Optional[nn.Module]:
        """The module whose outputs on the views of a forward (in view order) the collapse monitors
        measure (``contrast.monitors``); None: no monitors."""
        return None


class BaseMethod(TrainModule):
    """A pretraining method: backbone + method-specific parts (heads, banks, queues, tables).

    Class attributes each method declares:
        name: the ``--model`` value (registry key).
        views: :class:`Views` (full-size views per image, multi-crop support).
        recipe: :class:`Recipe`, everything the method's official recipe fixes (augmentation, crops,
            temperature, momentum, optimiser, lr, weight decay, warm-up, schedule, batch norm): the
            values the shared flags take when not given on the command line.
        vit_recipe: its recipe on a ViT backbone (``--arch vit_*``; docs/backbones.md), or None (refused).
        flags: the method's own command-line flags (their defaults are the recipe's values).

    Attributes:
        backbone: a backbone of any family (``contrast/models/backbone_base.py``); its state dict
            (prefix ``backbone.``) is what linear evaluation and the export tool read.
        feat_dim: width of the backbone's pooled feature.
    """

    name: ClassVar[str] = ""
    views: ClassVar[Views] = Views(count=1)
    recipe: ClassVar[Recipe] = Recipe()
    vit_recipe: ClassVar[Optional[Recipe]] = None
    flags: ClassVar[Tuple[Flag, ...]] = ()

    def __init__(self, backbone: nn.Module, feat_dim: int, view_batching: str = "separate",
                 multi_crop: bool = False) -> None:
        super().__init__()
        if multi_crop and not self.views.multi_crop:
            raise ValueError(f"{self.name or type(self).__name__} does not take --aug MultiCrop")
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.view_batching = view_batching
        self.multi_crop = multi_crop

    @classmethod
    def from_config(cls, cfg: MethodConfig, num_instances: int) -> "BaseMethod":
        """Build the method from its configuration for a training set of ``num_instances`` images."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, cfg: MethodConfig) -> None:
        """Refuse a configuration the method cannot train (``ValueError`` with a one-line message
        naming the flag); called when the command line is parsed, before anything is built."""

    @classmethod
    def migrate_state(cls, state: Dict[str, Any], version: int) -> Dict[str, Any]:
        """The model state dict of a checkpoint of format ``version`` (prefixes stripped) renamed to
        today's keys; called for each older version in turn (see ``contrast/checkpoint/``)."""
        return state

    @staticmethod
    def build_backbone(cfg: MethodConfig) -> Tuple[nn.Module, int]:
        """``(backbone, feat_dim)`` of ``cfg.backbone``."""
        backbone = make_backbone(cfg.backbone)
        return backbone, backbone.feat_dim

    def forward(self, views: List[torch.Tensor], index: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Check the number of views, then :meth:`training_loss`."""
        count = self.views.count
        ok = len(views) > count if self.multi_crop else len(views) == count
        if not ok:
            want = f"{count} large + >= 1 small crops" if self.multi_crop else f"{count}"
            other = " or MultiCrop" if self.views.multi_crop and not self.multi_crop else ""
            raise ValueError(f"{self.name} takes {want} view(s) per image, got {len(views)} "
                             f"(--aug {self.recipe.aug}{other})")
        return self.training_loss(views, index)

    def training_loss(self, views: List[torch.Tensor], index: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``{"loss": fp32 scalar, ...scalars to log}`` for a batch of (B, 3, H, W) ``views`` and (B,) ``index``."""
        raise NotImplementedError

    def param_groups(self, base_lr: float, weight_decay: float) -> List[dict]:
        """The optimiser's parameter groups (``torch.optim`` dicts) for peak lr ``base_lr`` and
        ``weight_decay``: by default one group of all trainable parameters, which take both from the
        optimiser. A group may set its own ``lr`` / ``weight_decay`` and ``constant_lr=True`` (the
        schedule leaves its lr alone; see :func:`contrast.optim.build_scheduler`)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def feature_module(self) -> Optional[nn.Module]:
        """The backbone (the representation the evaluations read)."""
        return self.backbone

    def embedding_module(self) -> Optional[nn.Module]:
        """The backbone by default (RankMe's choice: the representation); a method may return its
        projection head instead (it must call it on the views in order)."""
        return self.backbone

    def no_weight_decay_params(self) -> Set[nn.Parameter]:
        """Parameters AdamW does not decay: the backbone's ``no_weight_decay()`` and every other
        parameter of rank < 2 (biases, norms)."""
        skip = {"backbone." + n for n in self.backbone.no_weight_decay()}
        return {p for n, p in self.named_parameters() if n in skip or p.ndim < 2}

    def encode(self, encoder, views: List[torch.Tensor]) -> List[torch.Tensor]:
        """``encoder`` applied to every view, batched as ``--view-batching`` says."""
        return encode_views(encoder, views, self.view_batching)
