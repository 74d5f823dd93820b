"""The shared base of every pretraining method (solo-learn style).

A method is an ``nn.Module`` that owns its backbone, head(s) and any state
(memory bank, queue, classifier table). The training loop only ever calls

* ``method(views, index) -> dict`` with a scalar ``"loss"`` (fp32) and optional
  extra scalars for logging (Python floats or 0-d tensors), and
* ``method.on_train_step_end(step, lr, grad_scale)`` after the optimiser step, for updates
  that are not gradient steps (momentum encoders, queues, banks, sampled rows).

``views`` is a list of float tensors (B, 3, H, W), already normalised and on the
method's device; ``index`` (B,) holds the dataset indices of this rank's batch.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn


class BaseMethod(nn.Module):
    """Backbone + method-specific parts. Subclasses implement :meth:`forward`.

    Attributes:
        backbone: a torchvision ResNet whose ``fc`` is ``nn.Identity``; its
            state dict (prefix ``backbone.``) is what linear evaluation and the
            export tool read.
        feat_dim: width of the backbone's pooled feature.
        sync_batchnorm: the training loop converts batch norm to its cross-rank form
            (``contrast.distributed.convert_sync_batchnorm``) when world size > 1.
    """

    backbone: nn.Module
    feat_dim: int
    #: batch norm statistics over the global batch when distributed (SimCLR); the loop converts.
    sync_batchnorm: bool = False

    def forward(self, views: List[torch.Tensor], index: torch.Tensor) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def on_train_step_end(self, step: int, lr: float, grad_scale: float = 1.0) -> None:
        """Called once per iteration after a real ``optimizer.step()`` (default: nothing).

        ``grad_scale`` is the AMP loss scale (1 without a GradScaler), for state
        updated from gradients outside the optimiser (the sampled PIC table).
        """
