"""contrast.placement: moving modules to the training device, and the meta-device probe itself."""
import pytest
import torch
from torch import nn

from contrast.placement import PlacementError, configure_backends, place
from tests.device_probe import meta_device


def test_a_module_left_on_the_host_fails_on_the_second_device(monkeypatch):
    """The probe itself: a CPU buffer meeting a meta tensor raises (what a CUDA run does)."""
    class Shift(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.zeros(1, 3, 1, 1))

        def forward(self, x):
            return x - self.mean

    with meta_device(monkeypatch), pytest.raises(RuntimeError, match="not on the expected device"):
        Shift()(torch.ones(2, 3, 4, 4, device="meta"))
    assert place(Shift(), torch.device("meta")).mean.is_meta


def test_place_names_a_tensor_that_did_not_move():
    class Pinned(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.zeros(2))

        def _apply(self, fn, recurse=True):   # a module whose .to() leaves its buffer behind
            return self

    with pytest.raises(PlacementError, match=r"buffer table \(cpu\)"):
        place(Pinned(), torch.device("meta"))


def test_cudnn_benchmark_on_cuda_unless_deterministic(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert "cudnn.benchmark on" in configure_backends(torch.device("cuda", 0))
    assert torch.backends.cudnn.benchmark is True
    assert "no backend switches" in configure_backends(torch.device("cpu"))
    try:
        assert "--deterministic" in configure_backends(torch.device("cuda", 0), deterministic=True)
        assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
