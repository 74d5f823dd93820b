"""The optional Weights & Biases logger (``--wandb``; ``pip install 'contrast[wandb]'``).

A sink of :class:`contrast.logger.TensorBoard`: every scalar the run writes to TensorBoard goes to
W&B too, each family (``train/``, ``epoch/``, ``knn/``) against its own x-axis (``train_step``,
``epoch_step``, ``knn_step``: W&B's own step must only grow, and the families count different things).
The run's config is the versioned ``config.json`` dump. ``WANDB_MODE=offline`` writes the run under
``<output-dir>/wandb`` for a later ``wandb sync``.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, Optional


class WandbSink:
    """One W&B run; ``module``: the imported ``wandb`` (tests inject a fake one)."""

    def __init__(self, module: Any, project: str, name: str, config: Dict[str, Any], output_dir: str) -> None:
        self.wandb = module
        self.run = module.init(project=project, name=name, config=config, dir=output_dir)
        self.families: Dict[str, str] = {}

    @classmethod
    def start(cls, project: str, name: str, config: Dict[str, Any], output_dir: str,
              module: Optional[Any] = None) -> "WandbSink":
        """Import ``wandb`` (unless ``module`` is given) and start a run; ``ImportError`` in one line."""
        if module is None:
            try:
                module = importlib.import_module("wandb")
            except ImportError:
                raise ImportError("--wandb needs the wandb package: pip install 'contrast[wandb]' (or pip install "
                                  "wandb)") from None
        return cls(module, project, name, config, output_dir)

    def log(self, values: Dict[str, float], step: int, prefix: str = "") -> None:
        axis = (prefix.rstrip("/") or "train") + "_step"
        if prefix not in self.families:
            self.families[prefix] = axis
            self.run.define_metric(axis)
            self.run.define_metric(f"{prefix}*", step_metric=axis)
        self.run.log({axis: step, **{prefix + k: float(v) for k, v in values.items()}})

    def close(self) -> None:
        self.run.finish()
