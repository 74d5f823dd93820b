"""``--pic-table-constant-lr``: the dense PIC table is an optimiser parameter group of its own whose lr
the schedule leaves constant (``BaseMethod.param_groups`` -> ``build_optimizer`` -> ``build_scheduler``).

The main test trains a tiny PIC over a warm-up + cosine schedule in the loop's order of hooks and
compares the table after every step with plain momentum SGD at the constant lr (weight decay
included), written here from the table's gradient computed by hand."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contrast.models.base import BaseMethod
from contrast.models.pic import PIC, DenseInstanceClassifier
from contrast.optim import build_optimizer, build_scheduler, split_decay_groups

N, DIM, TAU, BATCH = 10, 4, 0.2, 5
PEAK, WD, MOMENTUM = 0.4, 0.05, 0.9
EPOCHS, ITERS, WARMUP = 3, 4, 2   # 8 warm-up steps from PEAK / 100, then cosine


def _pic(table_lr):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    clf = DenseInstanceClassifier(N, DIM, TAU, table_lr=table_lr)
    return PIC(encoder, 6, N, feature_dim=DIM, mlp_head=False, temperature=TAU, classifier=clf)


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(BATCH, 3, 6, 6, generator=g)], torch.randperm(N, generator=g)[:BATCH]


def _table_grad(method, views, index, w):
    """d CE(normalize(z) . normalize(w)^T / T) / d w in float64, z from the model's current encoder."""
    with torch.no_grad():
        z = method.head(method.backbone(views[0])).double()
    w = w.clone().requires_grad_()
    logits = F.normalize(z, dim=1) @ F.normalize(w, dim=1).t() / TAU
    F.cross_entropy(logits, index).backward()
    return w.grad


def _train(method, optimizer, scheduler, steps, on_step):
    for step in range(steps):
        views, index = _batch(step)
        optimizer.zero_grad()
        on_step(step, views, index)   # before the step: the reference reads the current weights
        method(views, index)["loss"].backward()
        method.on_before_optimizer_step(step)
        optimizer.step()
        method.on_train_step_end(step, optimizer.param_groups[0]["lr"])
        scheduler.step()


@pytest.mark.parametrize("optimizer_name", ["sgd", "lars"])
def test_table_moves_as_plain_sgd_at_the_constant_lr_over_a_warm_up(optimizer_name):
    method = _pic(table_lr=PEAK)
    optimizer = build_optimizer(method.param_groups(PEAK, WD), optimizer_name, PEAK, MOMENTUM, WD)
    scheduler = build_scheduler(optimizer, "cosine", EPOCHS, ITERS, WARMUP, warmup_multiplier=100.0)
    table = method.classifier.weight
    w_ref = table.detach().double().clone()
    buf = torch.zeros_like(w_ref)
    lrs = []

    def reference_step(step, views, index):
        nonlocal w_ref, buf
        assert torch.allclose(table.detach().double(), w_ref, rtol=1e-5, atol=1e-6), f"table before step {step}"
        g = _table_grad(method, views, index, w_ref)
        d = g + WD * w_ref
        if optimizer_name == "lars":   # LARS adapts W's step by eta ||w|| / ||d|| (trust coefficient 1e-3)
            d = d * (1e-3 * w_ref.norm() / (d.norm() + 1e-8))
        buf = MOMENTUM * buf + d
        w_ref = w_ref - PEAK * buf
        lrs.append({id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]})

    _train(method, optimizer, scheduler, EPOCHS * ITERS, reference_step)
    assert torch.allclose(table.detach().double(), w_ref, rtol=1e-5, atol=1e-6)
    assert all(step[id(table)] == PEAK for step in lrs)                      # the table: constant
    head = [step[id(method.head.weight)] for step in lrs]                    # the rest: warm-up, then cosine
    assert head[0] == pytest.approx(PEAK / 100) and head[1] < head[4] < head[7] < PEAK
    assert head[-1] < head[9] < PEAK


def test_the_rest_still_follows_the_schedule_and_defaults_are_one_group():
    plain, constant = _pic(table_lr=0.0), _pic(table_lr=PEAK)
    (only,) = plain.param_groups(PEAK, WD)
    assert only == {"params": list(plain.parameters())}
    assert BaseMethod.param_groups(constant, PEAK, WD)[0]["params"] == list(constant.parameters())
    rest, tbl = constant.param_groups(PEAK, WD)
    assert tbl == {"params": [constant.classifier.weight], "lr": PEAK, "weight_decay": WD, "constant_lr": True}
    assert len(rest["params"]) == len(list(constant.parameters())) - 1 and "lr" not in rest
    # LARS: the table keeps its constant lr and LARS adaptation; the default split is unchanged
    groups = split_decay_groups(constant.param_groups(PEAK, WD))
    assert [(len(g["params"]), g.get("constant_lr", False), g.get("lars_exclude", False)) for g in groups] == \
        [(2, False, False), (2, False, True), (1, True, False), (0, True, True)]
    assert [[id(p) for p in g["params"]] for g in split_decay_groups(plain.param_groups(PEAK, WD))] == \
        [[id(p) for p in g["params"]] for g in split_decay_groups(plain)]


def test_scheduler_keeps_constant_groups_across_a_resume_and_ignores_them_for_eta_min():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))
    groups = [{"params": [a]}, {"params": [b], "lr": 5.0, "constant_lr": True}]
    opt = build_optimizer(groups, "sgd", 0.1, 0.9, 0.0)
    sched = build_scheduler(opt, "cosine", 2, 5, 1, warmup_multiplier=10.0, eta_min=0.01)
    seen = []
    for _ in range(10):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert [s[1] for s in seen] == [5.0] * 10
    assert seen[0][0] == pytest.approx(0.01) and seen[5][0] == pytest.approx(0.1)
    # eta_min is absolute for the scheduled group (the constant group's 5.0 is not the peak)
    assert seen[-1][0] == pytest.approx(0.01 + (0.1 - 0.01) * 0.5 * (1 + torch.cos(torch.tensor(0.8 * torch.pi)).item()))
    opt2 = build_optimizer(copy.deepcopy(groups), "sgd", 0.1, 0.9, 0.0)
    sched2 = build_scheduler(opt2, "cosine", 2, 5, 1, warmup_multiplier=10.0, eta_min=0.01)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    assert opt2.param_groups[1]["lr"] == 5.0
