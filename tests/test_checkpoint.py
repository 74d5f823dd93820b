"""Atomic writes, clear errors for bad files, backbone extraction, per-rank shards (2 gloo ranks)."""
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from contrast import checkpoint as ck
from contrast.models import TrainModule, build_backbone
from contrast.optim import build_scheduler
from tests.dist_utils import run_distributed


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pth")
    ck.atomic_save({"a": torch.ones(2)}, path)
    assert os.listdir(tmp_path) == ["c.pth"]

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ck.atomic_save({"a": torch.zeros(2)}, path)
    assert torch.equal(ck.load_file(path)["a"], torch.ones(2))  # the previous checkpoint is intact


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(ck.CheckpointError, match="checkpoint file not found: .*nothing.pth"):
        ck.load_file(str(tmp_path / "nothing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(ck.CheckpointError, match=r"junk\.pth: not a readable PyTorch checkpoint"):
        ck.load_file(str(junk))
    listed = tmp_path / "list.pth"
    torch.save([1, 2], listed)
    with pytest.raises(ck.CheckpointError, match=r"list\.pth: expected a checkpoint dict"):
        ck.load_file(str(listed))


def test_pretrained_backbone_loading(tmp_path):
    r18, _ = build_backbone("resnet18")
    method_state = {f"backbone.{k}": v.clone() for k, v in r18.state_dict().items()}
    method_state["head.weight"] = torch.zeros(3, 3)
    path = str(tmp_path / "m.pth")
    ck.write_pretrained_checkpoint(path, method_state, {"model": "PIC", "arch": "resnet18", "stem": "imagenet"}, 5)
    fresh, _ = build_backbone("resnet18")
    n = ck.load_pretrained_backbone(fresh, path)
    assert n == len(r18.state_dict())
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in r18.state_dict().items())

    r34, _ = build_backbone("resnet34")
    with pytest.raises(ck.CheckpointError, match=r"m\.pth: checkpoint does not fit this model \(the checkpoint "
                                                 r"holds model=PIC, arch=resnet18, stem=imagenet\).*missing"):
        ck.load_pretrained_backbone(r34, path)
    small, _ = build_backbone("resnet18", stem="small")
    with pytest.raises(ck.CheckpointError, match=r"m\.pth.*1 shape mismatch \(e\.g\. conv1\.weight"):
        ck.load_pretrained_backbone(small, path)
    ck.write_pretrained_checkpoint(path, {"fc.weight": torch.zeros(2, 2)}, {}, 1)
    with pytest.raises(ck.CheckpointError, match=r"m\.pth: no 'backbone\.' tensors"):
        ck.load_pretrained_backbone(fresh, path)
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ck.CheckpointError, match=r"m\.pth: no format version; not a checkpoint written by contrast"):
        ck.load_pretrained_backbone(fresh, path)


def test_newer_or_unknown_versions_are_refused(tmp_path, monkeypatch):
    path = str(tmp_path / "v.pth")
    ck.write_pretrained_checkpoint(path, {"backbone.w": torch.ones(1)}, {}, 1)
    monkeypatch.setattr(ck, "VERSION", ck.VERSION - 1)
    with pytest.raises(ck.CheckpointError, match=rf"v\.pth: format version {ck.VERSION + 1} is newer"):
        ck.read_checkpoint(path)
    monkeypatch.setattr(ck, "VERSION", ck.VERSION + 2)
    monkeypatch.setattr(ck, "MIGRATIONS", {})
    with pytest.raises(ck.CheckpointError, match=r"no migration from format version"):
        ck.read_checkpoint(path)


V1 = os.path.join(os.path.dirname(__file__), "data", "v1")


def _tiny_encoder():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())


def test_version_1_checkpoints_load_after_migration():
    """Files written by the version-1 code (tests/data/v1/make_v1_checkpoints.py) load into today's methods."""
    from contrast.models import InstDisc, MoCo, PIC
    raw = {name: torch.load(os.path.join(V1, f"{name}.pth"), weights_only=False) for name in ("MoCo", "InstDisc", "PIC")}
    assert all(r["version"] == 1 for r in raw.values())

    ckpt = ck.read_checkpoint(os.path.join(V1, "MoCo.pth"))
    assert ckpt.config["mlp_hidden_dim"] == 4  # version 1 heads were as wide as the backbone
    moco = MoCo(_tiny_encoder(), 4, feature_dim=3, mlp_head=True, num_negative=8, momentum=0.9, hidden_dim=4)
    ck.restore_training_state(ckpt, moco, torch.optim.SGD(moco.parameters(), lr=0.1, momentum=0.9), restore_rng=False)
    old = raw["MoCo"]["model"]
    assert torch.equal(moco.key_encoder.backbone[0].weight, old["backbone_k.0.weight"])
    assert torch.equal(moco.key_encoder.head[2].bias, old["head_k.2.bias"])
    assert torch.equal(moco.queue.features, old["queue"]) and int(moco.queue.ptr) == int(old["queue_ptr"]) == 4
    assert torch.equal(moco.backbone[1].running_mean, old["backbone.1.running_mean"])
    assert ckpt.kind == ck.PRETRAIN and ckpt.epoch == 1 and ckpt.step == 1 and ckpt.config["model"] == "MoCo"

    instdisc = InstDisc(_tiny_encoder(), 4, num_instances=6, feature_dim=3, num_negative=5)
    ckpt = ck.read_checkpoint(os.path.join(V1, "InstDisc.pth"))
    ck.restore_training_state(ckpt, instdisc, restore_rng=False)
    assert torch.equal(instdisc.bank, raw["InstDisc"]["model"]["bank"]) and int(instdisc.neg_draws) == 0

    pic = PIC(_tiny_encoder(), 4, num_instances=6, feature_dim=3, mlp_head=True, hidden_dim=4)
    ckpt = ck.read_checkpoint(os.path.join(V1, "PIC.pth"))
    ck.restore_training_state(ckpt, pic, restore_rng=False)
    assert torch.equal(pic.classifier.weight, raw["PIC"]["model"]["classifier.weight"])
    assert ckpt.extra == {"best": {"acc1": 12.5}}


def test_todays_format_round_trips(tmp_path):
    """What save_training_checkpoint writes, read_checkpoint returns: model, counters, config, extras."""
    from contrast.models import MoCo
    moco = MoCo(_tiny_encoder(), 4, feature_dim=3, num_negative=8)
    opt = torch.optim.SGD(moco.parameters(), lr=0.1, momentum=0.9)
    sched = build_scheduler(opt, "cosine", 2, 2)
    path = str(tmp_path / "c.pth")
    ck.save_training_checkpoint(path, moco, opt, sched, None, None, epoch=2, step=7, config={"model": "MoCo",
                                "batch_size": 4}, effective_lr=0.25, extra={"knn_best": 50.0})
    ckpt = ck.read_checkpoint(path)
    assert (ckpt.kind, ckpt.epoch, ckpt.step, ckpt.world_size, ckpt.effective_lr) == (ck.PRETRAIN, 2, 7, 1, 0.25)
    assert ckpt.extra == {"knn_best": 50.0} and ckpt.images_seen == 28
    assert ckpt.model.keys() == moco.state_dict().keys()
    assert all(torch.equal(ckpt.model[k], v) for k, v in moco.state_dict().items())


def test_rng_round_trip():
    state = ck.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    ck.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_resume_path(tmp_path):
    assert ck.resume_path("", True, str(tmp_path)) is None
    (tmp_path / "current.pth").write_bytes(b"x")
    assert ck.resume_path("", True, str(tmp_path)) == str(tmp_path / "current.pth")
    assert ck.resume_path("other.pth", True, str(tmp_path)) == "other.pth"
    assert ck.resume_path("", False, str(tmp_path)) is None


class _Sharded(TrainModule):
    """A model with per-rank state, like the sharded PIC classifier."""

    def __init__(self, rank):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.shard = torch.full((2,), float(rank))
        self.loaded = None

    def rank_state_dict(self):
        return {"shard": self.shard.clone()}

    def load_rank_state_dicts(self, shards):
        self.loaded = [s["shard"] for s in shards]


class _Sampler:
    def __init__(self, rank):
        self.state = {"rank": rank, "epoch": 0}

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, s):
        self.state = dict(s)


def _shard_worker(rank, world, out_dir, ckpt_dir):
    torch.manual_seed(rank)
    model = _Sharded(rank)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = build_scheduler(opt, "cosine", 2, 2)
    path = os.path.join(ckpt_dir, "current.pth")
    ck.save_training_checkpoint(path, model, opt, sched, None, _Sampler(rank), epoch=3, step=6, config={"x": 1},
                                effective_lr=0.1)
    after_save = torch.rand(2)  # the saved RNG state is this rank's, taken before this draw
    fresh, sampler = _Sharded(-1), _Sampler(-1)
    torch.manual_seed(99)
    ckpt = ck.read_checkpoint(path)
    ck.restore_training_state(ckpt, fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), None, None, sampler)
    torch.save({"loaded": fresh.loaded, "sampler": sampler.state, "rand": torch.rand(2), "after_save": after_save,
                "epoch": ckpt.epoch, "files": sorted(os.listdir(ckpt_dir))}, os.path.join(out_dir, f"{rank}.pt"))


def test_sharded_save_and_load_two_ranks(tmp_path):
    res = run_distributed(_shard_worker, 2, args=(str(tmp_path),))
    assert res[0]["files"] == ["current.pth", "current.rank0-of-2.pth", "current.rank1-of-2.pth"]
    for rank, r in enumerate(res):
        assert [s.tolist() for s in r["loaded"]] == [[0.0, 0.0], [1.0, 1.0]]  # every rank gets all shards
        assert r["sampler"]["rank"] == rank  # each rank gets back its own sampler state
        assert torch.equal(r["rand"], r["after_save"])  # and its own RNG stream
        assert r["epoch"] == 3
