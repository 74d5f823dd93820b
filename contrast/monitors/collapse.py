"""Collapse measures of an embedding batch, and the rule of the collapse warning.

* ``collapse/std``: mean over dimensions of the per-dimension standard deviation (over the batch,
  population form) of the L2-normalised embeddings (SimSiam, Chen & He 2021, Sec. 4.1): 0 when
  every embedding is the same, ~ 1/sqrt(d) for embeddings spread over the sphere;
  ``collapse/std_rel`` is the same times sqrt(d) (healthy ~ 1).
* ``collapse/rank``: RankMe (Garrido et al., ICML 2023), ``exp(-sum_k p_k log p_k)`` with
  ``p_k = s_k / sum(s) + 1e-7`` over the singular values ``s`` of the (B, d) embedding matrix (not
  normalised, not centred, as in the paper); between 1 and min(B, d).
* ``collapse/align``: alignment (Wang & Isola, ICML 2020, alpha 2): mean ``||z_1 - z_2||^2`` over
  the two first views of each image (normalised; only when the batch has two views).
* ``collapse/uniform``: uniformity (t 2): ``log mean_{i<j} exp(-2 ||z_i - z_j||^2)`` over the
  first view (normalised); from -4 (spread out, as d grows) to 0 (all equal).
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional

import torch
import torch.nn.functional as F

#: std_rel below this: the normalised embeddings are (nearly) all the same direction.
STD_REL_MIN = 0.05
#: RankMe below this: the batch spans (nearly) one direction.
RANK_MIN = 1.5
#: PIC's ``diag/feat_mean_norm`` above this: the batch embeddings are one point (pic_diagnostics).
MEAN_NORM_MAX = 0.999
RANKME_EPS = 1e-7


def normalized_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std (population) of the rows of ``z`` (B, d) after L2 normalisation."""
    return F.normalize(z.float(), dim=1).std(dim=0, unbiased=False).mean()


def effective_rank(z: torch.Tensor, eps: float = RANKME_EPS) -> torch.Tensor:
    """RankMe of ``z`` (B, d): exp of the entropy of its normalised singular values."""
    s = torch.linalg.svdvals(z.float())
    p = s / s.sum().clamp_min(torch.finfo(s.dtype).tiny) + eps
    return torch.exp(-(p * torch.log(p)).sum())


def alignment(z1: torch.Tensor, z2: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Mean ``||z1_i - z2_i||^alpha`` of the normalised rows of two views (B, d)."""
    a, b = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    return (a - b).norm(dim=1).pow(alpha).mean()


def uniformity(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """``log mean_{i<j} exp(-t ||z_i - z_j||^2)`` of the normalised rows of ``z`` (B >= 2, d)."""
    sq = torch.pdist(F.normalize(z.float(), dim=1), p=2).pow(2)
    return sq.mul(-t).exp().mean().log()


@torch.no_grad()
def collapse_scalars(views: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The measures of a (V, B, d) batch of V views (0-dim tensors on its device; no host read).
    ``collapse/align`` needs V >= 2, the rest use view 0 (B >= 2)."""
    z = views[0]
    std = normalized_std(z)
    out = {"collapse/std": std, "collapse/std_rel": std * math.sqrt(z.shape[1]),
           "collapse/rank": effective_rank(z), "collapse/uniform": uniformity(z)}
    if views.shape[0] >= 2:
        out["collapse/align"] = alignment(views[0], views[1])
    return out


def collapse_warning(scalars: Mapping[str, float]) -> Optional[str]:
    """Why the logged ``scalars`` look collapsed (None when they do not): ``collapse/std_rel`` <
    :data:`STD_REL_MIN`, ``collapse/rank`` < :data:`RANK_MIN`, or PIC's ``diag/feat_mean_norm`` >
    :data:`MEAN_NORM_MAX`."""
    why = []
    std, rank, mean_norm = (scalars.get(k) for k in ("collapse/std_rel", "collapse/rank", "diag/feat_mean_norm"))
    if std is not None and std < STD_REL_MIN:
        why.append(f"std of the normalised embeddings x sqrt(d) {std:.3g} < {STD_REL_MIN}")
    if rank is not None and rank < RANK_MIN:
        why.append(f"effective rank {rank:.3g} < {RANK_MIN}")
    if mean_norm is not None and mean_norm > MEAN_NORM_MAX:
        why.append(f"PIC diag/feat_mean_norm {mean_norm:.4f} > {MEAN_NORM_MAX}")
    return "; ".join(why) or None
