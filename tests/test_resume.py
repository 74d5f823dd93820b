"""``--auto-resume`` reaches exactly the weights of an uninterrupted run (CPU, num_workers=0).

Run A trains 2 epochs straight. Run B runs the same 2-epoch command but is interrupted right after
epoch 1's checkpoint (an exception raised from ``save_epoch``); a second invocation with
``--auto-resume`` finishes it. Model, optimizer, scheduler (and sampled-PIC shard) states must be
identical.
"""
import os

import pytest
import torch

import main_pretrain
from contrast import engine
from contrast.checkpoint import load_file
from tests.test_cli_pretrain import METHOD_FLAGS, tiny_args


class _Stop(Exception):
    pass


def _stop_after_first_save(monkeypatch):
    real = engine.save_epoch

    def save_then_stop(run, epoch, *a, **kw):
        real(run, epoch, *a, **kw)
        raise _Stop
    monkeypatch.setattr(engine, "save_epoch", save_then_stop)


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
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]


@pytest.mark.parametrize("method", ["PIC", "PIC_sampled", "MoCo"])
def test_auto_resume_matches_uninterrupted_run(method, tmp_path, monkeypatch):
    from tests.synthetic import make_image_folder
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=4, size=(36, 36))
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
    if method == "PIC_sampled":  # the classifier table lives in the per-rank shard file
        sa, sb = (load_file(str(d / "current.rank0-of-1.pth")) for d in (straight, resumed))
        flat_a, flat_b = _tensors(sa), _tensors(sb)
        assert flat_a and flat_a.keys() == flat_b.keys()
        assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a)
    with open(os.path.join(resumed, "log.txt")) as f:
        assert "resumed from" in f.read()


def test_resume_explicit_path_and_errors(tmp_path):
    from tests.synthetic import make_image_folder
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=4, size=(36, 36))
    first = tmp_path / "first"
    main_pretrain.main(tiny_args(data, first, "--model", "PIC", epochs=1))
    # --resume PATH continues a 1-epoch checkpoint into a 2-epoch run in another folder
    second = tmp_path / "second"
    main_pretrain.main(tiny_args(data, second, "--model", "PIC", "--resume", str(first / "current.pth"), epochs=2))
    assert load_file(str(second / "current.pth"))["step"] == 4
    # a checkpoint of another model / arch is refused with the file name
    from contrast.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match=r"current\.pth: checkpoint does not fit this model"):
        main_pretrain.main(tiny_args(data, tmp_path / "x", "--model", "SimCLR", "--mlp-head",
                                     "--resume", str(first / "current.pth")))
    with pytest.raises(CheckpointError, match="checkpoint file not found: .*missing.pth"):
        main_pretrain.main(tiny_args(data, tmp_path / "y", "--model", "PIC", "--resume", str(tmp_path / "missing.pth")))
