"""Writes the format-version-2 checkpoints of this folder with the code of that version.

Run from a checkout of commit 4019dcb (the last commit writing version 2):
``PYTHONPATH=. python tests/data/v2/make_v2_checkpoints.py OUT_DIR``. The tests load these files
with today's code (tests/test_checkpoint.py::test_version_2_checkpoints_load_after_migration).

Files: ``MoCo.pth`` and ``InstDisc.pth`` (after one step and a --knn-monitor best), ``PIC_sampled.pth``
with its per-rank shard ``PIC_sampled.rank0-of-1.pth`` (version 2 named shards without a step), and
``linear.pth`` (a linear classifier with its ``best``). None has a manifest: version 2 had no checksums.
"""
import os
import sys

import torch
from torch import nn

from contrast.checkpoint import LINEAR, save_training_checkpoint
from contrast.data import ResumableDistributedSampler
from contrast.models import InstDisc, MoCo, PIC, TrainModule
from contrast.models.pic import build_instance_classifier
from contrast.optim import build_scheduler


def encoder():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())


class Linear(TrainModule):
    def __init__(self):
        super().__init__()
        self.backbone = encoder()
        self.fc = nn.Linear(4, 3)

    def forward(self, views, label):
        return {"loss": nn.functional.cross_entropy(self.fc(self.backbone(views[0])), label)}


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
    sampled = build_instance_classifier(6, 3, 0.2, num_negative=2, seed=5)
    methods = {"MoCo": (MoCo(encoder(), 4, feature_dim=3, mlp_head=True, num_negative=8, momentum=0.9,
                             hidden_dim=4), views),
               "InstDisc": (InstDisc(encoder(), 4, num_instances=6, feature_dim=3, num_negative=5), views[:1]),
               "PIC_sampled": (PIC(encoder(), 4, num_instances=6, feature_dim=3, mlp_head=False,
                                   classifier=sampled), views[:1]),
               "linear": (Linear(), views[:1])}
    for name, (method, v) in methods.items():
        opt, sched = step(method, v, index if name != "linear" else torch.tensor([0, 1, 2, 0]))
        sampler = ResumableDistributedSampler(range(6), num_replicas=1, rank=0, seed=3)
        sampler.set_epoch(1)
        config = {"model": name, "arch": "tiny", "stem": "imagenet", "batch_size": 4, "image_size": 8}
        extra = {"knn_best": {"top1": 40.0, "top5": 90.0}} if name != "linear" else \
            {"best": {"acc1": 12.5, "acc5": 50.0, "epoch": 1}}
        if name == "linear":
            config = {"model": "linear", "arch": "tiny", "total_batch_size": 4, "image_size": 8}
        save_training_checkpoint(os.path.join(out, f"{name}.pth"), method, opt, sched, None, sampler, epoch=1,
                                 step=1, config=config, effective_lr=0.1, kind=LINEAR if name == "linear" else
                                 "pretrain", extra=extra)


if __name__ == "__main__":
    main(sys.argv[1])
