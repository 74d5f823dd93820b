"""SimSiam: loss and gradients against a slow reference, the network of the official code, the
predictor's fixed lr, 2 gloo ranks x B/2 == 1 process x B with batch norm over the global batch (and
!= without it), the checkpoint, and the command line (pretraining, kNN, linear, resume, torchrun)."""
import math
import os

import pytest
import torch
from torch import nn

from contrast import distributed as cd
from contrast.config import BackboneConfig, MethodConfig
from contrast.models import build_method
from contrast.models.losses import simsiam_loss
from contrast.models.simsiam import SimSiam
from contrast.optim import build_optimizer, build_scheduler
from tests.dist_utils import assert_same_training, run_distributed, train_like_ddp

DTYPE = torch.float64
FLAGS = ["--model", "SimSiam", "--mlp-hidden-dim", "64", "--simsiam-pred-dim", "8"]


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


# ------------------------------------------------------------------------------ loss
def _simsiam_reference(p1, p2, z1, z2):
    """-(1/2) (mean cos(p1, z2) + mean cos(p2, z1)), z constant, with Python loops."""
    total = 0
    b, d = p1.shape
    for i in range(b):
        for p, z in ((p1[i], z2[i].detach()), (p2[i], z1[i].detach())):
            dot = sum(p[j] * z[j] for j in range(d))
            norms = torch.sqrt(sum(p[j] * p[j] for j in range(d))) * torch.sqrt(sum(z[j] * z[j] for j in range(d)))
            total = total - 0.5 * dot / norms
    return total / b


def test_loss_and_gradients_match_reference():
    p1, p2 = _rand(4, 5, seed=1).requires_grad_(), (3 * _rand(4, 5, seed=2)).requires_grad_()
    z1, z2 = _rand(4, 5, seed=3).requires_grad_(), _rand(4, 5, seed=4).requires_grad_()
    got = simsiam_loss(p1, p2, z1, z2)
    ref = _simsiam_reference(p1, p2, z1, z2)
    assert got.dtype == torch.float32 and -1 <= got <= 1 and torch.allclose(got.double(), ref, atol=1e-6)
    for g, r in zip(torch.autograd.grad(got, [p1, p2]), torch.autograd.grad(ref, [p1, p2])):
        assert torch.allclose(g.double(), r, atol=1e-6) and r.abs().sum() > 0
    assert torch.autograd.grad(simsiam_loss(p1, p2, z1, z2), [z1, z2], allow_unused=True) == (None, None)
    assert simsiam_loss(z2, z1, 2 * z1, 3 * z2).item() == pytest.approx(-1.0)   # aligned: -1 whatever the norms


# ------------------------------------------------------------------------------ network and optimiser groups
def _encoder():
    """BN-free, no bias (the projector's batch norm would cancel its gradient)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6, bias=False))


def _config(**options):
    return MethodConfig(name="SimSiam", backbone=BackboneConfig("resnet18", "small"), mlp_head=True, feature_dim=2048,
                        head_hidden_dim=2048, options={"simsiam_pred_dim": 512, "simsiam_fix_pred_lr": True,
                                                       **options})


def test_network_is_the_official_one():
    method = build_method(_config(), num_instances=10)
    head, pred = method.head, method.predictor
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    assert [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)] == \
        [(512, 2048), (2048, 2048), (2048, 2048)]
    assert all(m.bias is None for m in head if isinstance(m, nn.Linear))   # the official last bias is frozen
    assert head[1].affine and head[4].affine and not head[7].affine
    assert [type(m) for m in pred] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (pred[0].in_features, pred[0].out_features, pred[3].out_features) == (2048, 512, 2048)
    assert pred[0].bias is None and pred[3].bias is not None
    assert SimSiam.recipe.sync_batchnorm and SimSiam.views.count == 2 and SimSiam.recipe.aug == "MoCov2"
    with pytest.raises(ValueError, match="--no-mlp-head"):
        SimSiam.check_config(MethodConfig(name="SimSiam", mlp_head=False, options={"simsiam_pred_dim": 8}))
    with pytest.raises(ValueError, match="--simsiam-pred-dim must be > 0"):
        SimSiam.check_config(_config(simsiam_pred_dim=0))


@pytest.mark.parametrize("fixed", [True, False])
def test_predictor_keeps_the_initial_lr(fixed):
    """main_simsiam.py adjust_learning_rate: the encoder follows the cosine, the ``fix_lr`` predictor group stays at
    init_lr; both groups decay their weights. Without the flag: one group on the cosine."""
    method = SimSiam(_encoder(), 6, feature_dim=4, hidden_dim=8, pred_dim=2, fix_pred_lr=fixed)
    groups = method.param_groups(0.4, 1e-4)
    pred = {id(p) for p in method.predictor.parameters()}
    assert sorted(len(g["params"]) for g in groups) == (
        sorted([len(pred), sum(1 for _ in method.parameters()) - len(pred)]) if fixed else [len(list(method.parameters()))])
    opt = build_optimizer(groups, "sgd", 0.4, 0.9, 1e-4)
    sched = build_scheduler(opt, "cosine", epochs=4, iters_per_epoch=5, eta_min=0.0)
    for step in range(20):
        cosine = 0.4 * 0.5 * (1 + math.cos(math.pi * step / 20))
        for g in opt.param_groups:
            is_pred = {id(p) for p in g["params"]} <= pred
            assert g["lr"] == pytest.approx(0.4 if fixed and is_pred else cosine, abs=1e-9), (step, is_pred)
            assert g["weight_decay"] == 1e-4
        opt.step()
        sched.step()


def test_method_loss_is_the_loss_of_its_modules():
    method = SimSiam(_encoder(), 6, feature_dim=4, hidden_dim=8, pred_dim=2)
    views = [_rand(4, 3, 4, 4, seed=s).float() for s in (1, 2)]
    loss = method(views, torch.arange(4))["loss"]
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
    with torch.no_grad():
        z = [method.head(method.backbone(v)) for v in views]
        p = [method.predictor(x) for x in z]
    assert torch.allclose(loss.double(), _simsiam_reference(*[t.double() for t in p + z]), atol=1e-6)


# ------------------------------------------------------------------------------ 2 ranks x B/2 == 1 x B
def _train(rank, world, sync=True):
    torch.manual_seed(0)
    method = SimSiam(_encoder(), 6, feature_dim=4, hidden_dim=8, pred_dim=3)
    if sync:
        method = cd.convert_sync_batchnorm(method, torch.device("cpu"))
    opt = torch.optim.SGD(method.param_groups(0.1, 0.0), lr=0.1)
    views = [[_rand(8, 3, 4, 4, seed=100 + 2 * step + i).float() for i in range(2)] for step in range(2)]
    return train_like_ddp(method, opt, views, rank, world)


def _worker(rank, world, out_dir):
    torch.save({"sync": _train(rank, world), "per_rank": _train(rank, world, sync=False)},
               os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.slow
def test_two_ranks_match_one_process_with_global_batch_norm():
    """Loss, every gradient and every BN statistic of 2 ranks x B/2 equal 1 process x B with batch norm over the
    global batch; per-rank batch norm gives another loss (the test sees the difference)."""
    ref = _train(0, 1)
    results = run_distributed(_worker, 2)
    for got in results:
        assert_same_training(got["sync"], ref)
    assert any(k.startswith("head.7.running_var") for k in ref["state"])
    per_rank = results[0]["per_rank"]
    assert not torch.allclose(per_rank["loss"][0], ref["loss"][0], atol=1e-4)
    assert not torch.allclose(per_rank["state"]["head.7.running_mean"], ref["state"]["head.7.running_mean"])


def test_state_survives_a_checkpoint_round_trip(tmp_path):
    method = SimSiam(_encoder(), 6, feature_dim=4, hidden_dim=8, pred_dim=2)
    views = [_rand(4, 3, 4, 4, seed=s).float() for s in (1, 2)]
    method(views, torch.arange(4))["loss"].backward()
    with torch.no_grad():
        for p in method.parameters():
            p.sub_(0.1 * p.grad)
    torch.save(method.state_dict(), tmp_path / "m.pt")
    other = SimSiam(_encoder(), 6, feature_dim=4, hidden_dim=8, pred_dim=2)
    other.load_state_dict(torch.load(tmp_path / "m.pt"))
    assert all(torch.equal(a, b) for a, b in zip(method.state_dict().values(), other.state_dict().values()))
    method.eval(), other.eval()
    assert torch.equal(method(views, torch.arange(4))["loss"], other(views, torch.arange(4))["loss"])


# ------------------------------------------------------------------------------ command line
def test_pretrain_then_knn_and_linear(pretrained_run):
    """main_knn.py and main_linear.py on the run of test_cli_pretrain.py's cell (its flags are FLAGS), and the
    recipe it recorded; the generic CLI, resume, device and host-read tests run SimSiam through the same flags."""
    from tests.test_cli_pretrain import METHOD_FLAGS   # imported here: spawned ranks skip it
    assert METHOD_FLAGS["SimSiam"] == FLAGS
    ckpt, _ = pretrained_run("SimSiam").evaluated()
    assert ckpt.config["aug"] == "MoCov2" and ckpt.config["optimizer"] == "sgd"
    assert ckpt.config["simsiam_fix_pred_lr"] is True and ckpt.config["simsiam_pred_dim"] == 8
    assert ckpt.model["predictor.0.weight"].shape == (8, 16)


def test_script_runs_the_recipe(tmp_path):
    """scripts/SimSiam.sh: the recipe at 100 epochs, then main_lincls.py's linear evaluation settings."""
    from contrast.option import parse_pretrain_args
    from tests.test_scripts import run_script, stub
    (_, pre, argv), (_, lin, lin_argv) = run_script("SimSiam", stub.__wrapped__(tmp_path), tmp_path)
    assert (pre, lin) == ("main_pretrain.py", "main_linear.py")
    a = parse_pretrain_args(argv)
    assert (a.model, a.epochs, a.base_learning_rate, a.optimizer, a.simsiam_fix_pred_lr) == \
        ("SimSiam", 100, 0.05, "sgd", True)
    assert lin_argv[lin_argv.index("--learning-rate") + 1] == "0.1" and lin_argv[lin_argv.index("--epochs") + 1] == "90"
