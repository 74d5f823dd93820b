"""Host-device synchronisations per training step (issue 29, finding 6).

The real ``main_pretrain.py`` runs on the ``meta`` device (:mod:`tests.device_probe`), where every
read of a device tensor by the host (``item``, ``tolist``, ``bool()``, ``nonzero``, a copy to the
host, ...) is counted: each is a synchronisation on CUDA. Outside print steps (``--print-freq``) a
step may make one, the read of the agreement all-reduce; the sampled PIC table lives on the host
and adds its two transfers (the batch ids to the host, the rows' gradient back to it).
"""
import pytest
import torch

import main_pretrain
from contrast import engine
from contrast.data import batched_ops as B
from contrast.logger import DeviceMeters
from contrast.precision import Precision
from tests.device_probe import meta_device
from tests.synthetic import make_image_folder
from tests.test_cli_pretrain import METHOD_FLAGS, tiny_args

HOST_TABLE = {"PIC_sampled": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")), num_classes=2, per_class=6, size=(36, 36))


def syncs_per_step(data, out, monkeypatch, flags, scaler=False):
    """Host reads of the device in each step that does not print (no --print-freq step, not the last
    of its epoch): ``[(count, sites)]``. Epoch-end work counts with the epoch's last step."""
    marks, inputs = [], engine.Trainer._inputs
    if scaler:
        monkeypatch.setattr(main_pretrain, "resolve_precision", lambda level, device, **_: (
            Precision(None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)), "test: GradScaler"))
    with meta_device(monkeypatch) as probe:
        def mark(self, views, index, label, epoch, it):
            marks.append((epoch, probe.count))
            return inputs(self, views, index, label, epoch, it)
        monkeypatch.setattr(engine.Trainer, "_inputs", mark)
        main_pretrain.main(tiny_args(data, out, *flags, "--device", "meta", "--print-freq", "1000"))
        marks.append((None, probe.count))
    steps = [(b[1] - a[1], probe.sites[a[1]:b[1]]) for a, b in zip(marks, marks[1:]) if a[0] == b[0]]
    assert len(steps) >= 2
    return steps


@pytest.mark.parametrize("method", sorted(METHOD_FLAGS))
def test_one_host_read_per_step_outside_print_steps(method, data, tmp_path, monkeypatch):
    steps = syncs_per_step(data, tmp_path, monkeypatch, METHOD_FLAGS[method])
    budget = 1 + HOST_TABLE.get(method, 0)
    print(f"\n{method}: host reads per non-print step: {[count for count, _ in steps]}")
    for count, sites in steps:
        assert count <= budget, f"{count} host reads in a step: {sites}"
    assert any("trainer.py" in s and "tolist" in s for s in steps[0][1])   # the agreement's read is the one


def test_grad_scaler_overflow_is_read_with_the_agreement(data, tmp_path, monkeypatch):
    """fp16's GradScaler adds no read: the overflow flag travels in the agreement's all-reduce."""
    for count, sites in syncs_per_step(data, tmp_path, monkeypatch, METHOD_FLAGS["SimCLR"], scaler=True):
        assert count <= 1, sites


def test_old_loop_is_caught(data, tmp_path, monkeypatch):
    """The counter sees a read of a logged value at every step (what the loop did before)."""
    update = DeviceMeters.update

    def eager(self, values, n=1):
        update(self, values, n)
        for v in values.values():
            v.item()
    monkeypatch.setattr(DeviceMeters, "update", eager)
    assert all(count > 1 for count, _ in syncs_per_step(data, tmp_path, monkeypatch, METHOD_FLAGS["SimCLR"]))


@pytest.mark.parametrize("op", [B.RandomColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8), B.RandomGrayscale(0.5),
                                B.RandomGaussianBlur(3, p=0.5)], ids=["jitter", "gray", "blur"])
def test_masked_colour_ops_equal_the_indexed_ones(op):
    """The sync-free path (every sample transformed, the selected ones kept) gives the CPU path's values."""
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = {}
    for masked in (False, True):
        op.sync_free = masked
        out[masked] = op(x.clone(), generator=torch.Generator().manual_seed(1))
    op.sync_free = None
    assert not torch.equal(out[False], x)
    torch.testing.assert_close(out[True], out[False], rtol=0, atol=1e-6)
