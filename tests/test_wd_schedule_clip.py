"""Shared pieces: the cosine weight-decay schedule (``--weight-decay-end``) and per-parameter gradient
clipping (``--clip-grad``), against slow references written from DINO's ``utils.py``."""
import logging
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from contrast import distributed as cd
from contrast import engine
from contrast.data.samplers import ResumableDistributedSampler
from contrast.logger import TensorBoard
from contrast.models.base import TrainModule
from contrast.optim import build_optimizer, build_scheduler, clip_grad_per_param_
from contrast.option import resolve_pretrain
from contrast.precision import Precision


def dino_cosine(base, final, epochs, iters):
    """DINO's utils.cosine_scheduler without warm-up, as a plain loop."""
    n = epochs * iters
    return [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)) for i in range(n)]


def two_groups():
    w, b = nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(3))
    return w, b, [{"params": [w]}, {"params": [b], "weight_decay": 0.0}]


@pytest.mark.parametrize("end", [0.4, 1e-4, 0.0])
def test_weight_decay_follows_dino_cosine(end):
    w, b, groups = two_groups()
    opt = build_optimizer(groups, "sgd", 0.1, 0.9, 0.04)
    sched = build_scheduler(opt, "cosine", 3, 4, warmup_epochs=1, samples_per_step=8, weight_decay_end=end)
    ref = dino_cosine(0.04, end, 3, 4)
    seen = []
    for _ in range(12):
        seen.append((opt.param_groups[0]["weight_decay"], opt.param_groups[1]["weight_decay"]))
        sched.step()
    assert [s[0] for s in seen] == pytest.approx(ref, rel=1e-12, abs=1e-15)
    assert all(s[1] == 0.0 for s in seen)


def test_weight_decay_constant_without_end_and_lr_unchanged():
    lrs = {}
    for end in (None, 0.4):
        _, _, groups = two_groups()
        opt = build_optimizer(groups, "sgd", 0.1, 0.9, 0.04)
        sched = build_scheduler(opt, "cosine", 2, 3, warmup_epochs=1, samples_per_step=4, weight_decay_end=end)
        lrs[end] = []
        for _ in range(6):
            lrs[end].append(opt.param_groups[0]["lr"])
            if end is None:
                assert opt.param_groups[0]["weight_decay"] == 0.04
            sched.step()
    assert lrs[None] == lrs[0.4]


def test_weight_decay_schedule_is_used_by_the_step_and_resumes():
    """SGD with the schedule equals a hand-written SGD with DINO's wd values; a resumed scheduler
    (new optimiser and scheduler, state dicts loaded) continues the same decays."""
    torch.manual_seed(0)
    w, b, groups = two_groups()
    w0, b0 = w.detach().clone().double(), b.detach().clone().double()
    opt = build_optimizer(groups, "sgd", 0.1, 0.0, 0.04)
    sched = build_scheduler(opt, "step", 2, 3, decay_epochs=[100], samples_per_step=2, weight_decay_end=0.4)
    ref_wd = dino_cosine(0.04, 0.4, 2, 3)
    for k in range(3):
        w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
        opt.step()
        sched.step()
        w0 -= 0.1 * (1 + ref_wd[k] * w0)
        b0 -= 0.1 * 1
    torch.testing.assert_close(w.detach().double(), w0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.detach().double(), b0, rtol=1e-6, atol=1e-6)
    state_o, state_s = opt.state_dict(), sched.state_dict()
    _, _, groups2 = two_groups()
    opt2 = build_optimizer(groups2, "sgd", 0.1, 0.0, 0.04)
    sched2 = build_scheduler(opt2, "step", 2, 3, decay_epochs=[100], samples_per_step=2, weight_decay_end=0.4)
    opt2.load_state_dict(state_o)
    sched2.load_state_dict(state_s)
    got = []
    for _ in range(3):
        got.append(opt2.param_groups[0]["weight_decay"])
        sched2.step()
    assert got == pytest.approx(ref_wd[3:], rel=1e-12)
    assert opt2.param_groups[1]["weight_decay"] == 0.0


def test_weight_decay_end_flag_and_recipe_default():
    args, _ = resolve_pretrain("SimCLR")
    assert args.weight_decay_end is None and args.clip_grad == 0.0
    args, _ = resolve_pretrain("SimCLR", "--weight-decay-end", "0.4", "--clip-grad", "3")
    assert args.weight_decay_end == 0.4 and args.clip_grad == 3.0
    with pytest.raises(SystemExit):
        resolve_pretrain("SimCLR", "--clip-grad", "-1")


def dino_clip_gradients(params, clip):
    """DINO's utils.clip_gradients, verbatim but for the returned norms."""
    for p in params:
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)


def test_clip_per_parameter_equals_dino():
    torch.manual_seed(1)
    params = [nn.Parameter(torch.zeros(s)) for s in [(4, 3), (5,), (2, 2, 3), (7,)]]
    grads = [torch.randn(p.shape) * s for p, s in zip(params, [10.0, 0.1, 3.0, 0.5])]
    params.append(nn.Parameter(torch.zeros(2)))   # no gradient
    ref = [nn.Parameter(torch.zeros(p.shape)) for p in params]
    for p, r, g in zip(params, ref, grads):
        p.grad, r.grad = g.clone(), g.clone()
    dino_clip_gradients(ref, 3.0)
    clip_grad_per_param_(params, 3.0)
    for p, r in zip(params[:4], ref[:4]):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=0)
    assert params[4].grad is None
    norms = [p.grad.norm().item() for p in params[:4]]
    assert norms[0] == pytest.approx(3.0, rel=1e-5) and norms[2] == pytest.approx(3.0, rel=1e-5)
    torch.testing.assert_close(params[1].grad, grads[1])   # small gradients untouched (not a total-norm clip)
    torch.testing.assert_close(params[3].grad, grads[3])


class Big(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return [torch.full((3,), float(i + 1))], i, 0


class Recorder(TrainModule):
    """Gradients of 100 x (x . w) and of a small bias, recorded when the pre-step hook runs."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 1)
        self.grads = []

    def forward(self, views, target):
        return {"loss": (100 * self.fc(views[0]) + 0.01 * self.fc.bias).sum().float()}

    def on_before_optimizer_step(self, step):
        self.grads.append([p.grad.clone() for p in self.parameters()])


@pytest.mark.parametrize("scale", [None, 2.0 ** 10])
def test_trainer_clips_unscaled_gradients_before_the_hook_and_step(tmp_path, scale):
    torch.manual_seed(0)
    env = cd.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    run = engine.Run(env, logging.getLogger("contrast.test_clip"), TensorBoard("", False), str(tmp_path))
    module = Recorder()
    w0 = [p.detach().clone() for p in module.parameters()]
    data = Big()
    loader = DataLoader(data, batch_size=2, sampler=ResumableDistributedSampler(data, 1, 0, seed=0, shuffle=False))
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    sched = build_scheduler(opt, "step", 1, 2, decay_epochs=[100], samples_per_step=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
    trainer = engine.Trainer(module, module, opt, sched, Precision(None, scaler), run, engine.LoopOptions(clip_grad=3.0))
    trainer.train_epoch(loader, 1, 1)
    # reference: the unscaled gradient of the first batch (images 1 and 2), each parameter clipped on its own
    x = torch.tensor([[1.0] * 3, [2.0] * 3])
    ref = [100 * x.sum(0, keepdim=True), torch.tensor([2 * (100 + 0.01)])]
    for g in ref:
        g.mul_(min(1.0, 3.0 / (g.norm().item() + 1e-6)))
    for got, want in zip(module.grads[0], ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    params = list(module.parameters())
    assert params[0].grad is None   # zeroed after the step
    assert len(module.grads) == 2
    torch.testing.assert_close(module.grads[1][0].norm(), torch.tensor(3.0), rtol=1e-5, atol=0)
    for w, p, g1, g2 in zip(w0, params, module.grads[0], module.grads[1]):   # the steps used the clipped gradients
        torch.testing.assert_close(p.detach(), w - 0.1 * g1 - 0.1 * g2, rtol=1e-5, atol=1e-6)
