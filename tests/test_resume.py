"""``--auto-resume`` reaches exactly the weights of an uninterrupted run (CPU, num_workers=0), from an
epoch checkpoint and from a checkpoint saved in the middle of an epoch; the kNN monitor's best and
InstDisc's negatives survive a resume; a different total batch is refused, or continues the same lr
schedule by samples seen with ``--allow-batch-change``.

Run A trains straight. Run B runs the same command but is interrupted right after a checkpoint (an
exception raised from the save); a second invocation with ``--auto-resume`` finishes it. Model,
optimizer, scheduler (and sampled-PIC shard) states must be identical.
"""
import math
import os
import re

import pytest
import torch

import main_pretrain
from contrast import engine
from contrast.checkpoint import CheckpointError, load_file, read_checkpoint
from tests.test_cli_pretrain import METHOD_FLAGS, tiny_args


class _Stop(Exception):
    pass


def _stop_after_first_save(monkeypatch):
    real = engine.Checkpointer.save_epoch

    def save_then_stop(*a, **kw):
        real(*a, **kw)
        raise _Stop
    monkeypatch.setattr(engine.Checkpointer, "save_epoch", save_then_stop)


def _stop_after_mid_epoch_save(monkeypatch, at_step):
    """Interrupt right after the mid-epoch (time-based) save of step ``at_step``."""
    real = engine.Checkpointer.save_current

    def save_then_stop(self, epoch, step, consumed=None, fatal=False):
        ok = real(self, epoch, step, consumed, fatal)
        if consumed is not None and step == at_step:
            raise _Stop
        return ok
    monkeypatch.setattr(engine.Checkpointer, "save_current", save_then_stop)


def _tensors(obj, prefix=""):
    """Every tensor of a nested dict/list, keyed by its path."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    out = {}
    for k, v in items:
        out.update(_tensors(v, f"{prefix}/{k}"))
    return out


def _assert_same_state(a, b):
    for key in ("model",):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs after resume"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name, v in sa[k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[k][name])), f"optimizer state {k}.{name}"
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    assert a["scheduler"]["samples_seen"] == b["scheduler"]["samples_seen"]
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]


def _assert_same_shards(straight, resumed):
    """The per-rank files (sampled PIC's classifier table) of both runs hold the same tensors."""
    files = [read_checkpoint(str(d / "current.pth")).shard_files for d in (straight, resumed)]
    assert len(files[0]) == len(files[1]) == 1
    flat_a, flat_b = (_tensors(load_file(f[0])) for f in files)
    assert flat_a and flat_a.keys() == flat_b.keys()
    assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tests.synthetic import make_image_folder
    return make_image_folder(str(tmp_path_factory.mktemp("data")), num_classes=2, per_class=4, size=(36, 36))


@pytest.mark.parametrize("method", list(METHOD_FLAGS))
def test_auto_resume_matches_uninterrupted_run(method, data, tmp_path, monkeypatch):
    flags = METHOD_FLAGS[method] + ["--warmup-epoch", "1"]
    straight = tmp_path / "straight"
    main_pretrain.main(tiny_args(data, straight, *flags, epochs=2))

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as m:
        _stop_after_first_save(m)
        with pytest.raises(_Stop):
            main_pretrain.main(tiny_args(data, resumed, *flags, epochs=2))
    assert load_file(str(resumed / "current.pth"))["epoch"] == 1
    torch.manual_seed(1234)  # the resumed run must not depend on the state the process happens to be in
    main_pretrain.main(tiny_args(data, resumed, *flags, "--auto-resume", epochs=2))
    a, b = load_file(str(straight / "current.pth")), load_file(str(resumed / "current.pth"))
    _assert_same_state(a, b)
    if method == "PIC_sampled":
        _assert_same_shards(straight, resumed)
    if method == "InstDisc":  # the negatives come from (seed, draw counter): the counter is in the checkpoint
        assert int(a["model"]["neg_draws"]) == int(b["model"]["neg_draws"]) == 4
    with open(os.path.join(resumed, "log.txt")) as f:
        assert "resumed from" in f.read()


@pytest.mark.parametrize("method", ["MoCo", "PIC_sampled"])
def test_resume_from_the_middle_of_an_epoch(method, data, tmp_path, monkeypatch):
    """--save-every-minutes (here: every step) writes current.pth between two steps; a run stopped
    after step 3 (of 2 epochs x 2 steps) continues inside epoch 2 and ends bit-exact."""
    flags = METHOD_FLAGS[method] + ["--warmup-epoch", "1", "--save-every-minutes", "1e-9"]
    straight = tmp_path / "straight"
    main_pretrain.main(tiny_args(data, straight, *flags, epochs=2))
    resumed = tmp_path / "resumed"
    with monkeypatch.context() as m:
        _stop_after_mid_epoch_save(m, at_step=3)
        with pytest.raises(_Stop):
            main_pretrain.main(tiny_args(data, resumed, *flags, epochs=2))
    mid = read_checkpoint(str(resumed / "current.pth"))
    assert mid.mid_epoch and (mid.epoch, mid.step, mid.samples_seen) == (1, 3, 12)
    assert mid.sampler_states[0]["consumed"] == 4 and mid.sampler_states[0]["epoch"] == 2
    torch.manual_seed(99)
    main_pretrain.main(tiny_args(data, resumed, *flags, "--auto-resume", epochs=2))
    log = open(resumed / "log.txt").read()
    assert "4 samples into epoch 2" in log and "train epoch [2/2] iter [2/2]" in log.split("resumed from")[1]
    assert "iter [1/2]" not in log.split("resumed from")[1]  # the first half of epoch 2 is not run again
    a, b = load_file(str(straight / "current.pth")), load_file(str(resumed / "current.pth"))
    _assert_same_state(a, b)
    if method == "PIC_sampled":
        _assert_same_shards(straight, resumed)


def test_knn_monitor_best_survives_a_resume(data, tmp_path, monkeypatch):
    flags = [*METHOD_FLAGS["SimCLR"], "--knn-monitor", "--knn-k", "3"]
    out = tmp_path / "knn"
    with monkeypatch.context() as m:
        _stop_after_first_save(m)
        with pytest.raises(_Stop):
            main_pretrain.main(tiny_args(data, out, *flags, epochs=2))
    best = read_checkpoint(str(out / "current.pth")).extra["knn_best"]
    assert set(best) == {"top1", "top5"} and 0 <= best["top1"] <= 100
    import contrast.eval.knn as knn
    monkeypatch.setattr(knn, "knn_evaluate", lambda *a, **k: {a[4][0]: {"top1": -1.0, "top5": -1.0}})
    main_pretrain.main(tiny_args(data, out, *flags, "--auto-resume", epochs=2))
    # epoch 2 scores below the restored best, so the best of epoch 1 stays
    assert read_checkpoint(str(out / "current.pth")).extra["knn_best"] == best
    assert f"(best top-1 {best['top1']:.2f})" in open(out / "log.txt").read().split("resumed from")[1]


def _last_lr(out):
    lines = [line for line in open(os.path.join(out, "log.txt")) if "train epoch" in line]
    return [float(re.search(r" lr (\S+) ", line).group(1)) for line in lines]


def test_batch_change_is_refused_or_continues_the_schedule(tmp_path, monkeypatch):
    """16 images, 2 epochs. Stopped after epoch 1 at batch 4 (16 of 32 samples seen), resumed at batch 8:
    refused without --allow-batch-change; with it, the peak lr doubles (linear scaling) and the
    cosine continues from progress 16/32 over the 2 remaining steps, the last at the floor."""
    from tests.synthetic import make_image_folder
    data = make_image_folder(str(tmp_path / "d"), num_classes=2, per_class=8, size=(36, 36))
    flags = [*METHOD_FLAGS["PIC"][:2], "--cosine-form", "reach-min", "--amp-opt-level", "O0"]
    out = tmp_path / "o"
    with monkeypatch.context() as m:
        _stop_after_first_save(m)
        with pytest.raises(_Stop):
            main_pretrain.main(tiny_args(data, out, *flags, epochs=2))
    bigger = tiny_args(data, out, *flags, "--auto-resume", epochs=2)
    bigger[bigger.index("--batch-size") + 1] = "8"
    with pytest.raises(CheckpointError, match=r"current\.pth \(epoch 1, step 4\) was trained with a total batch "
                                              r"of 4 .*this run has 8 .*--allow-batch-change"):
        main_pretrain.main(bigger)
    main_pretrain.main(bigger + ["--allow-batch-change"])
    log = open(out / "log.txt").read()
    assert "peak lr rescaled from 0.007812 to 0.01562" in log and "over the remaining 16 samples" in log
    ckpt = read_checkpoint(str(out / "current.pth"))
    assert (ckpt.step, ckpt.samples_seen, ckpt.total_batch) == (6, 32, 8)
    peak, floor = 0.5 * 8 / 256, 1e-6
    expected = [floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * p)) for p in (16 / 24, 24 / 24)]
    assert _last_lr(out)[-2:] == pytest.approx(expected, rel=1e-3)


def test_resume_explicit_path_and_errors(data, tmp_path):
    first = tmp_path / "first"
    main_pretrain.main(tiny_args(data, first, "--model", "PIC", epochs=1))
    # --resume PATH continues a 1-epoch checkpoint into a 2-epoch run in another folder
    second = tmp_path / "second"
    main_pretrain.main(tiny_args(data, second, "--model", "PIC", "--resume", str(first / "current.pth"), epochs=2))
    assert load_file(str(second / "current.pth"))["step"] == 4
    # a checkpoint of another model / arch is refused with the file name
    with pytest.raises(CheckpointError, match=r"current\.pth: checkpoint does not fit this model"):
        main_pretrain.main(tiny_args(data, tmp_path / "x", "--model", "SimCLR", "--mlp-head",
                                     "--resume", str(first / "current.pth")))
    with pytest.raises(CheckpointError, match="checkpoint file not found: .*missing.pth"):
        main_pretrain.main(tiny_args(data, tmp_path / "y", "--model", "PIC", "--resume", str(tmp_path / "missing.pth")))
