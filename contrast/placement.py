"""Where a run's modules and tensors live: the one place that moves them to the training device.

:func:`place` moves a module (the method, the linear classifier, an augmentation's device stage,
a kNN encoder) and checks that every parameter and buffer arrived; :func:`place_inputs` moves a
batch. The :class:`~contrast.trainer.Trainer` places its model and device stage itself, and so do
linear evaluation's ``evaluate``, the kNN monitor and ``main_knn.py``: an entry script never has a
module to move by hand (issue 29: ``aug.device`` was left on the CPU and crashed the first CUDA step).

:func:`configure_backends` sets the backend switches of the device once per process (cuDNN
autotuning, or deterministic kernels with ``--deterministic``).
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


class PlacementError(RuntimeError):
    """A parameter or buffer is not on the training device after :func:`place`."""


def stray_tensors(module: nn.Module, device: torch.device) -> List[str]:
    """``"name (device)"`` of each parameter and buffer of ``module`` that is not on ``device``."""
    device = torch.device(device)
    out = []
    for kind, named in (("parameter", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, t in named:
            if t.device.type != device.type or (device.index is not None and t.device.index != device.index):
                out.append(f"{kind} {name} ({t.device})")
    return out


def place(module: Optional[M], device: torch.device, channels_last: bool = False) -> Optional[M]:
    """``module`` moved to ``device`` in place (``channels_last``: 4-d weights in that memory format),
    returned; None stays None. Raises :class:`PlacementError` naming a tensor left elsewhere."""
    if module is None:
        return None
    module = module.to(device)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    stray = stray_tensors(module, device)
    if stray:
        raise PlacementError(f"{type(module).__name__}: {len(stray)} tensor(s) not on the training device {device} "
                             f"after moving it: {', '.join(stray[:3])}")
    return module


def place_inputs(views: Sequence[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    """A batch's views on ``device`` (asynchronous copies from pinned memory)."""
    return [v.to(device, non_blocking=True) for v in views]


def configure_backends(device: torch.device, deterministic: bool = False) -> str:
    """Backend switches of ``device`` for this process; returns a line for the log.

    CUDA: ``cudnn.benchmark`` (cuDNN times its algorithms for each new input shape and keeps the
    fastest; the shapes of a run are fixed), or with ``deterministic`` deterministic algorithms
    (``torch.use_deterministic_algorithms``, ``CUBLAS_WORKSPACE_CONFIG``), slower but repeatable.
    """
    device = torch.device(device)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
        return "--deterministic: deterministic algorithms (cudnn.benchmark off)"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        return "cudnn.benchmark on (--deterministic for repeatable kernels)"
    return f"{device.type}: no backend switches"
