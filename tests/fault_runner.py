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
  half-way through the main file (a disk that became full);
* ``--test-pause-in-save MARKER``: the first save of the process stops half-way through the main
  file (rank 0), creates MARKER and sleeps until the process is killed or exits;
* with ``--on-divergence rollback``, each rollback writes ``<output-dir>/test-rollback-<k>.pt``
  (rank 0): ``{"file": the model tensors of current.pth read from disk just before the rollback,
  "restored": the model's tensors right after it}``.
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


def tiny_backbone(cfg):
    """(backbone, feature width): two strided convolutions with batch norm, global pooling."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten()), 16


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


def inject_enospc(first):
    fault = checkpoint._fault

    def _fault(point):
        fault(point)
        if point == "main" and checkpoint._save_calls >= first:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    checkpoint._fault = _fault


def inject_pause(marker):
    fault = checkpoint._fault

    def _fault(point):
        fault(point)
        if point == "main" and checkpoint._save_calls == 1:
            with open(marker, "w") as f:
                f.write(f"{os.getpid()}\n")
            while True:
                time.sleep(0.1)
    checkpoint._fault = _fault


def record_rollbacks(out):
    roll_back = divergence.Divergence._roll_back

    def _roll_back(self, epoch):
        before = checkpoint.load_file(self.checkpointer.path)["model"] if cd.get_rank() == 0 else None
        roll_back(self, epoch)
        if cd.get_rank() == 0:
            restored = {k: v.detach().clone() for k, v in self.checkpointer.model.state_dict().items()}
            torch.save({"file": before, "restored": restored}, os.path.join(out, f"test-rollback-{self.rollbacks}.pt"))
    divergence.Divergence._roll_back = _roll_back


def main(argv):
    argv = list(argv)
    poison, enospc = _take(argv, "--test-poison"), _take(argv, "--test-enospc-from")
    if poison:
        inject_poison(poison, _output_dir(argv))
    if enospc:
        inject_enospc(int(enospc))
    pause = _take(argv, "--test-pause-in-save")
    if pause:
        inject_pause(pause)
    if "--on-divergence" in argv:
        record_rollbacks(_output_dir(argv))
    engine.run_cli(main_pretrain.main, argv)


if __name__ == "__main__":
    sys.argv[0] = "main_pretrain.py"
    main(sys.argv[1:])
