"""2 gloo ranks x B/2 must train exactly like 1 process x B, for every method.

Each setup builds the same BN-free model (fixed seed), runs two SGD steps with
gradients averaged over ranks (what DDP does), and records the global loss, the
averaged gradients and the state (bank, queue, key encoder, classifier). A
variant of SimCLR whose gather drops the gradient of other ranks' rows shows
that the comparison detects that bug.
"""
import os

import pytest
import torch
from torch import nn

from contrast import distributed as cd
from contrast.models import InstDisc, MoCo, PIC, SimCLR
from tests.dist_utils import run_distributed

GLOBAL_BATCH = 8
METHODS = ("SimCLR", "MoCo", "InstDisc", "PIC")


def _build(name):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6))
    if name == "SimCLR":
        return SimCLR(encoder, 6, feature_dim=4, mlp_head=True, temperature=0.5)
    if name == "MoCo":
        return MoCo(encoder, 6, feature_dim=4, mlp_head=True, temperature=0.2, momentum=0.9, num_negative=12)
    if name == "InstDisc":
        return InstDisc(encoder, 6, num_instances=12, feature_dim=4, temperature=0.1, num_negative=5,
                        bank_momentum=0.5)
    return PIC(encoder, 6, num_instances=12, feature_dim=4, temperature=0.2)


def _batch(step, num_views):
    g = torch.Generator().manual_seed(100 + step)
    views = [torch.randn(GLOBAL_BATCH, 3, 4, 4, generator=g) for _ in range(num_views)]
    index = torch.randperm(12, generator=g)[:GLOBAL_BATCH]
    return views, index


def _train(name, rank, world):
    method = _build(name)
    opt = torch.optim.SGD(method.parameters(), lr=0.5)
    b = GLOBAL_BATCH // world
    record = {"loss": [], "grads": []}
    for step in range(2):
        views, index = _batch(step, 2 if name in ("SimCLR", "MoCo") else 1)
        mine = slice(rank * b, (rank + 1) * b)
        opt.zero_grad()
        loss = method([v[mine] for v in views], index[mine])["loss"]
        loss.backward()
        grads = {n: cd.all_reduce_mean(p.grad.clone()) for n, p in method.named_parameters() if p.grad is not None}
        for n, p in method.named_parameters():
            if n in grads:
                p.grad.copy_(grads[n])
        opt.step()
        method.on_train_step_end(step, 0.5)
        record["loss"].append(cd.all_reduce_mean(loss.detach().clone()))
        record["grads"].append(grads)
    record["state"] = {n: t.detach().clone() for n, t in list(method.state_dict().items())}
    return record


def _gather_without_grad_for_others(x):
    """The classic bug: gather without autograd and put back only the local rows' graph."""
    gathered = cd.all_gather_no_grad(x).clone()
    b = x.shape[0]
    gathered[cd.get_rank() * b:(cd.get_rank() + 1) * b] = x
    return gathered


def _worker(rank, world, out_dir):
    results = {name: _train(name, rank, world) for name in METHODS}
    cd.all_gather_with_grad = _gather_without_grad_for_others   # this spawned process only
    results["SimCLR-no-grad-gather"] = _train("SimCLR", rank, world)
    torch.save(results, os.path.join(out_dir, f"{rank}.pt"))


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed(_worker, 2)


def _close(a, b):
    return torch.allclose(a, b, atol=1e-5, rtol=1e-4)  # fp32 summation order differs


@pytest.mark.parametrize("name", METHODS)
def test_two_ranks_match_one_process(two_ranks, name):
    ref = _train(name, 0, 1)
    for rank_result in two_ranks:
        got = rank_result[name]
        for step in range(2):
            assert _close(got["loss"][step], ref["loss"][step]), (name, step)
            assert got["grads"][step].keys() == ref["grads"][step].keys()
            for n, g in ref["grads"][step].items():
                assert g.abs().sum() > 0 and _close(got["grads"][step][n], g), (name, step, n)
        for n, t in ref["state"].items():
            assert torch.equal(got["state"][n], t) if t.dtype == torch.long else _close(got["state"][n], t), n
    if name in ("MoCo", "InstDisc"):
        buffer = "queue.features" if name == "MoCo" else "bank"
        assert not _close(ref["state"][buffer], _build(name).state_dict()[buffer])  # it was updated


def test_gather_without_grad_is_detected(two_ranks):
    ref = _train("SimCLR", 0, 1)
    bad = two_ranks[0]["SimCLR-no-grad-gather"]
    assert _close(bad["loss"][0], ref["loss"][0])   # same forward ...
    assert any(not _close(bad["grads"][0][n], g) for n, g in ref["grads"][0].items())  # ... wrong gradients
