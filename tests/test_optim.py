"""LARS against a direct formula, parameter groups, and the per-iteration lr schedules."""
import math

import pytest
import torch
from torch import nn

from contrast.optim import LARS, build_optimizer, build_scheduler, split_decay_groups


def _lars_reference(w, grads, lr, m, wd, eta, exclude):
    """SimCLR's LARS written out per step in plain float64 tensor maths (independent of the class)."""
    w, v = w.double().clone(), torch.zeros_like(w, dtype=torch.float64)
    for g in grads:
        g = g.double()
        if exclude:
            d = g
        else:
            d = g + wd * w
            wn, dn = math.sqrt(float((w * w).sum())), math.sqrt(float((d * d).sum()))
            d = d * (eta * wn / dn if wn > 0 and dn > 0 else 1.0)
        v = m * v + lr * d
        w = w - v
    return w


def test_lars_matches_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: [torch.randn_like(p) for _ in range(3)] for n, p in model.named_parameters()}
    opt = build_optimizer(model, "lars", lr=0.7, momentum=0.9, weight_decay=0.05)
    assert isinstance(opt, LARS)
    for step in range(3):
        for n, p in model.named_parameters():
            p.grad = grads[n][step].clone()
        opt.step()
    for n, p in model.named_parameters():
        exclude = p.ndim < 2  # biases and BN weight/bias: no decay, no adaptation
        ref = _lars_reference(init[n], grads[n], 0.7, 0.9, 0.05, 0.001, exclude)
        torch.testing.assert_close(p.detach().double(), ref, rtol=1e-5, atol=1e-7, msg=n)
    # the adapted weight moved by a tiny trust-scaled amount, the excluded bias by a plain SGD step
    assert (model[0].weight - init["0.weight"]).abs().max() < 0.01 < (model[0].bias - init["0.bias"]).abs().max()


def test_lars_zero_weight_uses_ratio_one():
    p = nn.Parameter(torch.zeros(3, 2))
    opt = LARS([p], lr=0.1, momentum=0.0, weight_decay=0.0)
    p.grad = torch.ones(3, 2)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3, 2), -0.1))


def test_decay_groups():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    decay, rest = split_decay_groups(model)
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert rest["weight_decay"] == 0.0 and rest["lars_exclude"] and len(rest["params"]) == 4
    sgd = build_optimizer(model, "sgd", 0.1, 0.9, 1e-4)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["weight_decay"] == 1e-4
    with pytest.raises(ValueError, match="--optimizer 'adam'"):
        build_optimizer(model, "adam", 0.1, 0.9, 0.0)


def _lrs(scheduler, optimizer, n):
    out = []
    for _ in range(n):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def _opt(lr=1.0):
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def test_cosine_with_warmup():
    opt = _opt(2.0)
    lrs = _lrs(build_scheduler(opt, "cosine", epochs=5, iters_per_epoch=4, warmup_epochs=2, warmup_multiplier=100),
               opt, 20)
    warm = 8
    for it in range(warm):  # linear from lr/100 to lr
        assert lrs[it] == pytest.approx(2.0 / 100 + (2.0 - 2.0 / 100) * it / warm)
    for it in range(warm, 20):
        t = (it - warm) / (20 - warm - 1)
        assert lrs[it] == pytest.approx(1e-6 + (2.0 - 1e-6) * 0.5 * (1 + math.cos(math.pi * t)))
    assert lrs[warm] == pytest.approx(2.0) and lrs[-1] == pytest.approx(1e-6)


def test_step_schedule():
    opt = _opt(1.0)
    lrs = _lrs(build_scheduler(opt, "step", epochs=6, iters_per_epoch=2, warmup_epochs=1, warmup_multiplier=10,
                               decay_epochs=[3, 5], decay_rate=0.1), opt, 12)
    expected = [0.1, 0.55, 1, 1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01]
    assert lrs == pytest.approx(expected)


def test_scheduler_resumes_exactly():
    opt = _opt(1.0)
    sched = build_scheduler(opt, "cosine", 4, 3, 1)
    full = _lrs(sched, opt, 12)
    opt_a = _opt(1.0)
    a = build_scheduler(opt_a, "cosine", 4, 3, 1)
    first = _lrs(a, opt_a, 5)
    opt_b = _opt(1.0)
    b = build_scheduler(opt_b, "cosine", 4, 3, 1)
    opt_b.load_state_dict(opt_a.state_dict())
    b.load_state_dict(a.state_dict())
    assert first + _lrs(b, opt_b, 7) == full


def test_bad_schedule_name():
    with pytest.raises(ValueError, match="--lr-scheduler 'linear'"):
        build_scheduler(_opt(), "linear", 2, 2)
