"""``main_pretrain.py`` with a tiny backbone, for the fault drill (tests/test_faults.py and
benchmarks/fault_drill.py): real processes, real checkpoints and signals, but a 2-conv backbone
instead of a ResNet, so that a run of a dozen steps with a save after every step takes seconds.

    python tests/fault_runner.py <main_pretrain.py flags>
    python -m torch.distributed.run --nproc_per_node=2 tests/fault_runner.py <flags>

Everything else (methods, heads, data, loop, checkpoints, exit codes) is the real code path.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from torch import nn  # noqa: E402

from contrast.models import base  # noqa: E402


def tiny_backbone(cfg):
    """(backbone, feature width): two strided convolutions with batch norm, global pooling."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten()), 16


base.BaseMethod.build_backbone = staticmethod(tiny_backbone)

import main_pretrain  # noqa: E402
from contrast import engine  # noqa: E402

if __name__ == "__main__":
    sys.argv[0] = "main_pretrain.py"
    engine.run_cli(main_pretrain.main)
