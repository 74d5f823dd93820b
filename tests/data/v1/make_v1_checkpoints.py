"""Writes the format-version-1 checkpoints of this folder with the code of that version.

Run from a checkout of commit c7fc0ed (the last commit writing version 1):
``PYTHONPATH=. python tests/data/v1/make_v1_checkpoints.py OUT_DIR``. The tests load these files
with today's code (tests/test_checkpoint.py::test_version_1_checkpoints_load_after_migration).
"""
import os
import sys

import torch
from torch import nn

from contrast.checkpoint import save_checkpoint
from contrast.models import InstDisc, MoCo, PIC
from contrast.optim import build_scheduler


def encoder():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())


def step(method, views, index):
    opt = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
    sched = build_scheduler(opt, "cosine", 2, 2)
    method(views, index)["loss"].backward()
    opt.step()
    method.on_train_step_end(0, 0.1)
    sched.step()
    return opt, sched


def main(out):
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]
    index = torch.tensor([0, 3, 5, 1])
    methods = {"MoCo": (MoCo(encoder(), 4, feature_dim=3, mlp_head=True, num_negative=8, momentum=0.9), views),
               "InstDisc": (InstDisc(encoder(), 4, num_instances=6, feature_dim=3, num_negative=5), views[:1]),
               "PIC": (PIC(encoder(), 4, num_instances=6, feature_dim=3, mlp_head=True), views[:1])}
    for name, (method, v) in methods.items():
        opt, sched = step(method, v, index)
        config = {"model": name, "arch": "tiny", "stem": "imagenet", "batch_size": 4, "image_size": 8}
        save_checkpoint(os.path.join(out, f"{name}.pth"), method, opt, sched, None, None, epoch=1, step=1,
                        config=config, effective_lr=0.1, extra={"best": {"acc1": 12.5}} if name == "PIC" else None)


if __name__ == "__main__":
    main(sys.argv[1])
