"""The online linear probe: a linear classifier on the detached backbone feature of the first view,
trained at every step on the batch labels by its own SGD (not the method's optimiser).

Its accuracy is *prequential* (test-then-train): each batch is classified before the probe's update
on it, so every logged accuracy is measured on images (views) the probe has not been trained on yet
in this epoch; it costs no extra forward pass (solo-learn and lightly log the probe's accuracy on the
training batch and on the validation set; the frozen-backbone protocols of ``main_linear.py`` stay
the reference numbers). Under DDP the gradients, the loss and the counts are summed in one
all-reduce, so every rank keeps the same probe and the step equals one process on the whole batch.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from contrast import distributed as cd


class OnlineProbe:
    """``num_classes``-way linear probe; its weights are created (zeros) at the first batch, when
    the feature width is known. ``lr``, ``momentum``: its SGD (constant lr, no weight decay)."""

    def __init__(self, num_classes: int, lr: float = 0.1, momentum: float = 0.9) -> None:
        if num_classes < 2:
            raise ValueError(f"--online-probe needs a training set with >= 2 classes, this one has {num_classes}")
        self.num_classes, self.lr, self.momentum = num_classes, lr, momentum
        self.weight: Optional[torch.Tensor] = None
        self.bias: Optional[torch.Tensor] = None
        self.optimizer: Optional[torch.optim.SGD] = None

    def _build(self, dim: int, device: torch.device) -> None:
        self.weight = torch.zeros(self.num_classes, dim, device=device, requires_grad=True)
        self.bias = torch.zeros(self.num_classes, device=device, requires_grad=True)
        self.optimizer = torch.optim.SGD([self.weight, self.bias], lr=self.lr, momentum=self.momentum)

    def step(self, feature: torch.Tensor, label: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Classify the (B, D) ``feature`` (detached here), then one SGD step on its (B,) ``label``;
        returns ``probe/acc`` (%, before the step, over all ranks) and ``probe/loss`` as device tensors."""
        x = feature.detach().float().flatten(1)
        if self.weight is None:
            self._build(x.shape[1], x.device)
        with torch.autocast(device_type=x.device.type, enabled=False), torch.enable_grad():
            logits = F.linear(x, self.weight, self.bias)
            loss = F.cross_entropy(logits, label)
            gw, gb = torch.autograd.grad(loss, [self.weight, self.bias])
        correct = (logits.detach().argmax(dim=1) == label).sum().float()
        count = torch.full((), float(label.numel()), device=x.device)   # a fill, not a host copy: no sync
        packed = torch.cat([gw.flatten(), gb, torch.stack([loss.detach(), correct, count])])
        world = cd.get_world_size()
        if world > 1:
            cd.all_reduce_sum(packed)
        n_w = gw.numel()
        self.weight.grad = packed[:n_w].view_as(gw) / world
        self.bias.grad = packed[n_w:n_w + gb.numel()] / world
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, correct_sum, count = packed[-3], packed[-2], packed[-1]
        return {"probe/acc": 100.0 * correct_sum / count, "probe/loss": loss_sum / world}

    def state_dict(self) -> dict:
        if self.weight is None:
            return {}
        # copies: the live tensors keep changing after the state is taken
        return {"weight": self.weight.detach().cpu().clone(), "bias": self.bias.detach().cpu().clone(),
                "optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        if not state:
            return
        weight = state["weight"]
        if weight.shape[0] != self.num_classes:
            raise ValueError(f"the checkpoint's online probe has {weight.shape[0]} classes, this run's data "
                             f"{self.num_classes}")
        self._build(weight.shape[1], device)
        with torch.no_grad():
            self.weight.copy_(weight)
            self.bias.copy_(state["bias"])
        self.optimizer.load_state_dict(state["optimizer"])
