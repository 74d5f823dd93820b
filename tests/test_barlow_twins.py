"""Barlow Twins: loss and gradients against a slow reference (batch norm and cross-correlation in
loops), the network and its optimiser groups, 2 gloo ranks x B/2 == 1 process x B (global batch
norm, summed cross-correlation, gradients after DDP's average) and the command line (pretraining, then
kNN and linear); its auto-resume is a cell of tests/test_resume.py."""
import os

import pytest
import torch
from torch import nn

from contrast import distributed as cd
from contrast.config import BackboneConfig, MethodConfig
from contrast.models import build_method
from contrast.models.barlow_twins import BarlowTwins
from contrast.models.losses import barlow_twins_loss
from contrast.optim import build_optimizer
from tests.dist_utils import assert_same_training, run_distributed, train_like_ddp

DTYPE = torch.float64


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


# ------------------------------------------------------------------------------ loss
def _batch_norm_reference(z, eps=1e-5):
    """Each column minus its mean over the rows, over sqrt(biased variance + eps), with loops."""
    n, d = z.shape
    cols = []
    for j in range(d):
        mean = sum(z[b, j] for b in range(n)) / n
        var = sum((z[b, j] - mean) ** 2 for b in range(n)) / n
        cols.append(torch.stack([(z[b, j] - mean) / torch.sqrt(var + eps) for b in range(n)]))
    return torch.stack(cols, dim=1)


def _barlow_reference(z1, z2, lambd, eps=1e-5):
    """sum_i (1 - C_ii)^2 + lambd sum_{i != j} C_ij^2, C_ij = sum_b n1[b, i] n2[b, j] / N (raw embeddings)."""
    n1, n2 = _batch_norm_reference(z1, eps), _batch_norm_reference(z2, eps)
    n, d = z1.shape
    total = 0
    for i in range(d):
        for j in range(d):
            c = sum(n1[b, i] * n2[b, j] for b in range(n)) / n
            total = total + ((1 - c) ** 2 if i == j else lambd * c ** 2)
    return total


def test_loss_and_gradients_match_reference():
    z1, z2 = _rand(6, 5, seed=1).requires_grad_(), (2 * _rand(6, 5, seed=2) + 1).requires_grad_()
    bn = nn.BatchNorm1d(5, affine=False).double()
    got = barlow_twins_loss(bn(z1), bn(z2), 0.3, batch_size=6)
    ref = _barlow_reference(z1, z2, 0.3)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), ref, atol=1e-5)
    for g, r in zip(torch.autograd.grad(got, [z1, z2]), torch.autograd.grad(ref, [z1, z2])):
        assert r.abs().sum() > 0 and torch.allclose(g.double(), r, atol=1e-5)
    # identical normalised views with uncorrelated columns: C = I, no loss
    q, _ = torch.linalg.qr(_rand(8, 4, seed=3) - _rand(8, 4, seed=3).mean(0))
    ident = q * 8 ** 0.5
    assert barlow_twins_loss(ident, ident, 0.5, 8) < 1e-5
    # the all-reduce sees the local (D, D) correlation divided by the global batch
    seen = []
    barlow_twins_loss(ident, ident, 0.5, 16, all_reduce=lambda c: seen.append(c) or 2 * c)
    assert torch.allclose(seen[0], torch.eye(4) / 2, atol=1e-5)


def test_method_loss_is_the_reference_on_its_projections():
    method = BarlowTwins(_encoder(), 6, feature_dim=4, hidden_dim=8, lambd=0.2)
    views = [_rand(5, 3, 4, 4, seed=s).float() for s in (1, 2)]
    with torch.no_grad():
        z = [method.head(method.backbone(v)).double() for v in views]
        got = method(views, torch.arange(5))["loss"]
    assert torch.allclose(got.double(), _barlow_reference(z[0], z[1], 0.2), atol=1e-4)


# ------------------------------------------------------------------------------ network and optimiser
def _encoder():
    """BN-free, no bias (the projector's batch norm would cancel its gradient, leaving float noise)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6, bias=False))


def test_network_and_optimiser_groups():
    cfg = MethodConfig(name="BarlowTwins", backbone=BackboneConfig("resnet18", "small"), mlp_head=True,
                       feature_dim=64, head_hidden_dim=32, total_batch_size=512,
                       options={"barlow_lambda": 0.0051, "barlow_lr_biases": 0.0048})
    method = build_method(cfg, num_instances=10)
    assert [type(m) for m in method.head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    linears = [m for m in method.head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 32), (32, 32), (32, 64)]
    assert all(m.bias is None for m in linears)   # main.py line 198, 201: bias=False everywhere
    assert not method.bn.affine and method.bn.num_features == 64
    assert BarlowTwins.recipe.sync_batchnorm and BarlowTwins.recipe.aug == "BYOL"

    opt = build_optimizer(method.param_groups(0.4, 1e-6), "lars", 0.4, 0.9, 1e-6)
    params = {id(p): (p.ndim, n) for n, p in method.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            ndim, name = params.pop(id(p))
            if ndim == 1:   # biases and BN: their own lr (0.0048 x 512 / 256), no decay, no LARS adaptation
                assert g["lr"] == pytest.approx(0.0096) and g["lars_exclude"] and g["weight_decay"] == 0, name
            else:
                assert g["lr"] == 0.4 and not g["lars_exclude"] and g["weight_decay"] == 1e-6, name
    assert not params
    with pytest.raises(ValueError, match="--no-mlp-head"):
        build_method(MethodConfig(name="BarlowTwins", mlp_head=False, options=cfg.options), 10)
    with pytest.raises(ValueError, match="--barlow-lambda"):
        build_method(MethodConfig(name="BarlowTwins", mlp_head=True,
                                  options={"barlow_lambda": -1.0, "barlow_lr_biases": 0.0048}), 10)


# ------------------------------------------------------------------------------ 2 ranks x B/2 == 1 x B
def _plain_all_reduce(x):
    """The official code's sum: torch.distributed.all_reduce outside autograd (gradient passes as is)."""
    out = cd.all_reduce_sum(x.detach().clone())
    return x + (out - x).detach()


def _train(rank, world, variant=""):
    torch.manual_seed(0)
    method = BarlowTwins(_encoder(), 6, feature_dim=4, hidden_dim=8, lambd=0.3, bias_lr=0.05)
    if variant != "per-rank-bn":
        method = cd.convert_sync_batchnorm(method, torch.device("cpu"))
    opt = build_optimizer(method.param_groups(0.5, 1e-4), "lars", 0.5, 0.9, 1e-4)
    views = [[_rand(8, 3, 4, 4, seed=100 + 2 * step + i).float() for i in range(2)] for step in range(2)]
    return train_like_ddp(method, opt, views, rank, world)


def _worker(rank, world, out_dir):
    results = {"exact": _train(rank, world), "per-rank-bn": _train(rank, world, "per-rank-bn")}
    from contrast.models import barlow_twins   # this spawned process only; the global BN keeps its sums
    barlow_twins.barlow_twins_loss = lambda *a: barlow_twins_loss(*a[:-1], _plain_all_reduce)
    results["official-all-reduce"] = _train(rank, world)
    torch.save(results, os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.slow
def test_two_ranks_match_one_process():
    """The DDP average of the 2 ranks' gradients equals the one-process gradient on the whole batch
    (losses, every gradient incl. those through the global batch statistics, LARS steps, BN running
    statistics). The official code's all_reduce (no gradient between ranks) gives exactly 1/2 of it;
    per-rank batch norm changes the loss: the comparison sees both."""
    ref = _train(0, 1)
    for got in run_distributed(_worker, 2):
        assert_same_training(got["exact"], ref)
        official = got["official-all-reduce"]
        assert torch.allclose(official["loss"][0], ref["loss"][0], atol=1e-5)
        assert all(torch.allclose(2 * official["grads"][0][n], g, atol=1e-5, rtol=1e-4)
                   for n, g in ref["grads"][0].items())
        assert not torch.allclose(got["per-rank-bn"]["loss"][0], ref["loss"][0], atol=1e-3)
    assert any(k.endswith("bn.running_var") for k in ref["state"])


# ------------------------------------------------------------------------------ command line
@pytest.mark.slow
def test_pretrain_then_knn_and_linear(pretrained_run):
    """main_knn.py and main_linear.py on the run of test_cli_pretrain.py's cell, and the recipe it recorded."""
    ckpt, _ = pretrained_run("BarlowTwins").evaluated()
    assert ckpt.config["aug"] == "BYOL" and ckpt.config["barlow_lambda"] == 0.0051
    assert ckpt.config["mlp_hidden_dim"] == 64 and ckpt.config["feature_dim"] == 16
    assert "bn.running_mean" in ckpt.model and "head.6.weight" in ckpt.model
