"""What the training loop drives at every step: the online probe and the collapse monitors.

The monitors read what the method's own forward pass computes, through forward hooks on the two
modules a :class:`~contrast.models.base.TrainModule` names (:meth:`feature_module`: the probe's
feature, the backbone of a method; :meth:`embedding_module`: the monitored embeddings). The hooks
keep the detached outputs of the steps that need them and nothing else: no extra forward pass, no
change of the method's gradients, buffers or random draws. The outputs of one forward are
concatenated in call order and cut into chunks of the batch size: chunk k is view k for every
method that encodes its views in order (one call per view, or equal-sized views concatenated).

The :class:`~contrast.trainer.Trainer` calls, at every step, :meth:`Monitors.before_forward`, then
:meth:`Monitors.after_step` after the optimiser step (:meth:`Monitors.discard` on a skipped one);
a disabled :class:`Monitors` (the default) does nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

import torch
from torch import nn

from contrast.models.base import TrainModule
from contrast.monitors.collapse import collapse_scalars, collapse_warning
from contrast.monitors.probe import OnlineProbe

#: ``checkpointer.extra`` key of the monitors' state.
EXTRA_KEY = "monitors"


@dataclass(frozen=True)
class MonitorOptions:
    """``--online-probe`` (``num_classes`` of the data, ``--online-probe-lr``), ``--monitor-collapse``
    every ``--monitor-collapse-freq`` steps."""

    online_probe: bool = False
    num_classes: int = 0
    probe_lr: float = 0.1
    collapse: bool = False
    collapse_freq: int = 100


class _Tap:
    """A forward hook keeping the detached outputs of ``module`` while :attr:`active`."""

    def __init__(self, module: nn.Module) -> None:
        self.active = False
        self.outputs: List[torch.Tensor] = []
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs, output) -> None:
        if self.active and torch.is_tensor(output):
            self.outputs.append(output.detach())

    def take(self) -> List[torch.Tensor]:
        out, self.outputs, self.active = self.outputs, [], False
        return out


def view_chunks(outputs: List[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
    """The outputs of one forward as (V, ``batch``, d): rows cut into chunks of ``batch`` (None if
    there is not one whole chunk)."""
    if not outputs:
        return None
    rows = torch.cat([o.flatten(1) for o in outputs if o.shape[1:] == outputs[0].shape[1:]])
    views = rows.shape[0] // batch
    return rows[:views * batch].view(views, batch, -1) if views else None


class Monitors:
    """The online probe and the collapse monitors of one training run (see the module docstring)."""

    def __init__(self, module: TrainModule, options: MonitorOptions = MonitorOptions()) -> None:
        self.options = options
        self.probe = OnlineProbe(options.num_classes, options.probe_lr) if options.online_probe else None
        self.feature_tap = self.embedding_tap = None
        if self.probe is not None:
            feature = module.feature_module()
            if feature is None:
                raise ValueError(f"--online-probe: {type(module).__name__} names no feature module")
            self.feature_tap = _Tap(feature)
        if options.collapse:
            if options.collapse_freq < 1:
                raise ValueError(f"--monitor-collapse-freq must be >= 1, got {options.collapse_freq}")
            embedding = module.embedding_module()
            if embedding is None:
                raise ValueError(f"--monitor-collapse: {type(module).__name__} names no embedding module")
            same = self.feature_tap is not None and embedding is module.feature_module()
            self.embedding_tap = self.feature_tap if same else _Tap(embedding)
        self._measure = False
        self._warned_epoch = -1
        self._last_step = -1

    def start(self, total_steps: int) -> None:
        """The run's length: the collapse monitors also measure its last step (a run shorter than
        ``collapse_freq`` steps gets a measurement at its end, not only at step 0)."""
        self._last_step = total_steps - 1

    @classmethod
    def off(cls) -> "Monitors":
        return cls(TrainModule(), MonitorOptions())

    def before_forward(self, step: int) -> None:
        """Arm the hooks this step needs (the probe: every step; collapse: every ``collapse_freq`` and the last)."""
        self._measure = self.embedding_tap is not None and (step % self.options.collapse_freq == 0
                                                            or step == self._last_step)
        if self.feature_tap is not None:
            self.feature_tap.active = True
        if self._measure:
            self.embedding_tap.active = True

    def discard(self) -> None:
        """Drop what this step captured (a skipped step)."""
        for tap in (self.feature_tap, self.embedding_tap):
            if tap is not None:
                tap.take()

    def after_step(self, label: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Train the probe on this step's features and ``label``, measure the embeddings on measuring
        steps; the scalars to log, as device tensors."""
        out: Dict[str, torch.Tensor] = {}
        batch = label.shape[0]
        feature = self.feature_tap.outputs if self.feature_tap is not None else []
        embedding = self.embedding_tap.outputs if self._measure else []
        if self.probe is not None:
            if not feature or feature[0].shape[0] < batch:
                raise RuntimeError("--online-probe: the method's feature module produced no output of the batch size "
                                   "in this step's forward")
            first = feature[0][:batch]   # view 0
            out.update(self.probe.step(first, label.to(first.device, non_blocking=True)))
        if self._measure:
            views = view_chunks(embedding, batch)
            if views is not None and batch >= 2:
                out.update(collapse_scalars(views))
        self.discard()
        self._measure = False
        return out

    def warning(self, scalars: Mapping[str, float], epoch: int) -> Optional[str]:
        """A warning line when the logged ``scalars`` look collapsed (once per epoch), else None."""
        why = collapse_warning(scalars)
        if why is None or epoch == self._warned_epoch:
            return None
        self._warned_epoch = epoch
        return f"the run looks collapsed: {why} (docs/monitoring.md)"

    def state_dict(self) -> dict:
        return {"probe": self.probe.state_dict()} if self.probe is not None else {}

    def load_state_dict(self, state: Optional[dict], device: torch.device) -> None:
        if self.probe is not None and state:
            self.probe.load_state_dict(state.get("probe", {}), device)

    def restore(self, extra: Mapping, device: torch.device) -> None:
        """The state :meth:`state_dict` left in a checkpoint's ``extra`` (a resume, a rollback)."""
        self.load_state_dict(extra.get(EXTRA_KEY), device)
