"""VICReg: loss and gradients against a slow reference (variance and covariance in loops), the
network, 2 gloo ranks x B/2 == 1 process x B (variance and covariance over the gathered global
batch, gradients after DDP's average) and the command line; its auto-resume is a cell of tests/test_resume.py."""
import os

import pytest
import torch
from torch import nn

from contrast import distributed as cd
from contrast.config import BackboneConfig, MethodConfig
from contrast.models import build_method
from contrast.models.losses import vicreg_loss
from contrast.models.vicreg import VICReg
from contrast.optim import build_optimizer
from tests.dist_utils import assert_same_training, run_distributed, train_like_ddp

DTYPE = torch.float64
OPTIONS = {"vicreg_sim_coeff": 25.0, "vicreg_std_coeff": 25.0, "vicreg_cov_coeff": 1.0}


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


# ------------------------------------------------------------------------------ loss
def _vicreg_reference(z1, z2, sim, std, cov, eps=1e-4):
    """The paper's three terms with Python loops (unbiased variance and covariance over the N rows)."""
    n, d = z1.shape
    inv = sum((z1[b, j] - z2[b, j]) ** 2 for b in range(n) for j in range(d)) / (n * d)
    var_term, cov_term = 0, 0
    for z in (z1, z2):
        mean = [sum(z[b, j] for b in range(n)) / n for j in range(d)]
        c = [[sum((z[b, i] - mean[i]) * (z[b, j] - mean[j]) for b in range(n)) / (n - 1) for j in range(d)]
             for i in range(d)]
        var_term = var_term + sum(torch.relu(1 - torch.sqrt(c[j][j] + eps)) for j in range(d)) / d / 2
        cov_term = cov_term + sum(c[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
    return sim * inv + std * var_term + cov * cov_term, inv, var_term, cov_term


def test_loss_and_gradients_match_reference():
    # columns of std < 1 and > 1, so the hinge is active for some and not for others
    scale = torch.tensor([0.3, 2.0, 0.5, 1.5, 0.1], dtype=DTYPE)
    z1 = (_rand(7, 5, seed=1) * scale).requires_grad_()
    z2 = (_rand(7, 5, seed=2) * scale + 0.5 * z1.detach()).requires_grad_()
    got = vicreg_loss(z1, z2, z1, z2, 2.0, 3.0, 0.7)
    ref = _vicreg_reference(z1, z2, 2.0, 3.0, 0.7)
    for g, r in zip(got, ref):
        assert g.dtype == torch.float32 and torch.allclose(g.double(), r, atol=1e-5)
    assert ref[2] > 0 and ref[3] > 0
    for g, r in zip(torch.autograd.grad(got[0], [z1, z2]), torch.autograd.grad(ref[0], [z1, z2])):
        assert r.abs().sum() > 0 and torch.allclose(g.double(), r, atol=1e-5)
    # invariance on the local rows only, variance and covariance on the global ones
    local = vicreg_loss(z1[:3], z2[:3], z1, z2, 1.0, 1.0, 1.0)
    assert torch.allclose(local[1].double(), ((z1[:3] - z2[:3]) ** 2).mean()) and torch.allclose(local[2], got[2])


# ------------------------------------------------------------------------------ network
def _encoder():
    """BN-free, no bias (the projector's batch norm would cancel its gradient, leaving float noise)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6, bias=False))


def test_network_and_checks():
    cfg = MethodConfig(name="VICReg", backbone=BackboneConfig("resnet18", "small"), mlp_head=True, feature_dim=64,
                       head_hidden_dim=32, options=OPTIONS)
    method = build_method(cfg, num_instances=10)
    assert [type(m) for m in method.head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    linears = [m for m in method.head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 32), (32, 32), (32, 64)]
    assert [m.bias is not None for m in linears] == [True, True, False]   # main_vicreg.py lines 228, 231
    assert VICReg.recipe.sync_batchnorm and VICReg.recipe.aug == "BYOL" and method.coeffs == (25.0, 25.0, 1.0)
    with pytest.raises(ValueError, match="--no-mlp-head"):
        build_method(MethodConfig(name="VICReg", mlp_head=False, options=OPTIONS), 10)
    with pytest.raises(ValueError, match="--vicreg-cov-coeff"):
        build_method(MethodConfig(name="VICReg", mlp_head=True, options={**OPTIONS, "vicreg_cov_coeff": -1.0}), 10)
    views = [_rand(5, 3, 4, 4, seed=s).float() for s in (1, 2)]
    small = VICReg(_encoder(), 6, feature_dim=4, hidden_dim=8, sim_coeff=2.0, std_coeff=3.0, cov_coeff=0.5)
    with torch.no_grad():
        z = [small.head(small.backbone(v)).double() for v in views]
        out = small(views, torch.arange(5))
    assert torch.allclose(out["loss"].double(), _vicreg_reference(z[0], z[1], 2.0, 3.0, 0.5)[0], atol=1e-4)


# ------------------------------------------------------------------------------ 2 ranks x B/2 == 1 x B
def _gather_without_grad_for_others(x):
    gathered = cd.all_gather_no_grad(x).clone()
    b = x.shape[0]
    gathered[cd.get_rank() * b:(cd.get_rank() + 1) * b] = x
    return gathered


def _train(rank, world):
    torch.manual_seed(0)
    method = cd.convert_sync_batchnorm(VICReg(_encoder(), 6, feature_dim=4, hidden_dim=8), torch.device("cpu"))
    opt = build_optimizer(method.param_groups(0.5, 1e-4), "lars", 0.5, 0.9, 1e-4)
    views = [[_rand(8, 3, 4, 4, seed=100 + 2 * step + i).float() for i in range(2)] for step in range(2)]
    return train_like_ddp(method, opt, views, rank, world)


def _worker(rank, world, out_dir):
    results = {"exact": _train(rank, world)}
    cd.all_gather_with_grad = _gather_without_grad_for_others   # this spawned process only
    results["no-grad-gather"] = _train(rank, world)
    torch.save(results, os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.slow
def test_two_ranks_match_one_process():
    """The DDP average of the 2 ranks' gradients equals the one-process gradient on the whole batch
    (loss, every gradient incl. those through the global variance and covariance and the global batch
    norm, LARS steps, BN statistics); a gather that drops the other ranks' gradient is detected."""
    ref = _train(0, 1)
    for got in run_distributed(_worker, 2):
        assert_same_training(got["exact"], ref, zero_grads=("head.0.bias", "head.3.bias"))   # biases feeding BN
        bad = got["no-grad-gather"]
        assert torch.allclose(bad["loss"][0], ref["loss"][0], atol=1e-5)
        assert any(not torch.allclose(bad["grads"][0][n], g, atol=1e-5, rtol=1e-4) for n, g in ref["grads"][0].items())
    assert ref["out"][0]["variance"] > 0 and ref["out"][0]["covariance"] > 0


# ------------------------------------------------------------------------------ command line
@pytest.mark.slow
def test_pretrain_then_knn_and_linear(pretrained_run):
    """main_knn.py and main_linear.py on the run of test_cli_pretrain.py's cell, and the recipe it recorded."""
    ckpt, _ = pretrained_run("VICReg").evaluated()
    assert ckpt.config["aug"] == "BYOL" and ckpt.config["vicreg_std_coeff"] == 25.0
    assert ckpt.config["mlp_hidden_dim"] == 64 and ckpt.config["feature_dim"] == 16 and "head.6.weight" in ckpt.model
