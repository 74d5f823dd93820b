"""contrast.models.losses against slow references written with explicit loops (loss and gradients)."""
import math

import pytest
import torch
import torch.nn.functional as F

from contrast.models.losses import instdisc_loss, moco_loss, nt_xent_loss, pic_loss

DTYPE = torch.float64


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=DTYPE), dim=1)


def _ce(logits, target):
    """-logit[target] + log sum exp over a Python list of scalar tensors."""
    denom = sum(torch.exp(v) for v in logits)
    return -logits[target] + torch.log(denom)


def _dot(a, b):
    return sum(a[i] * b[i] for i in range(a.shape[0]))


def _norm(a):
    return torch.sqrt(_dot(a, a))


def _pic_reference(z_large, weight, index, tau, z_small):
    n = weight.shape[0]
    crops = [(z_large, weight)] + [(z, weight.detach()) for z in z_small]
    total = 0
    for z, w in crops:
        crop_loss = 0
        for b in range(z.shape[0]):
            logits = [_dot(z[b], w[j]) / _norm(w[j]) / tau for j in range(n)]
            crop_loss = crop_loss + _ce(logits, int(index[b]))
        total = total + crop_loss / z.shape[0]
    return total / len(crops)


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("num_small", [0, 2])
def test_pic_loss_matches_reference(num_small):
    b, n, d, tau = 3, 7, 5, 0.2
    z_large = _unit(b, d, 1).requires_grad_()
    z_small = [_unit(b, d, 10 + i).requires_grad_() for i in range(num_small)]
    weight = (torch.randn(n, d, generator=torch.Generator().manual_seed(2), dtype=DTYPE) * 0.5).requires_grad_()
    index = torch.tensor([4, 0, 4])
    inputs = [z_large, weight] + z_small
    got = pic_loss(z_large, weight, index, tau, z_small)
    ref = _pic_reference(z_large, weight, index, tau, z_small)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), ref, atol=1e-5)
    for g_got, g_ref in zip(_grads(got, inputs), _grads(ref, inputs)):
        assert torch.allclose(g_got.double(), g_ref, atol=1e-5)


def test_pic_loss_small_crops_do_not_train_weight():
    b, n, d = 4, 6, 3
    z_large, z_small = _unit(b, d, 1), [_unit(b, d, 2).requires_grad_()]
    weight = torch.randn(n, d, dtype=DTYPE, requires_grad=True)
    index = torch.arange(b)
    (g_all,) = _grads(pic_loss(z_large, weight, index, 0.2, z_small), [weight])
    (g_large,) = _grads(pic_loss(z_large, weight, index, 0.2) / 2, [weight])
    assert torch.allclose(g_all, g_large, atol=1e-6) and g_all.abs().sum() > 0
    (g_small,) = _grads(pic_loss(z_large, weight, index, 0.2, z_small), z_small)
    assert g_small.abs().sum() > 0  # the small crops themselves are trained


def _instdisc_reference(z, bank, index, neg_idx, tau):
    total = 0
    for b in range(z.shape[0]):
        logits = [_dot(z[b], bank[int(index[b])]) / tau]
        logits += [_dot(z[b], bank[int(j)]) / tau for j in neg_idx[b]]
        total = total + _ce(logits, 0)
    return total / z.shape[0]


@pytest.mark.parametrize("n", [50, 5])   # K * D below / above N: both code paths
def test_instdisc_loss_matches_reference(n):
    b, d, k, tau = 3, 4, 6, 0.07
    z = _unit(b, d, 1).requires_grad_()
    bank = _unit(n, d, 2)
    index = torch.tensor([1, 3, 0])
    neg_idx = torch.randint(n, (b, k), generator=torch.Generator().manual_seed(3))
    got = instdisc_loss(z, bank, index, neg_idx, tau)
    ref = _instdisc_reference(z, bank, index, neg_idx, tau)
    assert torch.allclose(got.double(), ref, atol=1e-5)
    assert torch.allclose(_grads(got, [z])[0].double(), _grads(ref, [z])[0], atol=1e-4)


def _moco_reference(q, k, queue, tau):
    total = 0
    for b in range(q.shape[0]):
        logits = [_dot(q[b], k[b].detach()) / tau] + [_dot(q[b], queue[j]) / tau for j in range(queue.shape[0])]
        total = total + _ce(logits, 0)
    return total / q.shape[0]


def test_moco_loss_matches_reference():
    q = _unit(4, 5, 1).requires_grad_()
    k = _unit(4, 5, 2).requires_grad_()
    queue = _unit(9, 5, 3)
    got = moco_loss(q, k, queue, 0.2)
    ref = _moco_reference(q, k, queue, 0.2)
    assert torch.allclose(got.double(), ref, atol=1e-5)
    assert torch.allclose(_grads(got, [q])[0].double(), _grads(ref, [q])[0], atol=1e-5)
    (g_k,) = torch.autograd.grad(moco_loss(q, k, queue, 0.2), [k], allow_unused=True)
    assert g_k is None  # keys are constants


def _nt_xent_reference(z1, z2, tau):
    """All 2G anchors of the global batch, each against the other 2G - 1 embeddings."""
    z = torch.cat([z1, z2])
    g = z1.shape[0]
    total = 0
    for a in range(2 * g):
        pos = a + g if a < g else a - g
        others = [c for c in range(2 * g) if c != a]
        logits = [_dot(z[a], z[c]) / tau for c in others]
        total = total + _ce(logits, others.index(pos))
    return total / (2 * g)


def test_nt_xent_single_process_matches_reference():
    z1, z2 = _unit(4, 3, 1).requires_grad_(), _unit(4, 3, 2).requires_grad_()
    got = nt_xent_loss(z1, z2, z1, z2, 0, 0.1)
    ref = _nt_xent_reference(z1, z2, 0.1)
    assert torch.allclose(got.double(), ref, atol=1e-5)
    for a, r in zip(_grads(got, [z1, z2]), _grads(ref, [z1, z2])):
        assert torch.allclose(a.double(), r, atol=1e-4)


def test_nt_xent_rank_slices_average_to_global_loss():
    """Anchors of each simulated rank with the right offset: the mean over ranks is the global loss."""
    g, ranks, tau = 6, 3, 0.5
    z1, z2 = _unit(g, 4, 1), _unit(g, 4, 2)
    b = g // ranks
    per_rank = [nt_xent_loss(z1[r * b:(r + 1) * b], z2[r * b:(r + 1) * b], z1, z2, r * b, tau)
                for r in range(ranks)]
    ref = _nt_xent_reference(z1, z2, tau)
    assert torch.allclose(sum(per_rank).double() / ranks, ref, atol=1e-5)
    wrong_offset = sum(nt_xent_loss(z1[r * b:(r + 1) * b], z2[r * b:(r + 1) * b], z1, z2, 0, tau)
                       for r in range(ranks)) / ranks
    assert not math.isclose(float(wrong_offset), float(ref), rel_tol=1e-3)
