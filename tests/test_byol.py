"""BYOL: loss and gradients against a slow reference, the target's cosine EMA schedule, the network,
2 gloo ranks x B/2 == 1 process x B, and the command line (pretraining, then kNN and linear)."""
import math
import os

import pytest
import torch
from torch import nn

from contrast import distributed as cd
from contrast.config import BackboneConfig, MethodConfig
from contrast.models import build_method
from contrast.models.byol import BYOL
from contrast.models.losses import byol_loss
from tests.dist_utils import assert_same_training, run_distributed, train_like_ddp

DTYPE = torch.float64


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


# ------------------------------------------------------------------------------ loss
def _byol_reference(p1, p2, z1, z2):
    """sum over both view pairs of ||p / |p| - z / |z|||^2, per sample, with Python loops."""
    total = 0
    for b in range(p1.shape[0]):
        for p, z in ((p1[b], z2[b].detach()), (p2[b], z1[b].detach())):
            p_norm = torch.sqrt(sum(p[i] * p[i] for i in range(p.shape[0])))
            z_norm = torch.sqrt(sum(z[i] * z[i] for i in range(z.shape[0])))
            total = total + sum((p[i] / p_norm - z[i] / z_norm) ** 2 for i in range(p.shape[0]))
    return total / p1.shape[0]


def test_byol_loss_and_gradients_match_reference():
    p1, p2 = _rand(4, 5, seed=1).requires_grad_(), (3 * _rand(4, 5, seed=2)).requires_grad_()
    z1, z2 = _rand(4, 5, seed=3).requires_grad_(), _rand(4, 5, seed=4).requires_grad_()
    got = byol_loss(p1, p2, z1, z2)
    ref = _byol_reference(p1, p2, z1, z2)
    assert got.dtype == torch.float32 and 0 <= got <= 8
    assert torch.allclose(got.double(), ref, atol=1e-5)
    for g, r in zip(torch.autograd.grad(got, [p1, p2]), torch.autograd.grad(ref, [p1, p2])):
        assert torch.allclose(g.double(), r, atol=1e-5) and r.abs().sum() > 0
    assert torch.autograd.grad(byol_loss(p1, p2, z1, z2), [z1, z2], allow_unused=True) == (None, None)
    assert byol_loss(z1, z2, 2 * z2, 3 * z1) < 1e-6   # aligned directions: no loss, whatever the norms


# ------------------------------------------------------------------------------ network and EMA
def _encoder():
    """BN-free. No bias: the projector's batch norm would cancel its gradient, leaving float noise."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6, bias=False))


def test_network_shapes_and_defaults():
    cfg = MethodConfig(name="BYOL", backbone=BackboneConfig("resnet18", "small"), mlp_head=True, feature_dim=256,
                       head_hidden_dim=4096, momentum=0.996)
    method = build_method(cfg, num_instances=10)
    for mlp, dims in ((method.head, (512, 4096, 256)), (method.predictor, (256, 4096, 256))):
        assert [type(m) for m in mlp] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
        assert (mlp[0].in_features, mlp[0].out_features, mlp[3].out_features) == dims
        assert mlp[0].bias is not None and mlp[3].bias is None   # the reference code's output layer has no bias
    assert method.recipe.sync_batchnorm and BYOL.views.count == 2 and BYOL.recipe.aug == "BYOL"
    assert not any(p.requires_grad for p in method.target_encoder.parameters())
    assert not any(k.startswith("target_encoder.predictor") for k in method.state_dict())
    with pytest.raises(ValueError, match="--no-mlp-head"):
        build_method(MethodConfig(name="BYOL", mlp_head=False), 10)


def test_cosine_momentum_schedule_and_ema_update():
    method = BYOL(_encoder(), 6, feature_dim=4, hidden_dim=8, base_momentum=0.9)
    total = 7
    method.on_train_start(total, steps_per_epoch=7)
    for k in range(total):
        expected = 1 - (1 - 0.9) * (math.cos(math.pi * k / total) + 1) / 2
        assert method.target_encoder.momentum_at(k) == pytest.approx(expected, abs=1e-12)
    assert method.target_encoder.momentum_at(0) == pytest.approx(0.9) and method.target_encoder.momentum_at(total) == pytest.approx(1.0)

    online = dict(method.backbone.named_parameters()) | {"h" + n: p for n, p in method.head.named_parameters()}
    target = dict(method.target_encoder.backbone.named_parameters()) | \
        {"h" + n: p for n, p in method.target_encoder.head.named_parameters()}
    assert all(torch.equal(online[n], target[n]) for n in online)   # the target starts as a copy
    before = {n: p.detach().clone() for n, p in target.items()}
    with torch.no_grad():
        for i, p in enumerate(online.values()):
            p.add_(0.5 + i)
    method.on_train_step_end(3, lr=0.1)
    tau = 1 - 0.1 * (math.cos(math.pi * 3 / total) + 1) / 2
    for n, p in target.items():
        assert torch.allclose(p, tau * before[n] + (1 - tau) * online[n], atol=1e-6), n


def test_target_outputs_are_constants():
    """Only the online network gets gradients; the target changes only through the EMA."""
    method = BYOL(_encoder(), 6, feature_dim=4, hidden_dim=8)
    views = [_rand(4, 3, 4, 4, seed=s).float() for s in (1, 2)]
    method(views, torch.arange(4))["loss"].backward()
    assert all(p.grad is None for p in method.target_encoder.parameters())
    online = [(n, p) for n, p in method.named_parameters() if not n.startswith("target_encoder")]
    assert all(p.grad is not None for _, p in online) and all(p.grad.abs().sum() > 0 for _, p in online
                                                              if p.ndim > 1)
    # the method's loss is byol_loss of online predictions against target projections of the other view
    with torch.no_grad():
        p = [method.predictor(method.head(method.backbone(v))) for v in views]
        z = [method.target_encoder(v) for v in views]
        ref = _byol_reference(*[t.double() for t in p + z])
        assert torch.allclose(method(views, torch.arange(4))["loss"].double(), ref, atol=1e-5)


# ------------------------------------------------------------------------------ 2 ranks x B/2 == 1 x B
def _train(rank, world):
    torch.manual_seed(0)
    method = cd.convert_sync_batchnorm(BYOL(_encoder(), 6, feature_dim=4, hidden_dim=8, base_momentum=0.9),
                                       torch.device("cpu"))
    method.on_train_start(total_steps=4, steps_per_epoch=2)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    views = [[_rand(8, 3, 4, 4, seed=100 + 2 * step + i).float() for i in range(2)] for step in range(2)]
    record = train_like_ddp(method, opt, views, rank, world)
    record["trainable"] = sorted(n for n, p in method.named_parameters() if p.requires_grad)
    return record


def _worker(rank, world, out_dir):
    torch.save(_train(rank, world), os.path.join(out_dir, f"{rank}.pt"))


def test_two_ranks_match_one_process():
    """Global batch norm in the projector and predictor, EMA target (online weights and target BN
    statistics after 2 steps)."""
    ref = _train(0, 1)
    for got in run_distributed(_worker, 2):
        assert_same_training(got, ref, zero_grads=("head.0.bias", "predictor.0.bias"))   # biases feeding BN
        # the global batch norm swapped in on 2 ranks keeps the target frozen (DDP would stop on it)
        assert got["trainable"] == ref["trainable"] and not any("target" in n for n in got["trainable"])
    assert any(k.startswith("target_encoder.head.1.running") for k in ref["state"])
    initial = BYOL(_encoder(), 6, feature_dim=4, hidden_dim=8).state_dict()
    assert not torch.allclose(ref["state"]["target_encoder.backbone.1.weight"],
                              initial["target_encoder.backbone.1.weight"])


# ------------------------------------------------------------------------------ command line
def test_pretrain_then_knn_and_linear(pretrained_run):
    """main_knn.py and main_linear.py on the run of test_cli_pretrain.py's cell, and the recipe it recorded."""
    ckpt, _ = pretrained_run("BYOL").evaluated()
    assert ckpt.config["contrast_momentum"] == 0.996 and ckpt.config["aug"] == "BYOL"
    assert ckpt.config["mlp_head"] is True and ckpt.config["mlp_hidden_dim"] == 64
    assert ckpt.config["feature_dim"] == 16   # given on the command line, over BYOL's 256
    assert any(k.startswith("target_encoder.") for k in ckpt.model)
