"""NNCLR: loss and gradients against a slow reference, the nearest neighbour from the support set as the
positive, the support set's FIFO update, the network and recipe checks, 2 gloo ranks x B/2 == 1 process x B
(loss, gradients, support set), state round trip that continues bit-exact, and kNN and linear on the pretraining
run; the generic tests' cells (CLI, resume, device, host reads) run NNCLR's command line."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contrast import distributed as cd
from contrast.config import BackboneConfig, MethodConfig
from contrast.models import build_method
from contrast.models.losses import nnclr_loss
from contrast.models.nnclr import NNCLR, nearest_neighbours
from tests.dist_utils import assert_same_training, run_distributed, train_like_ddp

DTYPE = torch.float64


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def _unit(*shape, seed):
    return F.normalize(_rand(*shape, seed=seed), dim=-1)


# ------------------------------------------------------------------------------ loss
def _dot(u, v):
    return sum(u[i] * v[i] for i in range(u.shape[0]))


def _info_nce(anchor, candidates, positive, tau):
    """-log(exp(a . c_pos / tau) / sum_k exp(a . c_k / tau)), one anchor, with a Python loop."""
    logits = [_dot(anchor, candidates[k]) / tau for k in range(candidates.shape[0])]
    return -(logits[positive] - torch.log(sum(torch.exp(x) for x in logits)))


def _nnclr_reference(nn_global, p_global, rows, tau):
    """Paper Eq. 2 with predictions (nn_a[i] against the predictions p_b[k] of the global batch) and its
    symmetric term (p_b[i] against the neighbours nn_a[k]), both view orders, mean over the local rows."""
    total, terms = 0, 0
    for a, b in ((0, 1), (1, 0)):
        for i in rows:
            total = total + _info_nce(nn_global[a][i].detach(), p_global[b], i, tau)
            total = total + _info_nce(p_global[b][i], nn_global[a].detach(), i, tau)
            terms += 2
    return total / terms


def test_loss_and_gradients_match_reference_one_process():
    tau = 0.3
    nn_ = [_unit(5, 4, seed=1).requires_grad_(), _unit(5, 4, seed=2).requires_grad_()]
    p = [_unit(5, 4, seed=3).requires_grad_(), _unit(5, 4, seed=4).requires_grad_()]
    got = nnclr_loss(nn_, p, nn_, p, 0, tau)
    ref = _nnclr_reference(nn_, p, range(5), tau)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), ref, atol=1e-5)
    for g, r in zip(torch.autograd.grad(got, p), torch.autograd.grad(ref, p)):
        assert r.abs().sum() > 0 and torch.allclose(g.double(), r, atol=1e-5)
    # the neighbours are constants: no gradient flows into the support set
    assert torch.autograd.grad(nnclr_loss(nn_, p, nn_, p, 0, tau), nn_, allow_unused=True) == (None, None)


def test_loss_of_one_rank_and_its_gradient_into_every_rank_rows():
    """A rank's anchors (rows 3..5 of a global batch of 6) against the global candidates; the two ranks'
    mean is the loss of the whole batch."""
    tau = 0.2
    nn_ = [_unit(6, 4, seed=5), _unit(6, 4, seed=6)]
    p = [_unit(6, 4, seed=7).requires_grad_(), _unit(6, 4, seed=8).requires_grad_()]
    halves = []
    for rank in (0, 1):
        rows = slice(3 * rank, 3 * rank + 3)
        got = nnclr_loss([x[rows] for x in nn_], [x[rows] for x in p], nn_, p, 3 * rank, tau)
        ref = _nnclr_reference(nn_, p, range(3 * rank, 3 * rank + 3), tau)
        assert torch.allclose(got.double(), ref, atol=1e-5)
        for g, r in zip(torch.autograd.grad(got, p), torch.autograd.grad(ref, p)):
            assert r[3 - 3 * rank:6 - 3 * rank].abs().sum() > 0   # the other rank's rows get gradient too
            assert torch.allclose(g.double(), r, atol=1e-5)
        halves.append(got)
    assert torch.allclose((halves[0] + halves[1]) / 2, nnclr_loss(nn_, p, nn_, p, 0, tau), atol=1e-6)


def test_loss_refuses_other_view_counts():
    x = [_unit(2, 3, seed=1)] * 3
    with pytest.raises(ValueError, match="two views"):
        nnclr_loss(x, x, x, x, 0, 0.1)


def test_nearest_neighbour_is_the_most_similar_support_row():
    z, support = _unit(7, 5, seed=1), _unit(11, 5, seed=2)
    got = nearest_neighbours(z, support)
    for i in range(7):
        sims = [_dot(z[i], support[k]) / (_dot(z[i], z[i]) * _dot(support[k], support[k])).sqrt() for k in range(11)]
        best = max(range(11), key=lambda k: sims[k])
        assert torch.equal(got[i], support[best].float())


# ------------------------------------------------------------------------------ the method
def _encoder():
    """BN-free. No bias: the projector's batch norm would cancel its gradient, leaving float noise."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6, bias=False))


def _method(support_size=10, temperature=0.5, seed=0):
    torch.manual_seed(0)
    return NNCLR(_encoder(), 6, feature_dim=4, hidden_dim=8, pred_hidden_dim=8, support_size=support_size,
                 temperature=temperature, seed=seed)


def _views(batch, seed):
    return [_rand(batch, 3, 4, 4, seed=seed + i).float() for i in range(2)]


def test_neighbour_from_the_support_set_replaces_the_positive():
    method = _method()
    views = _views(4, 10)
    out = method(views, torch.arange(4))
    with torch.no_grad():
        y = [method.head(method.backbone(v)) for v in views]
        z = [F.normalize(t.double(), dim=1) for t in y]
        p = [F.normalize(method.predictor(t).double(), dim=1) for t in y]
        support = method.support.features.double()
        # the neighbour of each sample by a loop over the support rows (cosine)
        nn_ = [torch.stack([support[max(range(len(support)), key=lambda k: float(_dot(zi[i], support[k])))]
                            for i in range(4)]) for zi in z]
        ref = _nnclr_reference(nn_, p, range(4), 0.5)
    assert torch.allclose(out["loss"].double(), ref, atol=1e-5)
    assert torch.allclose(out["nn_sim"].double(), (z[0] * nn_[0]).sum(1).mean(), atol=1e-5)
    # with the other view as the positive (SimCLR's pairing) the loss would differ
    assert not torch.allclose(out["loss"].double(), _nnclr_reference(z, p, range(4), 0.5), atol=1e-3)


def test_support_set_takes_the_first_views_projections_after_the_step_fifo():
    method = _method(support_size=10)
    initial = method.support.features.clone()
    assert torch.allclose(initial.norm(dim=1), torch.ones(10))   # random unit rows (solo-learn)
    written = []
    for step in range(3):
        views = _views(4, 20 + 2 * step)
        before = method.support.features.clone()
        method(views, torch.arange(4))           # a forward alone (a skipped step) writes nothing
        assert torch.equal(method.support.features, before)
        with torch.no_grad():
            written.append(F.normalize(method.head(method.backbone(views[0])), dim=1))
        method(views, torch.arange(4))           # the step taken: the support set is written after it
        method.on_train_step_end(step, 0.1)
    rows = torch.cat(written)                    # 12 rows into 10: rows 10, 11 wrapped to 0, 1
    feats = method.support.features
    assert int(method.support.ptr) == 2
    assert torch.allclose(feats[2:10], rows[2:10], atol=1e-6) and torch.allclose(feats[:2], rows[10:], atol=1e-6)
    method.on_train_step_end(3, 0.1)             # nothing pending: nothing written
    assert int(method.support.ptr) == 2


def test_only_online_projector_and_predictor_learn():
    method = _method()
    method(_views(4, 30), torch.arange(4))["loss"].backward()
    named = dict(method.named_parameters())
    assert all(p.grad is not None for p in named.values())
    assert all(named[n].grad.abs().sum() > 0 for n in named if named[n].ndim > 1)
    assert not any(b.requires_grad for b in method.support.buffers())


def test_network_shapes_recipe_and_checks():
    cfg = MethodConfig(name="NNCLR", backbone=BackboneConfig("resnet18", "small"), mlp_head=True, feature_dim=256,
                       head_hidden_dim=2048, temperature=0.1, total_batch_size=4096,
                       options={"nnclr_support_size": 98304, "nnclr_pred_hidden_dim": 4096})
    method = build_method(cfg, num_instances=10)
    head = method.head
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    assert [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)] == \
        [(512, 2048), (2048, 2048), (2048, 256)]
    pred = method.predictor
    assert [type(m) for m in pred] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (pred[0].in_features, pred[0].out_features, pred[3].out_features) == (256, 4096, 256)
    assert method.support.features.shape == (98304, 256) and method.temperature == 0.1
    assert NNCLR.recipe.sync_batchnorm and NNCLR.views.count == 2 and NNCLR.recipe.aug == "BYOL"
    for bad, message in ((dict(mlp_head=False), "--no-mlp-head"),
                         (dict(options={"nnclr_support_size": 2048, "nnclr_pred_hidden_dim": 4096}),
                          "--nnclr-support-size 2048 is smaller than the total batch 4096"),
                         (dict(options={"nnclr_support_size": 98304, "nnclr_pred_hidden_dim": 0}),
                          "--nnclr-pred-hidden-dim")):
        with pytest.raises(ValueError, match=message):
            NNCLR.check_config(MethodConfig(**{**cfg.__dict__, **bad}))


def test_recipe_from_the_command_line():
    from contrast.option import resolve_pretrain
    args, cfg = resolve_pretrain("NNCLR", "--batch-size", "64", world_size=64)
    assert cfg.peak_lr == pytest.approx(4.8) and cfg.options["nnclr_support_size"] == 98304
    _, cfg = resolve_pretrain("NNCLR", "--batch-size", "64", "--nnclr-support-size", "1024", world_size=64)
    with pytest.raises(ValueError, match="--nnclr-support-size 1024 is smaller than the total batch 4096"):
        build_method(cfg, num_instances=10)
    with pytest.raises(SystemExit):   # refused when the command line is parsed
        resolve_pretrain("NNCLR", "--batch-size", "64", "--nnclr-support-size", "16")


def test_state_round_trip_continues_bit_exact():
    """Support set and pointer are buffers: a copy loaded from the state dict trains on identically."""
    a = _method(support_size=10)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    for step in range(2):
        opt_a.zero_grad()
        a(_views(4, 40 + 2 * step), torch.arange(4))["loss"].backward()
        opt_a.step()
        a.on_train_step_end(step, 0.1)
    state = a.state_dict()
    assert {"support.features", "support.ptr"} <= state.keys() and int(state["support.ptr"]) == 8
    b = _method(support_size=10, seed=5)
    assert not torch.equal(b.support.features, a.support.features)
    b.load_state_dict(state)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    opt_b.load_state_dict(opt_a.state_dict())
    outs = []
    for m, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad()
        out = m(_views(4, 50), torch.arange(4))
        out["loss"].backward()
        opt.step()
        m.on_train_step_end(2, 0.1)
        outs.append(out["loss"])
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(t, b.state_dict()[k]) for k, t in a.state_dict().items())


# ------------------------------------------------------------------------------ 2 ranks x B/2 == 1 x B
GLOBAL_BATCH = 8


def _train(rank, world):
    method = cd.convert_sync_batchnorm(_method(support_size=12), torch.device("cpu"))
    opt = torch.optim.SGD(method.parameters(), lr=0.5)
    record = train_like_ddp(method, opt, [_views(GLOBAL_BATCH, 100 + 2 * step) for step in range(3)], rank, world)
    return record


def _gather_without_grad_for_others(x):
    """The classic bug: gather without autograd and put back only the local rows' graph."""
    gathered = cd.all_gather_no_grad(x).clone()
    b = x.shape[0]
    gathered[cd.get_rank() * b:(cd.get_rank() + 1) * b] = x
    return gathered


def _worker(rank, world, out_dir):
    results = {"ok": _train(rank, world)}
    cd.all_gather_with_grad = _gather_without_grad_for_others   # this spawned process only
    results["no-grad-gather"] = _train(rank, world)
    torch.save(results, os.path.join(out_dir, f"{rank}.pt"))


ZERO_GRADS = ("head.0.bias", "head.3.bias", "head.6.bias", "predictor.0.bias")   # biases feeding batch norm


@pytest.mark.slow
def test_two_ranks_match_one_process():
    """Global batch norm, neighbours from the same support set on both ranks, predictions gathered with their
    gradient, the support set written with the global batch's first views in order (12 rows, 3 steps of 8:
    it wraps around)."""
    ref = _train(0, 1)
    assert int(ref["state"]["support.ptr"]) == (3 * GLOBAL_BATCH) % 12
    initial = _method(support_size=12).state_dict()["support.features"]
    assert not torch.allclose(ref["state"]["support.features"], initial)
    results = run_distributed(_worker, 2)
    for got in results:
        assert_same_training(got["ok"], ref, zero_grads=ZERO_GRADS)
    bad = results[0]["no-grad-gather"]
    assert torch.allclose(bad["loss"][0], ref["loss"][0], atol=1e-5)       # same forward ...
    assert any(not torch.allclose(bad["grads"][0][n], g, atol=1e-5, rtol=1e-4)   # ... wrong gradients
               for n, g in ref["grads"][0].items() if n not in ZERO_GRADS)


# ------------------------------------------------------------------------------ command line
FLAGS = ["--model", "NNCLR", "--optimizer", "lars", "--mlp-hidden-dim", "64", "--nnclr-pred-hidden-dim", "64",
         "--nnclr-support-size", "16"]


def test_pretrain_then_knn_and_linear(pretrained_run):
    """main_knn.py and main_linear.py on the run of test_cli_pretrain.py's cell (its flags are FLAGS), and the
    support set it recorded; the generic CLI, resume, device and host-read tests run NNCLR through the same flags,
    its 2-rank equality is test_two_ranks_match_one_process."""
    from tests.test_cli_pretrain import METHOD_FLAGS   # imported here: spawned ranks skip it
    assert METHOD_FLAGS["NNCLR"] == FLAGS
    ckpt, _ = pretrained_run("NNCLR").evaluated()
    assert ckpt.config["contrast_temperature"] == 0.1 and ckpt.config["aug"] == "BYOL"
    assert ckpt.config["feature_dim"] == 16 and ckpt.config["nnclr_support_size"] == 16
    assert ckpt.model["support.features"].shape == (16, 16)
    assert int(ckpt.model["support.ptr"]) == (ckpt.step * 4) % 16
