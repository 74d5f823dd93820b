"""Trainer.fit: one epoch loop for every entry script (hooks, saves, resume) over a ResumableSampler."""
import ast
import logging
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from contrast import distributed as cd
from contrast import engine
from contrast.checkpoint import read_checkpoint
from contrast.data import build_sampler
from contrast.data.samplers import ResumableDistributedSampler, ResumableSampler, SlidingWindowSampler
from contrast.logger import TensorBoard
from contrast.models.base import TrainModule
from contrast.optim import build_scheduler
from contrast.precision import Precision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Points(Dataset):
    def __init__(self, n: int = 8) -> None:
        self.x = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return [self.x[i]], i, 0


class Regressor(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 1)
        self.started = []

    def on_train_start(self, total_steps: int, steps_per_epoch: int) -> None:
        self.started.append((total_steps, steps_per_epoch))

    def forward(self, views, target):
        return {"loss": self.fc(views[0]).pow(2).mean()}


def make_trainer(out, sampler_of=lambda data: ResumableDistributedSampler(data, 1, 0, seed=0, drop_last=True)):
    torch.manual_seed(0)
    env = cd.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    run = engine.Run(env, logging.getLogger("contrast.test_fit"), TensorBoard("", False), str(out))
    data = Points()
    sampler = sampler_of(data)
    loader = DataLoader(data, batch_size=2, sampler=sampler, drop_last=True)
    module = Regressor()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    scheduler = build_scheduler(optimizer, "cosine", 3, len(loader), samples_per_step=2)
    checkpointer = engine.Checkpointer(run, module, optimizer, scheduler, None, sampler, {}, 0.1, 2)
    trainer = engine.Trainer(module, module, optimizer, scheduler, Precision(None, None), run, engine.LoopOptions(),
                             checkpointer=checkpointer)
    return trainer, loader, checkpointer, module


def test_fit_runs_hooks_saves_and_resumes(tmp_path):
    trainer, loader, checkpointer, module = make_trainer(tmp_path)
    calls = []

    def after_epoch(epoch, stats):
        calls.append((epoch, trainer.state.step, sorted(stats)))
        checkpointer.extra["seen"] = checkpointer.extra.get("seen", []) + [epoch]
    trainer.fit(loader, 2, after_epoch=after_epoch)
    assert [(e, s) for e, s, _ in calls] == [(1, 4), (2, 8)]
    assert "loss" in calls[0][2] and module.started == [(8, 4)]
    ckpt = read_checkpoint(str(tmp_path / "current.pth"))
    assert (ckpt.epoch, ckpt.step, ckpt.extra["seen"]) == (2, 8, [1, 2])

    trainer, loader, checkpointer, module = make_trainer(tmp_path)   # a new process: --auto-resume
    calls.clear()
    trainer.fit(loader, 3, engine.ResumeOptions(auto=True), after_epoch=after_epoch)
    assert [(e, s) for e, s, _ in calls] == [(3, 12)]
    assert checkpointer.extra["seen"] == [1, 2, 3] and module.started == [(12, 4)]
    assert read_checkpoint(str(tmp_path / "current.pth")).step == 12


def test_fit_start_epoch_fast_forwards_the_schedule(tmp_path):
    trainer, loader, _, _ = make_trainer(tmp_path)
    epochs = []
    trainer.fit(loader, 3, start_epoch=3, after_epoch=lambda e, s: epochs.append((e, trainer.state.step)))
    assert epochs == [(3, 12)] and trainer.scheduler.last_epoch == 12


def test_fit_requires_a_resumable_sampler(tmp_path):
    trainer, _, _, _ = make_trainer(tmp_path)
    data = Points()
    with pytest.raises(TypeError, match="ResumableSampler"):
        trainer.fit(DataLoader(data, batch_size=2, sampler=SequentialSampler(data)), 1)


def test_training_samplers_are_resumable():
    data = Points(16)
    assert isinstance(build_sampler(data, False, 0, 0, 0, False, 1, 0), ResumableDistributedSampler)
    assert isinstance(build_sampler(data, True, 8, 4, 0, False, 1, 0), SlidingWindowSampler)
    assert all(issubclass(c, ResumableSampler) for c in (ResumableDistributedSampler, SlidingWindowSampler))


@pytest.mark.parametrize("path", ["contrast/trainer.py", "contrast/checkpointer.py"])
def test_no_probing_in_the_loop(path):
    """The loop and the checkpoint writer call the sampler's and scheduler's methods, never probe for them."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    probes = [(n.lineno, n.args[1].value) for n in ast.walk(tree) if isinstance(n, ast.Call)
              and isinstance(n.func, ast.Name) and n.func.id in ("hasattr", "getattr") and len(n.args) > 1
              and isinstance(n.args[1], ast.Constant)]
    assert [p for p in probes if p[1] != "num_corrupt"] == []


@pytest.mark.parametrize("script", ["main_pretrain.py", "main_linear.py"])
def test_entry_scripts_leave_the_epoch_loop_to_fit(script):
    source = open(os.path.join(ROOT, script)).read()
    assert "trainer.fit(" in source and "set_epoch" not in source and "train_epoch" not in source
