"""The interface shared by PIC's instance classifiers (the dense table of ``contrast.models.pic``
and the sampled, sharded one of ``contrast.models.pic_sampled``), so PIC never probes them::

    loss = classifier(z_large, index, z_small)   # (B, D), (B,), list of (B, D)
    classifier.on_train_step_end(step, lr, grad_scale)
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn


class InstanceClassifier(nn.Module):
    """Cosine-softmax classifier with one row per training instance."""

    def forward(self, z_large: torch.Tensor, index: torch.Tensor,
                z_small: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """fp32 loss of normalised (B, D) ``z_large`` with targets ``index`` (B,); ``z_small`` (small
        crops, each (B, D)) are classified against a detached table."""
        raise NotImplementedError

    def positive_similarity(self, z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Mean cosine similarity between (B, D) ``z`` and the rows of its own instances."""
        raise NotImplementedError

    def stats(self) -> Dict[str, torch.Tensor]:
        """Scalars to log (row-norm statistics and the like)."""
        return {}

    @torch.no_grad()
    def on_train_step_end(self, step: int, lr: float, grad_scale: float = 1.0) -> None:
        """After a real optimiser step (rows trained outside the optimiser move here)."""

    def rank_state_dict(self) -> Optional[dict]:
        """This rank's part of the table when it is sharded over ranks, else None."""
        return None

    def load_rank_state_dicts(self, shards: List[dict]) -> None:
        raise ValueError("this PIC classifier keeps no per-rank state; the checkpoint's rank shards were "
                         "written by a run with --pic-num-negative > 0")
