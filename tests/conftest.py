"""Shared test fixtures."""
import os
import pathlib
import sys

import pytest
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Two cores on CI: keep every test single-threaded so parallel processes don't thrash.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def trained_looking_backbone(arch: str = "resnet18", stem: str = "imagenet", seed: int = 11) -> nn.Module:
    """A backbone with non-trivial batch-norm statistics and affine parameters (eval mode)."""
    from contrast.models import build_backbone
    torch.manual_seed(seed)
    backbone, _ = build_backbone(arch, stem=stem)
    for m in backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
            m.num_batches_tracked.fill_(7)
    return backbone.eval()


@pytest.fixture
def pretrained_checkpoint():
    """``make(path, backbone, config, epoch=3, head_dim=8, prefix="module.")``: a method-like pretraining
    checkpoint (the backbone + a linear head, keys with a DDP prefix) written through contrast.checkpoint."""
    from contrast.checkpoint import write_pretrained_checkpoint

    def make(path, backbone: nn.Module, config: dict, epoch: int = 3, head_dim: int = 8, prefix: str = "module."):
        method = nn.Module()
        method.backbone = backbone
        method.head = nn.Linear(backbone(torch.zeros(1, 3, 32, 32)).shape[1] if head_dim else 1, max(head_dim, 1))
        state = {prefix + k: v for k, v in method.state_dict().items()}
        write_pretrained_checkpoint(str(path), state, config, epoch)
        return str(path)

    return make


class _PretrainedRun:
    def __init__(self, root, method):
        from tests.test_cli_pretrain import pretrain
        self.root, self.method = root, method
        self.dir = pathlib.Path(pretrain(root, method))
        self._evaluated = None

    def evaluated(self):
        """(checkpoint, kNN result) of main_knn.py and main_linear.py on the run, evaluated once."""
        if self._evaluated is None:
            from tests.test_cli_pretrain import evaluate
            self._evaluated = evaluate(self.root, str(self.dir), self.method)
        return self._evaluated


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory):
    """``pretrained_run(method)``: the tiny one-epoch run of ``test_cli_pretrain.METHOD_FLAGS[method]``, made once
    per session and shared by the generic CLI test and the method's own test (``.evaluated()``: kNN + linear)."""
    runs = {}

    def get(method):
        if method not in runs:
            torch.manual_seed(0)
            runs[method] = _PretrainedRun(tmp_path_factory.mktemp(f"pretrained-{method}"), method)
        return runs[method]
    return get


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or end-to-end")
