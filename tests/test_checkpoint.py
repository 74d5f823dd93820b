"""Atomic writes, manifests and checksums, damaged files, crash recovery, fallback, clear errors for bad
files, backbone extraction, format migrations, per-rank shards (2 gloo ranks)."""
import errno
import os
import random
import re

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


def _load_backbone(backbone, path):
    """What the evaluation tools do with a pretraining checkpoint: its backbone into ``backbone``."""
    ckpt = ck.read_checkpoint(path)
    weights = ckpt.backbone_state()
    ck.load_model_state(backbone, weights, path, ckpt.config)
    return len(weights)


def test_pretrained_backbone_loading(tmp_path):
    r18, _ = build_backbone("resnet18")
    method_state = {f"backbone.{k}": v.clone() for k, v in r18.state_dict().items()}
    method_state["head.weight"] = torch.zeros(3, 3)
    path = str(tmp_path / "m.pth")
    ck.write_pretrained_checkpoint(path, method_state, {"model": "PIC", "arch": "resnet18", "stem": "imagenet"}, 5)
    fresh, _ = build_backbone("resnet18")
    n = _load_backbone(fresh, path)
    assert n == len(r18.state_dict())
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in r18.state_dict().items())

    r34, _ = build_backbone("resnet34")
    with pytest.raises(ck.CheckpointError, match=r"m\.pth: checkpoint does not fit this model \(the checkpoint "
                                                 r"holds model=PIC, arch=resnet18, stem=imagenet\).*missing"):
        _load_backbone(r34, path)
    small, _ = build_backbone("resnet18", stem="small")
    with pytest.raises(ck.CheckpointError, match=r"m\.pth.*1 shape mismatch \(e\.g\. conv1\.weight"):
        _load_backbone(small, path)
    ck.write_pretrained_checkpoint(path, {"fc.weight": torch.zeros(2, 2)}, {}, 1)
    with pytest.raises(ck.CheckpointError, match=r"m\.pth: no 'backbone\.' tensors"):
        _load_backbone(fresh, path)
    release = str(tmp_path / "release.pth")
    torch.save({"state_dict": {}}, release)
    with pytest.raises(ck.CheckpointError, match=r"release\.pth: no format version; not a checkpoint written by "
                                                 r"contrast"):
        _load_backbone(fresh, release)
    torch.save({"state_dict": {}}, path)  # over a file its manifest vouches for: reported, not loaded
    with pytest.raises(ck.CheckpointError, match=r"m\.pth: checksum mismatch"):
        _load_backbone(fresh, path)


def test_newer_or_unknown_versions_are_refused(tmp_path, monkeypatch):
    path = str(tmp_path / "v.pth")
    ck.write_pretrained_checkpoint(path, {"backbone.w": torch.ones(1)}, {}, 1)
    monkeypatch.setattr(ck.format, "VERSION", ck.VERSION - 1)
    with pytest.raises(ck.CheckpointError, match=rf"v\.pth: format version {ck.format.VERSION + 1} is newer"):
        ck.read_checkpoint(path)
    monkeypatch.setattr(ck.format, "VERSION", ck.VERSION + 2)
    monkeypatch.setattr(ck.format, "MIGRATIONS", {})
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
    files = sorted(os.listdir(ckpt_dir))
    fresh, sampler = _Sharded(-1), _Sampler(-1)
    torch.manual_seed(99)
    ckpt = ck.read_checkpoint(path)
    ck.restore_training_state(ckpt, fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), None, None, sampler)
    out = {"loaded": fresh.loaded, "sampler": sampler.state, "rand": torch.rand(2), "after_save": after_save,
           "epoch": ckpt.epoch, "files": files}
    torch.distributed.barrier()  # every rank has listed the folder before rank 0 starts the next save
    # a save that rank 1 cannot write (disk full) fails on every rank and changes nothing
    real_save = torch.save

    def full_disk_on_rank1(obj, f, *a, **kw):
        if rank == 1 and isinstance(obj, dict) and obj.get("rank") == 1:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **kw)
    torch.save = full_disk_on_rank1
    try:
        ck.save_training_checkpoint(path, model, opt, sched, None, _Sampler(rank), epoch=3, step=7, config={},
                                    effective_lr=0.1)
        out["failed"] = None
    except ck.CheckpointSaveError as e:
        out["failed"] = str(e)
    finally:
        torch.save = real_save
    torch.distributed.barrier()
    out["after_failure"] = sorted(os.listdir(ckpt_dir))
    out["step_after_failure"] = ck.read_checkpoint(path).step
    torch.distributed.barrier()
    # the next save (step 8) replaces the set: the step-6 per-rank files go
    ck.save_training_checkpoint(path, model, opt, sched, None, _Sampler(rank), epoch=4, step=8, config={},
                                effective_lr=0.1)
    out["after_next"] = sorted(os.listdir(ckpt_dir))
    torch.save(out, os.path.join(out_dir, f"{rank}.pt"))


def test_sharded_save_and_load_two_ranks(tmp_path):
    res = run_distributed(_shard_worker, 2, args=(str(tmp_path),))
    assert res[0]["files"] == ["current.manifest.json", "current.pth", "current.step6.rank0-of-2.pth",
                               "current.step6.rank1-of-2.pth"]
    for rank, r in enumerate(res):
        assert [s.tolist() for s in r["loaded"]] == [[0.0, 0.0], [1.0, 1.0]]  # every rank gets all shards
        assert r["sampler"]["rank"] == rank  # each rank gets back its own sampler state
        assert torch.equal(r["rand"], r["after_save"])  # and its own RNG stream
        assert r["epoch"] == 3
        assert r["failed"] == "checkpoint not saved: " + os.path.join(str(tmp_path), "current.step7.rank1-of-2.pth") \
            + ": [Errno 28] No space left on device"
        assert r["after_failure"] == r["files"] and r["step_after_failure"] == 6  # nothing left behind
    assert res[0]["after_next"] == ["current.manifest.json", "current.pth", "current.step8.rank0-of-2.pth",
                                    "current.step8.rank1-of-2.pth"]
    manifest = ck.read_manifest(str(tmp_path / "current.pth"))
    assert [(e["name"], e["step"]) for e in manifest["files"]] == [
        ("current.pth", 8), ("current.step8.rank0-of-2.pth", 8), ("current.step8.rank1-of-2.pth", 8)]
    # a per-rank file of another save put in place of one of the set is refused, naming the file
    shard = tmp_path / "current.step8.rank1-of-2.pth"
    torch.save({"version": 3, "step": 20, "rank": 1, "world_size": 2, "state": {"shard": torch.ones(2)}}, shard)
    with pytest.raises(ck.CheckpointError, match=r"current\.step8\.rank1-of-2\.pth: checksum mismatch: .*it holds "
                                                 r"step 20; current\.manifest\.json \(step 8\) does not match it"):
        ck.read_checkpoint(str(tmp_path / "current.pth"))


# ----------------------------------------------------------------------------------- version 3 files
V2 = os.path.join(os.path.dirname(__file__), "data", "v2")


def test_version_2_checkpoints_load_after_migration(tmp_path):
    """Files written by the version-2 code (tests/data/v2/make_v2_checkpoints.py, no manifest, per-rank
    file without a step) load into today's methods and resume with the samples seen they imply."""
    import shutil
    from contrast.models import InstDisc, MoCo, PIC
    from contrast.models.pic import build_instance_classifier
    raw = {n: torch.load(os.path.join(V2, f"{n}.pth"), weights_only=False)
           for n in ("MoCo", "InstDisc", "PIC_sampled", "linear")}
    assert all(r["version"] == 2 for r in raw.values())

    ckpt = ck.read_checkpoint(os.path.join(V2, "MoCo.pth"))
    assert not ckpt.verified and not ckpt.mid_epoch and (ckpt.total_batch, ckpt.samples_seen) == (4, 4)
    assert ckpt.extra == {"knn_best": {"top1": 40.0, "top5": 90.0}}
    moco = MoCo(_tiny_encoder(), 4, feature_dim=3, mlp_head=True, num_negative=8, momentum=0.9, hidden_dim=4)
    opt = torch.optim.SGD(moco.parameters(), lr=0.1, momentum=0.9)
    sched = build_scheduler(opt, "cosine", 2, 2, samples_per_step=4)
    ck.restore_training_state(ckpt, moco, opt, sched, restore_rng=False)
    assert torch.equal(moco.queue.features, raw["MoCo"]["model"]["queue.features"])
    assert sched.last_epoch == 1 and sched.samples_seen == 4

    instdisc = InstDisc(_tiny_encoder(), 4, num_instances=6, feature_dim=3, num_negative=5)
    ck.restore_training_state(ck.read_checkpoint(os.path.join(V2, "InstDisc.pth")), instdisc, restore_rng=False)
    assert int(instdisc.neg_draws) == int(raw["InstDisc"]["model"]["neg_draws"]) == 1

    pic = PIC(_tiny_encoder(), 4, num_instances=6, feature_dim=3, mlp_head=False,
              classifier=build_instance_classifier(6, 3, 0.2, num_negative=2, seed=5))
    ckpt = ck.read_checkpoint(os.path.join(V2, "PIC_sampled.pth"))
    assert ckpt.shard_files == [os.path.join(V2, "PIC_sampled.rank0-of-1.pth")]
    ck.restore_training_state(ckpt, pic, restore_rng=False)
    shard = torch.load(os.path.join(V2, "PIC_sampled.rank0-of-1.pth"), weights_only=False)
    assert torch.equal(pic.classifier.queue, shard["queue"]) and pic.classifier.seed == 5

    lin = ck.read_checkpoint(os.path.join(V2, "linear.pth"))
    assert lin.kind == ck.LINEAR and lin.extra["best"]["acc1"] == 12.5 and lin.total_batch == 4

    # resumed and saved again, a version-2 folder becomes version 3: manifest, step-named shard
    work = tmp_path / "v2run"
    work.mkdir()
    for f in ("PIC_sampled.pth", "PIC_sampled.rank0-of-1.pth"):
        shutil.copy(os.path.join(V2, f), work / f)
    opt = torch.optim.SGD(pic.parameters(), lr=0.1)
    sched = build_scheduler(opt, "cosine", 2, 2, samples_per_step=4)
    ck.save_training_checkpoint(str(work / "PIC_sampled.pth"), pic, opt, sched, None, None, epoch=2, step=2,
                                config={"batch_size": 4}, effective_lr=0.1)
    assert sorted(os.listdir(work)) == ["PIC_sampled.manifest.json", "PIC_sampled.pth",
                                        "PIC_sampled.step2.rank0-of-1.pth"]
    assert ck.read_checkpoint(str(work / "PIC_sampled.pth")).verified


def _save(path, step, model=None, epoch=None, consumed=None):
    model = model if model is not None else _Sharded(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = build_scheduler(opt, "cosine", 2, 2, samples_per_step=4)
    ck.save_training_checkpoint(str(path), model, opt, sched, None, None, epoch=step if epoch is None else epoch,
                                step=step, config={"batch_size": 4}, effective_lr=0.1, consumed=consumed,
                                samples_seen=4 * step, total_batch=4)
    return model


def test_manifest_checksums_and_plain_torch_load(tmp_path):
    path = tmp_path / "current.pth"
    _save(path, 5)
    manifest = ck.read_manifest(str(path))
    assert manifest["step"] == 5 and [e["name"] for e in manifest["files"]] == ["current.pth",
                                                                               "current.step5.rank0-of-1.pth"]
    for e in manifest["files"]:
        assert (e["bytes"], e["sha256"]) == ck.file_digest(str(tmp_path / e["name"]))
    plain = torch.load(path, weights_only=False)  # no custom container: users can still torch.load it
    assert plain["version"] == ck.VERSION and plain["step"] == 5 and plain["samples_seen"] == 20
    assert ck.read_checkpoint(str(path)).verified


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"current\.pth: checksum mismatch: \d+ bytes instead of \d+ \(truncated or replaced\)"),
    ("empty", r"current\.pth: checksum mismatch: 0 bytes instead of"),
    ("overwrite4k", r"current\.pth: checksum mismatch: SHA-256 .* \(damaged or edited\)"),
    ("flip1bit", r"current\.pth: checksum mismatch: SHA-256"),
    ("delete", r"current\.pth: missing; current\.manifest\.json \(step 5\) lists it"),
    ("shard", r"current\.step5\.rank0-of-1\.pth: checksum mismatch"),
    ("manifest", r"current\.manifest\.json: unreadable checkpoint manifest"),
])
def test_damaged_files_are_reported_not_loaded(damage, message, tmp_path):
    path = tmp_path / "current.pth"
    _save(path, 5)
    size = os.path.getsize(path)
    if damage == "truncate":
        os.truncate(path, size // 2)
    elif damage == "empty":
        os.truncate(path, 0)
    elif damage == "overwrite4k":
        with open(path, "r+b") as f:
            f.seek(size // 3)
            f.write(os.urandom(4096)[: size - size // 3])
    elif damage == "flip1bit":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
    elif damage == "delete":
        os.remove(path)
    elif damage == "shard":
        with open(tmp_path / "current.step5.rank0-of-1.pth", "r+b") as f:
            f.seek(100)
            f.write(b"\0" * 64)
    elif damage == "manifest":
        (tmp_path / "current.manifest.json").write_text("{ not json")
    with pytest.raises(ck.CheckpointError, match=message):
        ck.read_checkpoint(str(path))


class _Crash(BaseException):
    """What a kill -9 leaves: the save stops at the fault point, nothing runs after it."""


@pytest.mark.parametrize("point", ["shards", "main", "commit"])
def test_recovery_after_a_crash_inside_a_save(point, tmp_path):
    path = tmp_path / "current.pth"
    model = _save(path, 5)

    class Crash(ck.SaveHooks):
        def at(self, p):
            if p == point:
                raise _Crash
    previous = ck.set_save_hooks(Crash())
    try:
        with pytest.raises(_Crash):
            _save(path, 6, model)
    finally:
        ck.set_save_hooks(previous)
    left = sorted(os.listdir(tmp_path))
    notes = ck.recover_output_dir(str(tmp_path))
    ckpt = ck.read_checkpoint(str(path))
    if point == "commit":  # main file renamed, manifest not yet: the save is completed
        assert "current.manifest.json.tmp" in left and ckpt.step == 6
        assert any("completed the interrupted save" in n for n in notes)
    else:  # the previous set is intact; the new per-rank file and temporary files are removed
        assert ckpt.step == 5
        assert "current.step6.rank0-of-1.pth" in left
        assert any("a per-rank file of a save that never completed" in n for n in notes)
    assert sorted(os.listdir(tmp_path)) == ["current.manifest.json", "current.pth",
                                            f"current.step{ckpt.step}.rank0-of-1.pth"]


def test_save_hooks_see_every_point_of_a_save_in_order(tmp_path):
    seen = []

    class Record(ck.SaveHooks):
        def at(self, point):
            seen.append(point)
    previous = ck.set_save_hooks(Record())
    try:
        _save(tmp_path / "current.pth", 5)
    finally:
        assert isinstance(ck.set_save_hooks(previous), Record)
    assert seen == ["start", "shards", "main", "commit"]


def test_failed_save_removes_its_partial_file_and_keeps_the_previous(tmp_path):
    path = tmp_path / "current.pth"
    model = _save(path, 5)
    before = sorted(os.listdir(tmp_path))

    class FullDisk(ck.SaveHooks):
        def at(self, point):
            if point == "main":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    previous = ck.set_save_hooks(FullDisk())
    try:
        with pytest.raises(ck.CheckpointSaveError) as e:
            _save(path, 6, model)
    finally:
        ck.set_save_hooks(previous)
    assert str(e.value) == f"checkpoint not saved: {path}: [Errno 28] No space left on device"
    assert sorted(os.listdir(tmp_path)) == before and ck.read_checkpoint(str(path)).step == 5


def test_copy_keep_last_and_choose_resume(tmp_path):
    out = str(tmp_path)
    current = os.path.join(out, "current.pth")
    model = _Sharded(0)
    for epoch in (1, 2, 3):
        _save(current, 2 * epoch, model, epoch=epoch)
        ck.copy_checkpoint(current, os.path.join(out, f"ckpt_epoch_{epoch}.pth"))
        ck.prune_epoch_checkpoints(out, keep_last=2)
    assert [e for e, _ in ck.epoch_checkpoints(out)] == [2, 3]
    assert not any(f.startswith("ckpt_epoch_1") for f in os.listdir(out))
    snap = ck.read_checkpoint(os.path.join(out, "ckpt_epoch_3.pth"))
    assert snap.verified and snap.step == 6 and snap.shard_files == [os.path.join(out, "ckpt_epoch_3.step6.rank0-of-1.pth")]
    _save(current, 7, model, epoch=3, consumed=4)  # a mid-epoch save after the last epoch checkpoint

    # no flag: refused, the folder holds checkpoints
    with pytest.raises(ck.CheckpointError, match=r"already holds checkpoints .*--auto-resume.*--restart"):
        ck.choose_resume(out)
    # auto-resume: the newest valid one
    choice = ck.choose_resume(out, auto_resume=True)
    assert choice.checkpoint.step == 7 and choice.checkpoint.mid_epoch and not choice.warnings
    # current damaged: the newest valid epoch checkpoint, with a warning naming both
    with open(current, "r+b") as f:
        f.seek(200)
        f.write(os.urandom(4096))
    choice = ck.choose_resume(out, auto_resume=True)
    assert choice.checkpoint.path.endswith("ckpt_epoch_3.pth")
    assert re.search(r"current\.pth: checksum mismatch.*; resuming from .*ckpt_epoch_3\.pth \(epoch 3, step 6\) "
                     r"instead", choice.warnings[0])
    # current deleted (with its manifest): the same, not a fresh start
    ck.remove_checkpoint(current)
    assert ck.choose_resume(out, auto_resume=True).checkpoint.path.endswith("ckpt_epoch_3.pth")
    # nothing usable: refused
    for _, p in ck.epoch_checkpoints(out):
        os.truncate(p, 10)
    with pytest.raises(ck.CheckpointError, match=r"holds checkpoints but none is usable: .*ckpt_epoch_3\.pth: "
                                                 r"checksum mismatch.*--restart"):
        ck.choose_resume(out, auto_resume=True)
    # --restart: moved aside, nothing deleted
    choice = ck.choose_resume(out, restart=True)
    assert choice.checkpoint is None and "were moved to" in choice.warnings[0]
    assert ck.checkpoint_files(out) == [] and ck.choose_resume(out).checkpoint is None
    moved = [d for d in os.listdir(out) if d.startswith("superseded-")]
    assert len(moved) == 1 and "ckpt_epoch_3.pth" in os.listdir(os.path.join(out, moved[0]))
