"""LARS (release and fold-lr forms) against slow references, parameter groups, and the per-iteration
lr schedules (release and reach-min cosine) against their formulas and torch's CosineAnnealingLR."""
import math

import pytest
import torch
from torch import nn

from contrast.optim import LARS, build_optimizer, build_scheduler, split_decay_groups


LRS = [0.7, 0.2, 1.1, 0.05]   # a changing lr: where the two LARS forms differ


def _trust_scaled(g, w, wd, eta, exclude, eps):
    """LARS's update direction: ``g`` (excluded groups), else ``(g + wd w) * eta ||w|| / (||g + wd w|| + eps)``."""
    if exclude:
        return g
    d = g + wd * w
    wn, dn = math.sqrt(float((w * w).sum())), math.sqrt(float((d * d).sum()))
    return d * (eta * wn / (dn + eps) if wn > 0 and dn > 0 else 1.0)


def _fold_lr_reference(w, grads, lrs, m, wd, eta, exclude, eps=0.0):
    """SimCLR's LARS (lr folded into the buffer) written out per step in plain float64 tensor maths."""
    w, v = w.double().clone(), torch.zeros_like(w, dtype=torch.float64)
    for g, lr in zip(grads, lrs):
        v = m * v + lr * _trust_scaled(g.double(), w, wd, eta, exclude, eps)
        w = w - v
    return w


def _release_reference(w, grads, lrs, m, wd, eta, exclude, eps=1e-8):
    """The release's LARS: the trust-scaled gradient handed to torch.optim.SGD(momentum=m), in float64."""
    p = nn.Parameter(w.double().clone())
    sgd = torch.optim.SGD([p], lr=lrs[0], momentum=m)
    for g, lr in zip(grads, lrs):
        with torch.no_grad():
            d = _trust_scaled(g.double(), p, wd, eta, exclude, eps)
        p.grad = d.clone()
        sgd.param_groups[0]["lr"] = lr
        sgd.step()
    return p.detach()


def _run_lars(form, lrs, **kwargs):
    if form != "release":   # the release's form is build_optimizer's default
        kwargs["lars_form"] = form
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: [torch.randn_like(p) for _ in lrs] for n, p in model.named_parameters()}
    opt = build_optimizer(model, "lars", lr=lrs[0], momentum=0.9, weight_decay=0.05, **kwargs)
    assert isinstance(opt, LARS) and opt.form == form
    for step, lr in enumerate(lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        for n, p in model.named_parameters():
            p.grad = grads[n][step].clone()
        opt.step()
    return model, init, grads


@pytest.mark.parametrize("form,reference", [("release", _release_reference), ("fold-lr", _fold_lr_reference)])
def test_lars_matches_reference_with_changing_lr(form, reference):
    model, init, grads = _run_lars(form, LRS)
    for n, p in model.named_parameters():
        exclude = p.ndim < 2  # biases and BN weight/bias: no decay, no adaptation
        ref = reference(init[n], grads[n], LRS, 0.9, 0.05, 0.001, exclude)
        torch.testing.assert_close(p.detach().double(), ref, rtol=1e-5, atol=1e-7, msg=n)
    # the adapted weight moved by a tiny trust-scaled amount, the excluded bias by plain SGD steps
    assert (model[0].weight - init["0.weight"]).abs().max() < 0.01 < (model[0].bias - init["0.bias"]).abs().max()


def test_lars_forms_agree_at_constant_lr_and_differ_when_it_changes():
    const = [0.3] * 4
    a, _, _ = _run_lars("release", const, lars_eps=0.0)
    b, _, _ = _run_lars("fold-lr", const)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-8, msg=n)
    a, init, _ = _run_lars("release", LRS, lars_eps=0.0)
    b, _, _ = _run_lars("fold-lr", LRS)
    moved = (a[0].bias - init["0.bias"]).abs().max()
    assert (a[0].bias - b[0].bias).abs().max() > 1e-2 * moved


def test_lars_eps_sits_in_the_denominator():
    p = nn.Parameter(torch.full((2, 2), 3.0))   # ||w|| = 6
    opt = LARS([p], lr=1.0, momentum=0.0, weight_decay=0.0, trust_coefficient=0.5, eps=1.0)
    p.grad = torch.full((2, 2), 1.5)           # ||g|| = 3: ratio = 0.5 * 6 / (3 + 1) = 0.75
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((2, 2), 3.0 - 0.75 * 1.5))
    assert LARS([p], lr=0.1).defaults["eps"] == 1e-8 and LARS([p], lr=0.1, form="fold-lr").defaults["eps"] == 0.0
    with pytest.raises(ValueError, match="LARS form 'tf'"):
        LARS([p], lr=0.1, form="tf")


@pytest.mark.parametrize("form", ["release", "fold-lr"])
def test_lars_zero_weight_uses_ratio_one(form):
    p = nn.Parameter(torch.zeros(3, 2))
    opt = LARS([p], lr=0.1, momentum=0.0, weight_decay=0.0, form=form)
    p.grad = torch.ones(3, 2)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3, 2), -0.1))


def test_lars_resumes_from_its_state_dict():
    torch.manual_seed(1)
    w0, grads = torch.randn(4, 3), [torch.randn(4, 3) for _ in range(4)]

    def run(steps, opt=None, p=None):
        for i in steps:
            p.grad = grads[i].clone()
            opt.param_groups[0]["lr"] = LRS[i]
            opt.step()

    p = nn.Parameter(w0.clone())
    full = LARS([p], lr=1.0, weight_decay=0.01)
    run(range(4), full, p)
    q = nn.Parameter(w0.clone())
    first = LARS([q], lr=1.0, weight_decay=0.01)
    run(range(2), first, q)
    r = nn.Parameter(q.detach().clone())
    second = LARS([r], lr=1.0, weight_decay=0.01)
    second.load_state_dict(first.state_dict())
    run(range(2, 4), second, r)
    torch.testing.assert_close(r, p, rtol=0, atol=0)


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


def test_cosine_reach_min_form():
    opt = _opt(2.0)
    lrs = _lrs(build_scheduler(opt, "cosine", epochs=5, iters_per_epoch=4, warmup_epochs=2, warmup_multiplier=100,
                               cosine_form="reach-min"), opt, 20)
    warm = 8
    for it in range(warm):  # linear from lr/100 to lr
        assert lrs[it] == pytest.approx(2.0 / 100 + (2.0 - 2.0 / 100) * it / warm)
    for it in range(warm, 20):
        t = (it - warm) / (20 - warm - 1)
        assert lrs[it] == pytest.approx(1e-6 + (2.0 - 1e-6) * 0.5 * (1 + math.cos(math.pi * t)))
    assert lrs[warm] == pytest.approx(2.0) and lrs[-1] == pytest.approx(1e-6)


def _release_lr(it, base, epochs, warmup_epochs, iters, multiplier, eta_min=1e-6):
    """The release's lr at iteration ``it``: GradualWarmupScheduler(multiplier, warmup iters) around
    CosineAnnealingLR(T_max=(epochs - warmup) * iters, eta_min), both stepped once per iteration."""
    warm = warmup_epochs * iters
    if warm > 0 and it <= warm:
        return base / multiplier * ((multiplier - 1) * it / warm + 1)
    t_max = (epochs - warmup_epochs) * iters
    return eta_min + (base - eta_min) * (1 + math.cos(math.pi * (it - warm) / t_max)) / 2


@pytest.mark.parametrize("warmup_epochs", [0, 2])
def test_cosine_release_form_every_iteration(warmup_epochs):
    opt = _opt(2.0)
    lrs = _lrs(build_scheduler(opt, "cosine", epochs=5, iters_per_epoch=4, warmup_epochs=warmup_epochs,
                               warmup_multiplier=100), opt, 20)   # the release form is the default
    assert lrs == pytest.approx([_release_lr(it, 2.0, 5, warmup_epochs, 4, 100) for it in range(20)], rel=1e-12)
    assert lrs[-1] > 1e-3   # the release never reaches the floor: the last step is one iteration short


def test_cosine_release_form_equals_torch_cosine_annealing_after_warmup():
    """After the warm-up (written here), the lr equals torch's own CosineAnnealingLR stepped per iteration."""
    epochs, warmup_epochs, iters, base, mult = 6, 2, 5, 0.4, 100
    opt = _opt(base)
    lrs = _lrs(build_scheduler(opt, "cosine", epochs, iters, warmup_epochs, mult), opt, epochs * iters)
    warm = warmup_epochs * iters
    for it in range(warm + 1):
        assert lrs[it] == pytest.approx(base / mult * ((mult - 1) * it / warm + 1), rel=1e-12)
    ref_opt = _opt(base)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=(epochs - warmup_epochs) * iters, eta_min=1e-6)
    torch_lrs = _lrs(cosine, ref_opt, epochs * iters - warm)
    assert lrs[warm:] == pytest.approx(torch_lrs, rel=1e-9)


def test_release_cosine_long_run_and_resume_have_no_drift():
    """400 epochs x 50 iterations: every lr equals the closed form, also after a resume in mid-run."""
    epochs, iters, warmup_epochs, base = 400, 50, 10, 0.03
    total = epochs * iters
    expected = [_release_lr(it, base, epochs, warmup_epochs, iters, 100) for it in range(total)]
    opt = _opt(base)
    sched = build_scheduler(opt, "cosine", epochs, iters, warmup_epochs, 100)
    lrs = _lrs(sched, opt, 12345)
    resumed_opt = _opt(base)
    resumed = build_scheduler(resumed_opt, "cosine", epochs, iters, warmup_epochs, 100)
    resumed_opt.load_state_dict(opt.state_dict())
    resumed.load_state_dict(sched.state_dict())
    lrs += _lrs(resumed, resumed_opt, total - 12345)
    assert lrs == pytest.approx(expected, rel=1e-12, abs=0)
    jumped_opt = _opt(base)   # --start-epoch: jump straight to an iteration
    jumped = build_scheduler(jumped_opt, "cosine", epochs, iters, warmup_epochs, 100)
    jumped_opt.step()
    jumped.last_epoch = 300 * iters - 1
    jumped.step()
    assert jumped_opt.param_groups[0]["lr"] == pytest.approx(expected[300 * iters], rel=1e-12)


def test_bad_cosine_form():
    with pytest.raises(ValueError, match="cosine form 'tf'"):
        build_scheduler(_opt(), "cosine", 2, 2, cosine_form="tf")


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


@pytest.mark.parametrize("form", ["release", "reach-min"])
@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_schedule_by_samples_equals_per_iteration_schedule(form, schedule):
    """Counting samples (any total batch) gives exactly the lrs of counting iterations."""
    for batch in (3, 64, 1000):
        a, b = _opt(1.7), _opt(1.7)
        by_step = build_scheduler(a, schedule, 5, 7, 2, 100, [2, 4], 0.1, cosine_form=form)
        by_sample = build_scheduler(b, schedule, 5, 7, 2, 100, [2, 4], 0.1, cosine_form=form, samples_per_step=batch)
        assert _lrs(by_step, a, 36) == _lrs(by_sample, b, 36)
        assert by_sample.samples_seen == 36 * batch and by_sample.total_samples == 35 * batch


def test_resume_with_another_batch_continues_by_samples_seen():
    """A run of 4 epochs x 10 steps of 8 samples stopped after 13 steps (104 of 320 samples) and resumed
    with 16 samples per step (5 steps per epoch): the cosine continues from 104 / 320 over the remaining
    samples (reach-min form, clamped at the floor past the end); the peak is this run's."""
    peak, floor, warm = 0.2, 1e-6, 80
    a = _opt(0.1)
    first = build_scheduler(a, "cosine", 4, 10, 1, 100, cosine_form="reach-min", samples_per_step=8)
    _lrs(first, a, 13)
    b = _opt(peak)
    resumed = build_scheduler(b, "cosine", 4, 5, 1, 100, cosine_form="reach-min", samples_per_step=16)
    b.load_state_dict(a.state_dict())   # the old lr is in the optimiser state ...
    resumed.load_state_dict(first.state_dict())
    assert b.param_groups[0]["lr"] == pytest.approx(floor + (peak - floor) * 0.5 * (1 + math.cos(
        math.pi * (104 - warm) / (320 - warm - 16))), rel=1e-12)   # ... this run's lr is set before the first step
    lrs = _lrs(resumed, b, 14)   # (320 - 104) / 16 = 13.5: 13 more steps, the 14th is past the end
    seen = [104 + 16 * i for i in range(14)]
    expected = [floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min((s - warm) / (320 - warm - 16), 1.0)))
                for s in seen]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert resumed.samples_seen == 104 + 16 * 14
