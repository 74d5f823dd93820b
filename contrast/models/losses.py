"""Pure loss functions of the methods.

No process group and no state: every tensor a loss needs is an argument, and the
caller gathers across ranks where needed (:func:`sinkhorn_knopp` takes the
cross-rank sum as a function argument). All losses are computed in fp32
(inputs are cast with ``.float()``) and are means over the anchors given.
Embeddings ``z``/``q``/``k`` of the contrastive losses are expected to be
L2-normalised already; :func:`byol_loss` normalises its inputs itself.
"""
from __future__ import annotations

from typing import Callable, Sequence

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


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetric normalised MSE of BYOL (Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020,
    Eq. 2 and its symmetrisation): ``||p1/|p1| - z2/|z2|||^2 + ||p2/|p2| - z1/|z1|||^2``, i.e.
    ``(2 - 2 cos(p1, z2)) + (2 - 2 cos(p2, z1))``, averaged over the batch. No negatives.

    Args:
        p1, p2: (B, D) online predictions of view 1 and view 2 (not normalised).
        z1, z2: (B, D) target projections of view 1 and view 2 (treated as constants).
    Returns:
        fp32 scalar in [0, 8].
    """
    def regression(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return 2.0 - 2.0 * (F.normalize(p.float(), dim=1) * F.normalize(z.detach().float(), dim=1)).sum(dim=1)

    return (regression(p1, z2) + regression(p2, z1)).mean()


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3,
                   all_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity) -> torch.Tensor:
    """SwAV's codes (Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster
    Assignments", NeurIPS 2020, Sec. 3.1 and its ``distributed_sinkhorn``): the equipartitioned
    soft assignment of the samples of the *global* batch to K prototypes.

    ``Q = exp(scores / eps).T`` (K x B_local) is scaled to sum 1, then ``iterations`` times its rows
    are scaled to sum 1/K each and its columns to 1/B each (B = the global number of samples);
    the result is multiplied by B so that every sample's code sums to 1. Row sums, the total and B
    are summed over ranks with ``all_reduce`` (``contrast.distributed.all_reduce_sum`` on several
    ranks; the identity in one process): 2 ranks holding B/2 samples each get the rows one process
    holding all B would.

    Args:
        scores: (B_local, K) prototype scores ``z . c_k`` (no gradient flows).
        epsilon: entropy regularisation eps.
        iterations: Sinkhorn iterations.
        all_reduce: in-place sum over ranks of a tensor, returning it.
    Returns:
        (B_local, K) fp32 codes; each row sums to 1.
    """
    q = torch.exp(scores.float() / epsilon).t()
    num_prototypes = q.shape[0]
    num_samples = all_reduce(q.new_tensor(float(q.shape[1])))
    q /= all_reduce(q.sum())
    for _ in range(iterations):
        q /= all_reduce(q.sum(dim=1, keepdim=True))
        q /= num_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= num_samples
    return (q * num_samples).t()


def swav_loss(scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
    """SwAV's swapped prediction loss (Caron et al., NeurIPS 2020, Eq. 1-2 and ``main_swav.py``).

    The first ``len(codes)`` crops are the crops used for assignment (SwAV: the two large crops).
    For each of them, its code ``q_i`` is predicted from every *other* crop v:
    ``l_i = sum_{v != i} -mean_b sum_k q_i[b, k] log softmax(scores_v[b] / T)_k``; the loss is
    ``mean_i l_i / (V - 1)`` with V crops.

    Args:
        scores: V tensors (B, K), ``z_v . c_k`` of each crop (with gradient).
        codes: (B, K) codes of the first ``len(codes)`` crops (constants, rows sum to 1).
        temperature: T.
    Returns:
        fp32 scalar.
    """
    num_crops = len(scores)
    if not 0 < len(codes) <= num_crops or num_crops < 2:
        raise ValueError(f"swav_loss needs >= 2 crops and 1..{num_crops} codes, got {num_crops} and {len(codes)}")
    log_p = [F.log_softmax(s.float() / temperature, dim=1) for s in scores]
    loss = scores[0].new_zeros((), dtype=torch.float32)
    for i, q in enumerate(codes):
        q = q.detach().float()
        subloss = sum(-(q * log_p[v]).sum(dim=1).mean() for v in range(num_crops) if v != i)
        loss = loss + subloss / (num_crops - 1)
    return loss / len(codes)


def dino_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], center: torch.Tensor,
              student_temperature: float, teacher_temperature: float) -> torch.Tensor:
    """DINO's cross-entropy between teacher and student (Caron et al., "Emerging Properties in
    Self-Supervised Vision Transformers", ICCV 2021, Eq. 1 and Alg. 1; ``DINOLoss`` in ``main_dino.py``).

    ``P_t = softmax((t - center) / T_t)`` (a constant) for each of the global crops the teacher saw,
    ``log P_s = log_softmax(s / T_s)`` for every crop; the loss is the mean over the pairs (i, v) with
    ``v != i`` of ``mean_b sum_k -P_t,i[b, k] log P_s,v[b, k]``: the teacher's crop i is never compared
    with the student's output of the same crop (the first ``len(teacher)`` student crops are the
    globals, in the same order).

    Args:
        student: V tensors (B, K), the student's outputs of every crop (globals first).
        teacher: G tensors (B, K), the teacher's outputs of the G global crops (G <= V).
        center: (1, K) or (K,) center subtracted from the teacher's outputs.
        student_temperature, teacher_temperature: T_s, T_t.
    Returns:
        fp32 scalar.
    """
    num_crops = len(student)
    if not 0 < len(teacher) <= num_crops or num_crops < 2:
        raise ValueError(f"dino_loss needs >= 2 student crops and 1..{num_crops} teacher crops, got {num_crops} "
                         f"and {len(teacher)}")
    log_p = [F.log_softmax(s.float() / student_temperature, dim=-1) for s in student]
    loss = student[0].new_zeros((), dtype=torch.float32)
    terms = 0
    for i, t in enumerate(teacher):
        q = F.softmax((t.detach().float() - center.float()) / teacher_temperature, dim=-1)
        for v in range(num_crops):
            if v != i:
                loss = loss + (-q * log_p[v]).sum(dim=-1).mean()
                terms += 1
    return loss / terms


def nnclr_loss(nn: Sequence[torch.Tensor], p: Sequence[torch.Tensor], nn_all: Sequence[torch.Tensor],
               p_all: Sequence[torch.Tensor], offset: int, temperature: float) -> torch.Tensor:
    """NNCLR's symmetric loss (Dwibedi et al., "With a Little Help from My Friends: Nearest-Neighbor
    Contrastive Learning of Visual Representations", ICCV 2021, Eq. 2 with the prediction head and the
    symmetric term of its Sec. 3.2 "Implementation details") for this rank's anchors.

    ``nn[a]`` is the nearest neighbour in the support set of view a's projection, ``p[b]`` the prediction
    of the other view b. For each ordered pair (a, b) of the two views, and sample i of the global batch
    of G (the local sample j is ``offset + j``):

    * Eq. 2: ``-log softmax_k(nn_a[i] . p_b[k] / tau)[i]`` (candidates: all G predictions of view b);
    * its symmetric term: ``-log softmax_k(nn_a[k] . p_b[i] / tau)[i]`` (candidates: all G neighbours).

    The loss is the mean of these four terms over the local anchors.

    Args:
        nn: 2 tensors (B, D), normalised neighbours of the local samples (constants: no gradient flows).
        p: 2 tensors (B, D), normalised local predictions (with gradient).
        nn_all: 2 tensors (G, D), ``nn`` gathered from all ranks in rank order (constants).
        p_all: 2 tensors (G, D), ``p`` gathered from all ranks in rank order with autograd
            (``contrast.distributed.all_gather_with_grad``); in one process ``p`` itself.
        offset: position of this rank's first sample in the global batch (rank x B).
        temperature: tau.
    Returns:
        fp32 scalar, mean over the 4B local anchor terms; its mean over ranks (as DDP averages the
        gradients) is the loss of the global batch.
    """
    if not (len(nn) == len(p) == len(nn_all) == len(p_all) == 2):
        raise ValueError("nnclr_loss takes exactly two views")
    target = torch.arange(p[0].shape[0], device=p[0].device) + offset
    loss = p[0].new_zeros((), dtype=torch.float32)
    for a, b in ((0, 1), (1, 0)):
        nn_a, nn_a_all = nn[a].detach().float(), nn_all[a].detach().float()
        loss = loss + F.cross_entropy(nn_a @ p_all[b].float().t() / temperature, target)
        loss = loss + F.cross_entropy(p[b].float() @ nn_a_all.t() / temperature, target)
    return loss / 4


def _off_diagonal(x: torch.Tensor) -> torch.Tensor:
    """The D(D-1) off-diagonal entries of a (D, D) matrix, as a view (the official codes' trick)."""
    d = x.shape[0]
    return x.flatten()[:-1].view(d - 1, d + 1)[:, 1:]


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float, batch_size: int,
                      all_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity) -> torch.Tensor:
    """Barlow Twins' redundancy-reduction loss (Zbontar et al., "Barlow Twins: Self-Supervised
    Learning via Redundancy Reduction", ICML 2021, Eq. 1-2; facebookresearch/barlowtwins main.py).

    ``C = sum over ranks (z1_r^T z2_r) / N`` is the cross-correlation of the batch-normalised
    embeddings of the global batch of N samples; the loss is
    ``sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2``.

    Args:
        z1, z2: (B_local, D) embeddings of the two views, each already normalised over the global
            batch (batch norm without affine).
        lambd: weight of the off-diagonal terms.
        batch_size: N, the global batch.
        all_reduce: sum over ranks of the (D, D) local correlation, with autograd
            (``contrast.distributed.all_reduce_sum_with_grad``; the identity in one process).
    Returns:
        fp32 scalar.
    """
    c = all_reduce(z1.float().t() @ z2.float() / batch_size)
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = _off_diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, z1_all: torch.Tensor, z2_all: torch.Tensor,
                sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0,
                eps: float = 1e-4) -> Sequence[torch.Tensor]:
    """VICReg (Bardes, Ponce, LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
    Self-Supervised Learning", ICLR 2022, Eq. 1-6; facebookresearch/vicreg main_vicreg.py).

    * invariance: ``mean((z1 - z2)^2)`` over this rank's samples (DDP's average makes it the global mean);
    * variance, per view over the N gathered samples: ``mean_j relu(1 - sqrt(Var_j + eps))``
      (unbiased variance), averaged over the two views;
    * covariance, per view: ``sum_{i != j} Cov_ij^2 / D`` with ``Cov = Zc^T Zc / (N - 1)`` of the centred
      gathered embeddings, summed over the two views.

    Args:
        z1, z2: (B_local, D) this rank's embeddings of the two views.
        z1_all, z2_all: (N, D) the embeddings of all ranks (gathered with autograd).
        sim_coeff, std_coeff, cov_coeff: the weights of the three terms.
        eps: added to the variance under the square root.
    Returns:
        fp32 scalars ``(loss, invariance, variance, covariance)``; the last three unweighted.
    """
    invariance = F.mse_loss(z1.float(), z2.float())
    variance = z1.new_zeros((), dtype=torch.float32)
    covariance = z1.new_zeros((), dtype=torch.float32)
    for z in (z1_all.float(), z2_all.float()):
        n, d = z.shape
        z = z - z.mean(dim=0)
        std = torch.sqrt(z.var(dim=0) + eps)
        variance = variance + F.relu(1 - std).mean() / 2
        cov = z.t() @ z / (n - 1)
        covariance = covariance + _off_diagonal(cov).pow(2).sum() / d
    loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    return loss, invariance, variance, covariance


def mocov3_loss(q1: torch.Tensor, q2: torch.Tensor, k1_all: torch.Tensor, k2_all: torch.Tensor, offset: int,
                temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE of MoCo v3 (Chen, Xie, He, "An Empirical Study of Training Self-Supervised
    Vision Transformers", ICCV 2021, Alg. 1; ``contrastive_loss`` of facebookresearch/moco-v3
    ``moco/builder.py``): ``ctr(q1, k2) + ctr(q2, k1)`` with
    ``ctr(q, k) = 2 tau * CE(q/|q| @ (k_all/|k_all|).T / tau, offset + i)``: the positive of local query i is key
    ``offset + i`` of the global batch, every other key of the global batch is a negative.

    Args:
        q1, q2: (B, D) local queries of view 1 and view 2 (with gradient; normalised here).
        k1_all, k2_all: (G, D) keys (normalised here) of view 1 and view 2 of the global batch, in rank
            order (treated as constants); in one process G = B.
        offset: position of this rank's first sample in the global batch (rank x B).
        temperature: tau.
    Returns:
        fp32 scalar: the mean over the B local queries of each term; averaging it over ranks (as DDP
        does with the gradients) gives the loss over the global batch.
    """
    labels = torch.arange(q1.shape[0], device=q1.device) + offset

    def ctr(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        logits = F.normalize(q.float(), dim=1) @ F.normalize(k.detach().float(), dim=1).t() / temperature
        return F.cross_entropy(logits, labels) * (2 * temperature)

    return ctr(q1, k2_all) + ctr(q2, k1_all)


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetric negative cosine similarity with stop-gradient of SimSiam (Chen, He, "Exploring Simple
    Siamese Representation Learning", CVPR 2021, Eq. 1-3 and Alg. 1; ``main_simsiam.py``):
    ``-(mean_b cos(p1, z2) + mean_b cos(p2, z1)) / 2``, the projections ``z`` treated as constants.
    ``cos`` is ``nn.CosineSimilarity``'s ``x.y / max(|x| |y|, 1e-8)``, as the official code.

    Args:
        p1, p2: (B, D) predictions of view 1 and view 2 (with gradient).
        z1, z2: (B, D) projections of view 1 and view 2 (stop-gradient here).
    Returns:
        fp32 scalar in [-1, 1].
    """
    def cos(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(p.float(), z.detach().float(), dim=1, eps=1e-8).mean()

    return -0.5 * (cos(p1, z2) + cos(p2, z1))
