"""MoCo v3: loss and gradients against a slow reference, the network of the official code, the
per-iteration cosine momentum, 2 gloo ranks x B/2 == 1 process x B (global keys, global batch norm,
momentum encoder), the checkpoint, and the command line (kNN and linear on the pretraining run); the generic tests'
cells (CLI, resume, device, host reads) and its 2-rank equality cover it under torchrun's mechanics."""
import math
import os

import pytest
import torch
from torch import nn

from contrast import distributed as cd
from contrast.config import BackboneConfig, MethodConfig
from contrast.models import build_method
from contrast.models.losses import mocov3_loss
from contrast.models.mocov3 import MoCov3
from contrast.option import resolve_pretrain
from tests.dist_utils import assert_same_training, run_distributed, train_like_ddp

DTYPE = torch.float64
LR = 0.1
FLAGS = ["--model", "MoCov3", "--optimizer", "lars", "--mlp-hidden-dim", "64"]


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def _unit(x):
    return x / x.norm(dim=1, keepdim=True)


# ------------------------------------------------------------------------------ loss
def _mocov3_reference(q1, q2, k1_all, k2_all, offset, tau):
    """2 tau x cross-entropy per local query against every key of the global batch, with Python loops."""
    total = 0
    b, g = q1.shape[0], k1_all.shape[0]
    for i in range(b):
        for q, keys in ((q1[i], k2_all.detach()), (q2[i], k1_all.detach())):
            q = q / torch.sqrt(sum(q[d] * q[d] for d in range(q.shape[0])))
            logits = []
            for j in range(g):
                k = keys[j] / torch.sqrt(sum(keys[j][d] * keys[j][d] for d in range(keys.shape[1])))
                logits.append(sum(q[d] * k[d] for d in range(q.shape[0])) / tau)
            log_z = torch.log(sum(torch.exp(v) for v in logits))
            total = total + 2 * tau * (log_z - logits[offset + i])
    return total / b


@pytest.mark.parametrize("offset,tau", [(0, 1.0), (3, 0.2)])
def test_loss_and_gradients_match_reference(offset, tau):
    b, g = 3, 3 + offset
    q1, q2 = _rand(b, 5, seed=1).requires_grad_(), (3 * _rand(b, 5, seed=2)).requires_grad_()
    k1, k2 = _rand(g, 5, seed=3).requires_grad_(), _rand(g, 5, seed=4).requires_grad_()
    got = mocov3_loss(q1, q2, k1, k2, offset, tau)
    ref = _mocov3_reference(q1, q2, k1, k2, offset, tau)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), ref, atol=1e-5)
    for gr, r in zip(torch.autograd.grad(got, [q1, q2]), torch.autograd.grad(ref, [q1, q2])):
        assert torch.allclose(gr.double(), r, atol=1e-5) and r.abs().sum() > 0
    assert torch.autograd.grad(mocov3_loss(q1, q2, k1, k2, offset, tau), [k1, k2], allow_unused=True) == (None, None)


def test_loss_is_scaled_by_two_tau():
    """Perfectly separated keys: the loss goes to 0; uniform logits: 2 tau log G per term."""
    eye = torch.eye(4)
    assert mocov3_loss(eye, eye, eye, eye, 0, 0.01) < 1e-6
    same = torch.ones(4, 3) / math.sqrt(3)
    assert mocov3_loss(same, same, same, same, 0, 0.5).item() == pytest.approx(2 * 2 * 0.5 * math.log(4), rel=1e-6)


# ------------------------------------------------------------------------------ network and momentum
def _encoder():
    """BN-free, no bias (the projector's batch norm would cancel its gradient)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6, bias=False))


def test_network_is_the_official_resnet_form():
    cfg = MethodConfig(name="MoCov3", backbone=BackboneConfig("resnet18", "small"), mlp_head=True, feature_dim=256,
                       head_hidden_dim=4096, momentum=0.99, temperature=1.0,
                       options={"mocov3_proj_layers": 2, "mocov3_pred_last_bn": False})
    method = build_method(cfg, num_instances=10)
    head, pred = method.head, method.predictor
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert [type(m) for m in pred] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[3].out_features) == (512, 4096, 256)
    assert (pred[0].in_features, pred[0].out_features, pred[3].out_features) == (256, 4096, 256)
    assert all(m.bias is None for m in (head[0], head[3], pred[0], pred[3]))
    assert head[1].affine and pred[1].affine and not head[4].affine
    assert MoCov3.recipe.sync_batchnorm and MoCov3.views.count == 2 and MoCov3.recipe.aug == "BYOL"
    assert not any(p.requires_grad for p in method.key_encoder.parameters())
    assert not any(k.startswith("key_encoder.predictor") for k in method.state_dict())
    with pytest.raises(ValueError, match="--no-mlp-head"):
        build_method(MethodConfig(name="MoCov3", mlp_head=False), 10)


def test_network_is_the_official_vit_form():
    """builder.py MoCo_ViT: a 3-layer projector and a predictor ending with a batch norm without affine,
    from the ViT recipe; both given back as flags on a ResNet."""
    _, cfg = resolve_pretrain("MoCov3", "--arch", "vit_pico", "--patch-size", "4", "--image-size", "32",
                              "--mlp-hidden-dim", "32", "--feature-dim", "16")
    method = build_method(cfg, num_instances=10)
    head, pred = method.head, method.predictor
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    assert [type(m) for m in pred] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)] == [(64, 32), (32, 32), (32, 16)]
    assert not head[7].affine and not pred[4].affine and head[1].affine
    assert not any(p.requires_grad for p in method.backbone.patch_embed.proj.parameters())   # --stop-grad-conv1
    _, cfg = resolve_pretrain("MoCov3", "--arch", "resnet18", "--mocov3-proj-layers", "3", "--mocov3-pred-last-bn")
    assert (cfg.option("mocov3_proj_layers"), cfg.option("mocov3_pred_last_bn")) == (3, True)
    _, cfg = resolve_pretrain("MoCov3", "--arch", "vit_pico", "--mocov3-proj-layers", "2")
    assert (cfg.option("mocov3_proj_layers"), cfg.option("mocov3_pred_last_bn")) == (2, True)


def test_momentum_follows_the_official_per_iteration_schedule():
    """The official code updates at the start of iteration k with m(k) = 1 - 0.5 (1 + cos(pi k / K)) (1 - m0),
    then computes keys; here the update after step k - 1 uses m(k): the keys of iteration k are the same."""
    method = MoCov3(_encoder(), 6, feature_dim=4, hidden_dim=8, base_momentum=0.9)
    total = 7
    method.on_train_start(total, steps_per_epoch=7)
    official = [1 - 0.5 * (1 + math.cos(math.pi * k / total)) * (1 - 0.9) for k in range(total + 1)]
    assert [method.key_encoder.momentum_at(k) for k in range(total + 1)] == pytest.approx(official, abs=1e-12)

    online = list(method.backbone.parameters()) + list(method.head.parameters())
    keys = list(method.key_encoder.backbone.parameters()) + list(method.key_encoder.head.parameters())
    assert all(torch.equal(a, b) for a, b in zip(online, keys))
    before = [p.detach().clone() for p in keys]
    with torch.no_grad():
        for i, p in enumerate(online):
            p.add_(0.5 + i)
    method.on_train_step_end(3, lr=0.1)   # after step 3: iteration 4's momentum
    for p, old, new in zip(keys, before, online):
        assert torch.allclose(p, official[4] * old + (1 - official[4]) * new, atol=1e-6)


def test_lars_excludes_what_the_official_lars_excludes():
    """moco/optimizer.py: decay and trust ratio only for tensors with ndim > 1 (no biases, no BN parameters)."""
    from contrast.optim import build_optimizer
    method = MoCov3(_encoder(), 6, feature_dim=4, hidden_dim=8)
    opt = build_optimizer(method.param_groups(0.1, 1e-6), "lars", 0.1, 0.9, 1e-6)
    trainable = [p for p in method.parameters() if p.requires_grad]
    for group in opt.param_groups:
        assert all((p.ndim > 1) != group["lars_exclude"] for p in group["params"])
        assert group["weight_decay"] == (0.0 if group["lars_exclude"] else 1e-6)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    assert any(p.ndim == 1 for p in trainable)


def test_method_loss_is_the_loss_of_its_modules():
    method = MoCov3(_encoder(), 6, feature_dim=4, hidden_dim=8, temperature=0.5)
    views = [_rand(4, 3, 4, 4, seed=s).float() for s in (1, 2)]
    loss = method(views, torch.arange(4))["loss"]
    loss.backward()
    assert all(p.grad is None for p in method.key_encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in method.named_parameters()
               if not n.startswith("key_encoder"))
    with torch.no_grad():
        q = [method.predictor(method.head(method.backbone(v))).double() for v in views]
        k = [method.key_encoder(v).double() for v in views]
    assert torch.allclose(loss.double(), _mocov3_reference(q[0], q[1], k[0], k[1], 0, 0.5), atol=1e-5)


# ------------------------------------------------------------------------------ 2 ranks x B/2 == 1 x B
def _train(rank, world):
    torch.manual_seed(0)
    method = cd.convert_sync_batchnorm(MoCov3(_encoder(), 6, feature_dim=4, hidden_dim=8, temperature=0.5,
                                              base_momentum=0.9), torch.device("cpu"))
    method.on_train_start(total_steps=4, steps_per_epoch=2)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=LR)
    views = [[_rand(8, 3, 4, 4, seed=100 + 2 * step + i).float() for i in range(2)] for step in range(2)]
    record = train_like_ddp(method, opt, views, rank, world)
    record["trainable"] = sorted(n for n, p in method.named_parameters() if p.requires_grad)
    return record


def _worker(rank, world, out_dir):
    torch.save(_train(rank, world), os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.slow
def test_two_ranks_match_one_process():
    """Keys of the global batch, global batch norm in projector, predictor and momentum encoder, and
    the momentum encoder's weights and BN statistics after 2 steps."""
    ref = _train(0, 1)
    for got in run_distributed(_worker, 2):
        assert_same_training(got, ref)
        assert got["trainable"] == ref["trainable"] and not any("key_encoder" in n for n in got["trainable"])
    assert any(k.startswith("key_encoder.head.4.running") for k in ref["state"])
    initial = MoCov3(_encoder(), 6, feature_dim=4, hidden_dim=8).state_dict()
    assert not torch.allclose(ref["state"]["key_encoder.backbone.1.weight"], initial["key_encoder.backbone.1.weight"])


def test_state_survives_a_checkpoint_round_trip(tmp_path):
    method = MoCov3(_encoder(), 6, feature_dim=4, hidden_dim=8)
    method.on_train_start(10, 5)
    views = [_rand(4, 3, 4, 4, seed=s).float() for s in (1, 2)]
    method(views, torch.arange(4))["loss"].backward()
    with torch.no_grad():
        for p in method.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    method.on_train_step_end(0, lr=0.1)
    torch.save(method.state_dict(), tmp_path / "m.pt")
    other = MoCov3(_encoder(), 6, feature_dim=4, hidden_dim=8)
    other.load_state_dict(torch.load(tmp_path / "m.pt"))
    assert all(torch.equal(a, b) for a, b in zip(method.state_dict().values(), other.state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(method.key_encoder.parameters(), method.head.parameters()))
    method.eval(), other.eval()
    assert torch.equal(method(views, torch.arange(4))["loss"], other(views, torch.arange(4))["loss"])


# ------------------------------------------------------------------------------ command line
def test_pretrain_then_knn_and_linear(pretrained_run):
    """main_knn.py and main_linear.py on the run of test_cli_pretrain.py's cell (its flags are FLAGS), and the
    recipe it recorded; the generic CLI, resume, device and host-read tests run MoCov3 through the same flags."""
    from tests.test_cli_pretrain import METHOD_FLAGS   # imported here: spawned ranks skip it
    assert METHOD_FLAGS["MoCov3"] == FLAGS
    ckpt, _ = pretrained_run("MoCov3").evaluated()
    assert ckpt.config["contrast_momentum"] == 0.99 and ckpt.config["aug"] == "BYOL"
    assert ckpt.config["contrast_temperature"] == 1.0 and ckpt.config["mlp_hidden_dim"] == 64
    assert any(k.startswith("key_encoder.") for k in ckpt.model)


@pytest.mark.parametrize("epochs,lr,wd,m", [(None, 0.6, 1e-6, 0.99), (300, 0.3, 1e-6, 0.99), (1000, 0.3, 1.5e-6, 0.996)])
def test_script_runs_config_md_settings(epochs, lr, wd, m, tmp_path):
    """scripts/MoCov3.sh: the recipe at 100 epochs, CONFIG.md's presets at 300 and 1000, then main_lincls.py's
    linear evaluation."""
    from contrast.option import parse_pretrain_args
    from tests.test_scripts import run_script, stub
    args = () if epochs is None else (epochs,)
    (_, pre, argv), (_, lin, lin_argv) = run_script("MoCov3", stub.__wrapped__(tmp_path), tmp_path, *args)
    assert (pre, lin) == ("main_pretrain.py", "main_linear.py")
    a = parse_pretrain_args(argv)
    assert (a.model, a.epochs, a.base_learning_rate, a.weight_decay, a.contrast_momentum, a.optimizer) == \
        ("MoCov3", epochs or 100, lr, wd, m, "lars")
    assert lin_argv[lin_argv.index("--learning-rate") + 1] == "0.1" and lin_argv[lin_argv.index("--epochs") + 1] == "90"
