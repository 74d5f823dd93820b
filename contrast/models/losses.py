"""Pure loss functions of the four methods.

No process group and no state: every tensor a loss needs is an argument, and the
caller gathers across ranks where needed. All losses are computed in fp32
(inputs are cast with ``.float()``) and are means over the anchors given.
Embeddings ``z``/``q``/``k`` are expected to be L2-normalised already.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def pic_loss(z_large: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, temperature: float,
             z_small: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """Parametric instance classification loss (Cao et al., "Parametric Instance
    Classification for Unsupervised Visual Feature Learning", NeurIPS 2020).

    Cosine softmax over all N instances: ``logits = z @ normalize(W).T / tau``,
    cross-entropy with target ``index``. With multi-crop, the small crops are
    classified against a *detached* W (W learns from the large crop only), and
    the loss is the average over all 1 + len(z_small) crops.

    Args:
        z_large: (B, D) normalised embeddings of the large crop (or of any view).
        weight: (N, D) classifier table W (rows need not be normalised).
        index: (B,) int64 instance ids in [0, N).
        temperature: tau.
        z_small: sequence of (B, D) normalised embeddings of small crops.
    Returns:
        fp32 scalar.
    """
    w = F.normalize(weight.float(), dim=1)
    loss = F.cross_entropy(z_large.float() @ w.t() / temperature, index)
    if len(z_small) == 0:
        return loss
    w_detached = w.detach()
    for z in z_small:
        loss = loss + F.cross_entropy(z.float() @ w_detached.t() / temperature, index)
    return loss / (1 + len(z_small))


def instdisc_loss(z: torch.Tensor, bank: torch.Tensor, index: torch.Tensor, neg_idx: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """Non-parametric instance discrimination with a memory bank (Wu et al.,
    "Unsupervised Feature Learning via Non-Parametric Instance Discrimination",
    CVPR 2018), in the softmax form of the PIC release: logits over the positive
    ``bank[index]`` and K sampled negatives ``bank[neg_idx]``, divided by tau,
    cross-entropy with target 0.

    Args:
        z: (B, D) normalised embeddings.
        bank: (N, D) memory bank (no gradient flows into it).
        index: (B,) int64 ids of the positives.
        neg_idx: (B, K) int64 ids of the negatives of each sample.
        temperature: tau.
    Returns:
        fp32 scalar.

    When K * D exceeds N the negatives are read from the full similarity matrix
    ``z @ bank.T`` (B x N) instead of materialising ``bank[neg_idx]`` (B x K x D);
    both give the same logits.
    """
    z = z.float()
    bank = bank.detach().float()
    pos = (z * bank[index]).sum(dim=1, keepdim=True)
    if neg_idx.shape[1] * bank.shape[1] > bank.shape[0]:
        neg = torch.gather(z @ bank.t(), 1, neg_idx)
    else:
        neg = torch.einsum("bd,bkd->bk", z, bank[neg_idx])
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, logits.new_zeros(logits.shape[0], dtype=torch.long))


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of MoCo (He et al., "Momentum Contrast for Unsupervised Visual
    Representation Learning", CVPR 2020): logits ``[q.k+, q.queue] / tau``,
    cross-entropy with target 0.

    Args:
        q: (B, D) normalised queries (with gradient).
        k: (B, D) normalised positive keys (treated as constants).
        queue: (K, D) normalised negative keys (treated as constants).
        temperature: tau.
    Returns:
        fp32 scalar.
    """
    q = q.float()
    pos = (q * k.detach().float()).sum(dim=1, keepdim=True)
    neg = q @ queue.detach().float().t()
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, logits.new_zeros(logits.shape[0], dtype=torch.long))


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, z1_all: torch.Tensor, z2_all: torch.Tensor,
                 offset: int, temperature: float) -> torch.Tensor:
    """NT-Xent of SimCLR (Chen et al., "A Simple Framework for Contrastive Learning
    of Visual Representations", ICML 2020) for this rank's anchors.

    Anchors are the 2B local embeddings; candidates are the 2G embeddings of the
    global batch (G = B x world size), ``[z1_all; z2_all]``. The local sample i is
    sample ``offset + i`` of the global batch, so for an anchor from view 1 the
    positive is ``z2_all[offset + i]`` and the anchor itself (``z1_all[offset + i]``)
    is masked out of the denominator; symmetrically for view 2.

    Args:
        z1, z2: (B, D) normalised local embeddings of the two views.
        z1_all, z2_all: (G, D) the same gathered from all ranks in rank order
            (with gradient, see ``contrast.distributed.all_gather_with_grad``);
            in one process simply ``z1`` and ``z2``.
        offset: position of this rank's first sample in the global batch
            (rank x B).
        temperature: tau.
    Returns:
        fp32 scalar, mean over the 2B local anchors. Averaging it over ranks
        (as DDP does with the gradients) gives the loss over the global batch.
    """
    b, g = z1.shape[0], z1_all.shape[0]
    anchors = torch.cat([z1, z2]).float()
    candidates = torch.cat([z1_all, z2_all]).float()
    logits = anchors @ candidates.t() / temperature
    local = torch.arange(b, device=z1.device) + offset
    self_idx = torch.cat([local, local + g])
    pos_idx = torch.cat([local + g, local])
    rows = torch.arange(2 * b, device=z1.device)
    logits = logits.index_put((rows, self_idx), logits.new_tensor(float("-inf")))
    return F.cross_entropy(logits, pos_idx)
