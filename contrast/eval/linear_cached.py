"""Linear evaluation on cached frozen features: encode once, train the classifier for many cheap epochs.

The standard protocol (MoCo, PIC) re-encodes augmented images every epoch, which
costs one backbone forward per image per epoch. With a frozen backbone the
features can instead be computed once, optionally for a fixed number ``K`` of
augmented copies of the training set (``NULL`` augmentation: random resized crop
+ flip), and the linear classifier trained on them: per epoch each training image
contributes one of its ``K`` copies, drawn at random. This approximates the
protocol at a fraction of its cost (the copies are fixed, not fresh each epoch).

Features are standardised with the training mean and variance (a
``BatchNorm1d(affine=False)`` frozen in eval mode, as MAE's linear probe does),
so one learning rate suits every method. SGD with momentum, cosine schedule per
iteration, cross-entropy.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from contrast.eval.knn import topk_accuracy
from contrast.logger import Progress


def build_probe(train_feats: torch.Tensor, num_classes: int, generator: torch.Generator) -> nn.Sequential:
    """``BatchNorm1d(D, affine=False)`` holding the statistics of ``train_feats`` (..., D), then ``Linear(D, C)``
    initialised N(0, 0.01) with zero bias (as MoCo's linear classifier)."""
    flat = train_feats.reshape(-1, train_feats.shape[-1]).float()
    dim = flat.shape[1]
    norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
    norm.running_mean.copy_(flat.mean(dim=0))
    norm.running_var.copy_(flat.var(dim=0, unbiased=False))
    linear = nn.Linear(dim, num_classes)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.01)
        linear.bias.zero_()
    return nn.Sequential(norm, linear).to(train_feats.device).eval()


def train_linear_cached(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                        val_labels: torch.Tensor, num_classes: int, epochs: int = 100, lr: float = 0.1,
                        batch_size: int = 256, momentum: float = 0.9, weight_decay: float = 0.0,
                        seed: int = 0, log: Optional[Callable[[int, float], None]] = None,
                        progress: str = "") -> Tuple[nn.Sequential, Dict[str, float]]:
    """Train a linear classifier on cached features and evaluate it.

    Args:
        train_feats: (N, D) features, or (K, N, D) for K augmented copies of each image.
        train_labels: (N,) int labels.
        val_feats: (M, D) validation features; val_labels: (M,).
        num_classes: C.
        epochs, lr, batch_size, momentum, weight_decay: SGD settings; the learning rate
            follows a cosine from ``lr`` to 0 over all iterations.
        seed: seeds the initialisation, the shuffling and the choice of copies.
        log: optional ``log(epoch, loss)`` called after each epoch.
        progress: a name to show the progress over the epochs under (empty: silent).

    Returns:
        ``(probe, {"top1", "top5", "train_loss"})``: the trained ``BatchNorm1d + Linear``
        (eval mode) and the validation accuracy (%) with the last epoch's mean loss.
    """
    feats = train_feats if train_feats.dim() == 3 else train_feats.unsqueeze(0)
    copies, n, _ = feats.shape
    if train_labels.shape[0] != n:
        raise ValueError(f"{n} training features per copy but {train_labels.shape[0]} labels")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"--linear-epochs and --linear-batch-size must be >= 1, got {epochs} and {batch_size}")
    device = feats.device
    labels = train_labels.to(device).long()
    gen = torch.Generator().manual_seed(seed)
    probe = build_probe(feats, num_classes, gen)
    params = list(probe[1].parameters())
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(n / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    loss_sum = torch.zeros((), device=device)
    bar = Progress(progress, total=epochs, unit="epoch", enabled=bool(progress))
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen).to(device)
        copy = torch.randint(copies, (n,), generator=gen).to(device)
        loss_sum.zero_()
        for batch in torch.split(order, batch_size):
            loss = F.cross_entropy(probe(feats[copy[batch], batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * batch.numel()
        if log is not None:
            log(epoch, loss_sum.item() / n)
        bar.update()
    bar.close()
    with torch.no_grad():
        acc = topk_accuracy(probe(val_feats.to(device).float()), val_labels)
    acc["train_loss"] = loss_sum.item() / n
    return probe, acc
