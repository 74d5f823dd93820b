"""Split batch norm: one process emulating the per-GPU batch norm of several.

MoCo's shuffling BN needs batch-norm statistics that differ between the query and the key encoder;
on one process, shuffling the batch changes nothing (statistics do not depend on the order). The
MoCo authors' one-GPU demo (facebookresearch/moco, ``colab/moco_cifar10_demo.ipynb``) replaces
every ``BatchNorm2d`` by ``SplitBatchNorm``: in training mode the batch is cut into ``num_splits``
groups, each normalised with its own statistics, as ``num_splits`` GPUs would; with the key batch
shuffled, the key encoder's groups hold other images than the query encoder's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SplitBatchNorm(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training-mode statistics are those of ``num_splits`` groups of the batch.

    Group ``j`` holds the samples ``i`` with ``i % num_splits == j`` (the demo's
    ``view(-1, C * num_splits, H, W)``, no copy). Each group updates its own copy of the running
    statistics with the usual momentum and the copies are averaged, so evaluation mode is a plain
    ``BatchNorm2d`` with these running statistics. Parameters and buffers are BatchNorm2d's, so the
    state-dict keys are the same.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        if num_splits < 1:
            raise ValueError(f"--bn-splits must be >= 1, got {num_splits}")
        self.num_splits = num_splits

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.num_splits
        if s == 1 or (not self.training and self.track_running_stats):
            return super().forward(x)
        self._check_input_dim(x)
        n, c, h, w = x.shape
        if n % s or (n // s) * h * w < 2:
            raise ValueError(f"split batch norm: a batch of {n} ({h}x{w}) cannot be cut into --bn-splits {s} groups "
                             f"of >= 2 values per channel (use a batch divisible by {s}, or a smaller --bn-splits)")
        factor = 0.0 if self.momentum is None else self.momentum
        tracking = self.training and self.track_running_stats
        if tracking:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        mean = self.running_mean.repeat(s) if tracking else None
        var = self.running_var.repeat(s) if tracking else None
        weight = self.weight.repeat(s) if self.affine else None
        bias = self.bias.repeat(s) if self.affine else None
        y = F.batch_norm(x.reshape(n // s, c * s, h, w), mean, var, weight, bias, True, factor, self.eps)
        if tracking:
            with torch.no_grad():
                self.running_mean.copy_(mean.view(s, c).mean(dim=0))
                self.running_var.copy_(var.view(s, c).mean(dim=0))
        return y.reshape(n, c, h, w)


def convert_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """``module`` with every ``BatchNorm2d`` replaced by a :class:`SplitBatchNorm` holding the same
    parameters and buffers (``torch.nn.SyncBatchNorm.convert_sync_batchnorm``'s pattern);
    ``num_splits == 1`` returns ``module`` unchanged."""
    if num_splits < 1:
        raise ValueError(f"--bn-splits must be >= 1, got {num_splits}")
    if num_splits == 1:
        return module
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SplitBatchNorm):
        out = SplitBatchNorm(module.num_features, num_splits, eps=module.eps, momentum=module.momentum,
                             affine=module.affine, track_running_stats=module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    for name, child in module.named_children():
        module.add_module(name, convert_split_batchnorm(child, num_splits))
    return module
