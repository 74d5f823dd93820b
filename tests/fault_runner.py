"""``main_pretrain.py`` with a tiny backbone, for the fault drill (tests/test_faults.py,
tests/test_exit_paths.py and benchmarks/fault_drill.py): real processes, real checkpoints and
signals, but a 2-conv backbone instead of a ResNet, so that a run of a dozen steps with a save after
every step takes seconds.

    python tests/fault_runner.py [runner flags] <main_pretrain.py flags>
    python -m torch.distributed.run --nproc_per_node=2 tests/fault_runner.py [runner flags] <flags>

Everything else (methods, heads, data, loop, checkpoints, exit codes) is the real code path. The
runner flags inject faults into it (they are removed before ``main_pretrain.py`` parses its flags):

* ``--test-poison E:I[,E:I...]``: the input of iteration I (0-based) of epoch E is NaN, every time
  the loop trains on it (the loss is then non-finite); every batch the loop feeds to the model is
  appended to ``<output-dir>/test-batches.rank<r>.jsonl`` (epoch, iteration, sample indices,
  poisoned);
* ``--test-enospc-from N``: the N-th save of the process and every later one fail with ENOSPC
  half-way through the main file (a disk that became full); ``--test-enospc-at N``: only the N-th;
* ``--test-pause-in-save MARKER``: a save of the process stops (by default the first, half-way
  through the main file on rank 0), creates MARKER and sleeps until the process is killed or exits;
  ``--test-pause-at POINT:N`` picks the N-th save and the point of it (``shards``: per-rank files
  written; ``main``: half of the main file written; ``commit``: main file in place, manifest not
  yet; see :class:`contrast.checkpoint.SaveHooks`);
* ``--test-real-backbone``: keep the method's own backbone (``benchmarks/fault_drill.py`` without
  ``--tiny``) instead of the 2-conv one;
* with ``--on-divergence rollback``, each rollback writes ``<output-dir>/test-rollback-<k>.pt``
  (rank 0): ``{"file": the model tensors of current.pth read from disk just before the rollback,
  "restored": the model's tensors right after it, "file_monitors" / "drifted_monitors" /
  "restored_monitors": the monitors' state in the file, just before and right after it}``.
"""
import errno
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from contrast.models import base  # noqa: E402
from contrast.models.backbone_base import Backbone  # noqa: E402


class TinyBackbone(nn.Sequential, Backbone):
    """Two strided convolutions with batch norm, global pooling, with the backbone interface."""

    family = "tiny"
    feat_dim = 16


def tiny_backbone(cfg):
    """(backbone, feature width) of :class:`TinyBackbone`."""
    return TinyBackbone(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten()), 16


if "--test-real-backbone" in sys.argv:
    sys.argv.remove("--test-real-backbone")
else:
    base.BaseMethod.build_backbone = staticmethod(tiny_backbone)

import main_pretrain  # noqa: E402
from contrast import checkpoint, divergence, engine  # noqa: E402
from contrast import distributed as cd  # noqa: E402


def _take(argv, flag):
    """Remove ``flag VALUE`` from ``argv``; return VALUE (None when absent)."""
    if flag not in argv:
        return None
    i = argv.index(flag)
    value = argv[i + 1]
    del argv[i:i + 2]
    return value


def _output_dir(argv):
    return argv[argv.index("--output-dir") + 1]


def inject_poison(spec, out):
    poisoned = {tuple(int(x) for x in item.split(":")) for item in spec.split(",")}
    inputs = engine.Trainer._inputs

    def _inputs(self, views, index, label, epoch, it):
        views, target = inputs(self, views, index, label, epoch, it)
        bad = (epoch, it) in poisoned
        if bad:
            views = [v * float("nan") for v in views]
        with open(os.path.join(out, f"test-batches.rank{cd.get_rank()}.jsonl"), "a") as f:
            f.write(json.dumps({"epoch": epoch, "it": it, "index": [int(i) for i in index], "poisoned": bad}) + "\n")
        return views, target
    engine.Trainer._inputs = _inputs


class FaultHooks(checkpoint.SaveHooks):
    """Save hooks of the fault drill: they count the saves of this process (``start``) and fail
    or pause the ones the runner flags name."""

    def __init__(self, enospc_from=None, enospc_at=None, pause=None):
        self.saves, self.enospc_from, self.enospc_at = 0, enospc_from, enospc_at
        self.pause = pause  # (point, n, marker)

    def at(self, point):
        if point == "start":
            self.saves += 1
        if self.pause and self.pause[0] == point and self.pause[1] == self.saves:
            with open(self.pause[2], "w") as f:
                f.write(f"{os.getpid()} {point}\n")
            while True:
                time.sleep(0.1)
        if point == "main" and ((self.enospc_from is not None and self.saves >= self.enospc_from)
                                or self.enospc_at == self.saves):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def record_rollbacks(out):
    roll_back = divergence.Divergence._roll_back

    def _roll_back(self, epoch):
        file = checkpoint.load_file(self.checkpointer.path) if cd.get_rank() == 0 else None
        drifted = self.monitors.state_dict()
        roll_back(self, epoch)
        if cd.get_rank() == 0:
            restored = {k: v.detach().clone() for k, v in self.checkpointer.model.state_dict().items()}
            torch.save({"file": file["model"], "restored": restored, "file_monitors": file["extra"].get("monitors"),
                        "drifted_monitors": drifted, "restored_monitors": self.monitors.state_dict()},
                       os.path.join(out, f"test-rollback-{self.rollbacks}.pt"))
    divergence.Divergence._roll_back = _roll_back


def main(argv):
    argv = list(argv)
    poison, enospc_from = _take(argv, "--test-poison"), _take(argv, "--test-enospc-from")
    enospc_at, pause, pause_at = _take(argv, "--test-enospc-at"), _take(argv, "--test-pause-in-save"), \
        _take(argv, "--test-pause-at")
    if poison:
        inject_poison(poison, _output_dir(argv))
    point, nth = (pause_at or "main:1").split(":")
    checkpoint.set_save_hooks(FaultHooks(int(enospc_from) if enospc_from else None,
                                         int(enospc_at) if enospc_at else None,
                                         (point, int(nth), pause) if pause else None))
    if "--on-divergence" in argv:
        record_rollbacks(_output_dir(argv))
    engine.run_cli(main_pretrain.main, argv)


if __name__ == "__main__":
    sys.argv[0] = "main_pretrain.py"
    main(sys.argv[1:])
