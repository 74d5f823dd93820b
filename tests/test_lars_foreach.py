"""LARS's multi-tensor update equals the per-tensor loop it replaced (to rounding)."""
import pytest
import torch
from torch import nn

from contrast.optim import LARS, split_decay_groups


@torch.no_grad()
def per_tensor_step(groups, state, form):
    """The loop LARS ran before its ``torch._foreach_*`` update, tensor by tensor."""
    for group in groups:
        lr = group["lr"]
        for p in group["params"]:
            if p.grad is None:
                continue
            d = p.grad
            if not group["lars_exclude"]:
                if group["weight_decay"] != 0:
                    d = d.add(p, alpha=group["weight_decay"])
                w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                ratio = torch.where((w_norm > 0) & (d_norm > 0),
                                    group["trust_coefficient"] * w_norm / (d_norm + group["eps"]),
                                    torch.ones_like(w_norm))
                d = d * ratio
            buf = state.setdefault(p, torch.zeros_like(p))
            if form == "release":
                buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-lr)
            else:
                buf.mul_(group["momentum"]).add_(d, alpha=lr)
                p.sub_(buf)


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.Linear(5, 2))
    with torch.no_grad():
        m[4].weight.zero_()     # ||w|| = 0: ratio 1
    m[4].bias.requires_grad_(False)   # no gradient: skipped
    return m


@pytest.mark.parametrize("form", ["release", "fold-lr"])
@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_foreach_lars_equals_the_per_tensor_loop(form, wd):
    fast, slow = _model(), _model()
    opt = LARS(split_decay_groups(fast), lr=0.5, momentum=0.9, weight_decay=wd, trust_coefficient=0.02, form=form)
    ref_groups = [dict(g, params=[dict(slow.named_parameters())[n] for n, q in fast.named_parameters()
                                  if any(q is r for r in g["params"])]) for g in opt.param_groups]
    ref_state = {}
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for step, lr in enumerate([0.5, 0.2, 0.05]):
        for g, r in zip(opt.param_groups, ref_groups):
            g["lr"] = r["lr"] = lr
        for model in (fast, slow):
            model.zero_grad(set_to_none=True)
            (model(x + step).square().mean()).backward()
        opt.step()
        per_tensor_step(ref_groups, ref_state, form)
        for (name, p), q in zip(fast.named_parameters(), slow.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=f"{name} at step {step}")
    assert not torch.equal(fast[0].weight, _model()[0].weight)
