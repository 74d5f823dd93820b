"""Checkpoints keep this process's CUDA RNG state only, so a resume with fewer GPUs works (issue 29).

``torch.cuda`` is replaced by a stand-in with N visible devices whose ``set_rng_state`` indexes its
generators as torch's does (``torch.cuda.default_generators[index]``): restoring 8 devices' states
on a node with 4 raised IndexError.
"""
import pytest
import torch

from contrast import checkpoint as ck


class FakeCuda:
    """N visible GPUs, each with its own RNG state (a 1-byte tensor), and a current device."""

    def __init__(self, count: int, current: int = 0) -> None:
        self.count, self.current = count, current
        self.states = {i: torch.tensor([10 + i], dtype=torch.uint8) for i in range(count)}

    def _index(self, device) -> int:
        return self.current if device == "cuda" else int(device)

    def get_rng_state(self, device="cuda"):
        return self.states[self._index(device)].clone()

    def set_rng_state(self, state, device="cuda"):
        index = self._index(device)
        if index >= self.count:
            raise IndexError("list index out of range")
        self.states[index] = state.clone()

    def get_rng_state_all(self):
        return [self.get_rng_state(i) for i in range(self.count)]

    def set_rng_state_all(self, states):
        for i, state in enumerate(states):
            self.set_rng_state(state, i)

    def install(self, monkeypatch) -> "FakeCuda":
        for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        return self


def test_resume_on_fewer_gpus_restores_this_ranks_state(monkeypatch):
    FakeCuda(8, current=3).install(monkeypatch)     # rank 3 of a torchrun job that sees the node's 8 GPUs
    saved = ck.rng_state()
    after = FakeCuda(4, current=0).install(monkeypatch)   # requeued with one GPU per task
    ck.set_rng_state(saved)
    assert after.states[0].item() == 13 and [s.item() for s in after.states.values()][1:] == [11, 12, 13]


def test_an_old_checkpoint_with_every_gpus_state_still_loads(monkeypatch):
    FakeCuda(8, current=0).install(monkeypatch)
    old = dict(ck.rng_state(), cuda=[torch.tensor([20 + i], dtype=torch.uint8) for i in range(8)])
    after = FakeCuda(4, current=2).install(monkeypatch)
    ck.set_rng_state(old)
    assert after.states[2].item() == 22 and after.states[0].item() == 10
    after = FakeCuda(1, current=0).install(monkeypatch)
    ck.set_rng_state(dict(old, cuda=old["cuda"][:1]))
    assert after.states[0].item() == 20
    ck.set_rng_state(dict(old, cuda=None))   # saved without CUDA: nothing to restore


def test_the_stand_in_reproduces_the_crash_of_restoring_all_states(monkeypatch):
    FakeCuda(8).install(monkeypatch)
    states = torch.cuda.get_rng_state_all()
    FakeCuda(4).install(monkeypatch)
    with pytest.raises(IndexError):
        torch.cuda.set_rng_state_all(states)
