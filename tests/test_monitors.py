"""The training monitors (contrast/monitors): each measure against a hand-computed value, the online
probe against a hand-written SGD, 2 gloo processes x B/2 = 1 process x B, the collapse warning's rule."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contrast.models.base import TrainModule
from contrast.monitors import MonitorOptions, Monitors, OnlineProbe, collapse_scalars, collapse_warning
from contrast.monitors.collapse import alignment, effective_rank, normalized_std, uniformity
from contrast.monitors.hub import view_chunks
from tests.dist_utils import run_distributed

SQUARE = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])


def test_normalized_std_by_hand():
    z = torch.tensor([[3.0, 4.0], [6.0, 8.0], [0.0, 5.0], [2.0, 0.0]])   # normalised: (.6,.8) x2, (0,1), (1,0)
    dim0 = [0.6, 0.6, 0.0, 1.0]
    dim1 = [0.8, 0.8, 1.0, 0.0]

    def pstd(v):
        m = sum(v) / len(v)
        return math.sqrt(sum((x - m) ** 2 for x in v) / len(v))

    assert normalized_std(z).item() == pytest.approx((pstd(dim0) + pstd(dim1)) / 2, abs=1e-6)
    assert normalized_std(SQUARE).item() == pytest.approx(math.sqrt(0.5), abs=1e-6)
    assert normalized_std(torch.ones(5, 3) * 7).item() == pytest.approx(0.0, abs=1e-7)


def test_effective_rank_by_hand():
    assert effective_rank(SQUARE).item() == pytest.approx(2.0, abs=1e-5)   # singular values sqrt2, sqrt2
    assert effective_rank(torch.ones(6, 4)).item() == pytest.approx(1.0, abs=1e-4)   # one direction
    z = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])   # singular values 3, 1: p = .75, .25
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert effective_rank(z).item() == pytest.approx(math.exp(h), abs=1e-5)
    assert effective_rank(torch.zeros(4, 3)).item() == pytest.approx(1.0, abs=1e-4)   # no NaN at the end of collapse


def test_alignment_and_uniformity_by_hand():
    rotated = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    assert alignment(SQUARE, rotated).item() == pytest.approx(2.0, abs=1e-6)   # |a - b|^2 = 2 per pair
    assert alignment(SQUARE * 5, SQUARE).item() == pytest.approx(0.0, abs=1e-6)
    # 4 adjacent pairs at squared distance 2, 2 opposite ones at 4
    assert uniformity(SQUARE * 3).item() == pytest.approx(math.log((4 * math.exp(-4) + 2 * math.exp(-8)) / 6),
                                                          abs=1e-5)


def test_collapse_scalars_keys_and_views():
    rotated = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    out = collapse_scalars(torch.stack([SQUARE, rotated]))
    assert out["collapse/std_rel"].item() == pytest.approx(math.sqrt(0.5) * math.sqrt(2), abs=1e-6)
    assert out["collapse/align"].item() == pytest.approx(2.0, abs=1e-6)
    assert "collapse/align" not in collapse_scalars(SQUARE[None])


def test_collapse_warning_rule():
    assert collapse_warning({"collapse/std_rel": 0.8, "collapse/rank": 30.0}) is None
    assert "std" in collapse_warning({"collapse/std_rel": 0.01, "collapse/rank": 30.0})
    assert "rank" in collapse_warning({"collapse/std_rel": 0.8, "collapse/rank": 1.2})
    assert "feat_mean_norm" in collapse_warning({"diag/feat_mean_norm": 0.9999})   # PIC's diagnostics
    assert collapse_warning({"diag/feat_mean_norm": 0.5, "loss": 1.0}) is None


def test_view_chunks_in_call_order():
    a, b = torch.arange(8.0).view(4, 2), torch.arange(8.0, 16.0).view(4, 2)
    joint = view_chunks([torch.cat([a, b])], 4)
    separate = view_chunks([a, b], 4)
    assert torch.equal(joint, separate) and torch.equal(joint[1], b)
    assert view_chunks([], 4) is None and view_chunks([a[:2]], 4) is None


def reference_probe(x, y, steps, num_classes, lr, momentum=0.9):
    """Plain SGD with momentum on the mean cross-entropy of a zero-initialised linear layer, the
    gradient written out: (softmax - onehot) / B."""
    w, b = torch.zeros(num_classes, x.shape[2], dtype=torch.float64), torch.zeros(num_classes, dtype=torch.float64)
    vw, vb = torch.zeros_like(w), torch.zeros_like(b)
    accs = []
    for t in range(steps):
        xs, ys = x[t].double(), y[t]
        logits = xs @ w.t() + b
        accs.append(100.0 * (logits.argmax(1) == ys).double().mean().item())
        d = (torch.softmax(logits, 1) - F.one_hot(ys, num_classes).double()) / xs.shape[0]
        vw, vb = momentum * vw + d.t() @ xs, momentum * vb + d.sum(0)
        w, b = w - lr * vw, b - lr * vb
    return w, b, accs


def probe_batches(steps=4, batch=8, dim=5, classes=3):
    g = torch.Generator().manual_seed(3)
    return torch.randn(steps, batch, dim, generator=g), torch.randint(0, classes, (steps, batch), generator=g)


def test_online_probe_matches_hand_written_sgd():
    x, y = probe_batches()
    probe = OnlineProbe(3, lr=0.5)
    accs = [probe.step(x[t], y[t])["probe/acc"].item() for t in range(4)]
    w, b, ref_accs = reference_probe(x, y, 4, 3, 0.5)
    assert torch.allclose(probe.weight.double(), w, atol=1e-5) and torch.allclose(probe.bias.double(), b, atol=1e-5)
    assert accs == pytest.approx(ref_accs)


def _probe_on_half(rank, world_size, out_dir):
    x, y = probe_batches()
    half = x.shape[1] // world_size
    probe = OnlineProbe(3, lr=0.5)
    accs = [probe.step(x[t, rank * half:(rank + 1) * half], y[t, rank * half:(rank + 1) * half])["probe/acc"].item()
            for t in range(4)]
    torch.save((probe.weight.detach(), probe.bias.detach(), accs), os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.slow
def test_online_probe_two_processes_equal_one():
    (w0, b0, acc0), (w1, b1, acc1) = run_distributed(_probe_on_half, 2)
    w, b, ref_accs = reference_probe(*probe_batches(), 4, 3, 0.5)
    assert torch.equal(w0, w1) and torch.equal(b0, b1)   # every rank keeps the same probe
    assert torch.allclose(w0.double(), w, atol=1e-5) and torch.allclose(b0.double(), b, atol=1e-5)
    assert acc0 == acc1 == pytest.approx(ref_accs)   # accuracy over the global batch


def test_online_probe_state_round_trip():
    x, y = probe_batches()
    a, b = OnlineProbe(3, lr=0.5), OnlineProbe(3, lr=0.5)
    a.step(x[0], y[0])
    b.load_state_dict(a.state_dict(), torch.device("cpu"))
    for t in (1, 2):
        a.step(x[t], y[t])
        b.step(x[t], y[t])
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    with pytest.raises(ValueError, match="classes"):
        OnlineProbe(4).load_state_dict(a.state_dict(), torch.device("cpu"))


class TwoViews(TrainModule):
    """A method-like module calling its ``net`` once per view, as the methods do."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 6)

    def feature_module(self):
        return self.net

    def embedding_module(self):
        return self.net

    def forward(self, views, target):
        return {"loss": sum(self.net(v).pow(2).mean() for v in views)}


def test_monitors_read_the_forward_without_changing_it():
    torch.manual_seed(0)
    module = TwoViews()
    mon = Monitors(module, MonitorOptions(online_probe=True, num_classes=2, probe_lr=0.1, collapse=True,
                                          collapse_freq=2))
    views = [torch.randn(5, 4), torch.randn(5, 4)]
    label = torch.tensor([0, 1, 0, 1, 1])
    for step in range(3):
        mon.before_forward(step)
        module(views, None)
        out = mon.after_step(label)
        assert ("collapse/align" in out) == (step % 2 == 0) and "probe/acc" in out
    with torch.no_grad():
        want = collapse_scalars(torch.stack([module.net(v) for v in views]))
    mon.before_forward(4)
    module(views, None)
    got = mon.after_step(label)
    assert all(got[k].item() == pytest.approx(want[k].item(), abs=1e-6) for k in want)
    module(views, None)   # outside a step (e.g. the kNN monitor's forwards): nothing kept
    assert mon.feature_tap.outputs == []
    off = Monitors.off()
    off.before_forward(0)
    assert off.after_step(label) == {} and off.state_dict() == {}


def test_collapse_is_measured_every_freq_steps_and_at_the_last_step():
    """A 7-step run with --monitor-collapse-freq 50 (a short comparison run): steps 0 and 6, not only 0."""
    mon = Monitors(TwoViews(), MonitorOptions(collapse=True, collapse_freq=50))
    mon.start(7)
    measured = []
    for step in range(7):
        mon.before_forward(step)
        if mon.embedding_tap.active:
            measured.append(step)
        mon.discard()
    assert measured == [0, 6]


def test_online_probe_step_reads_nothing_from_the_device(monkeypatch):
    """No host read or host-to-device copy per step (each would synchronise a GPU): item, tolist, bool
    and torch.tensor raise while the probe trains (after the first step, which builds it)."""
    x, y = probe_batches()
    probe = OnlineProbe(3, lr=0.5)
    probe.step(x[0], y[0])

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation in the probe's step")

    for name in ("item", "tolist", "__bool__", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch, "tensor", forbidden)
    out = probe.step(x[1], y[1])
    monkeypatch.undo()
    assert 0 <= out["probe/acc"].item() <= 100
