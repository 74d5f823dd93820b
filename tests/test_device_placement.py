"""The entry scripts on a second device: every module and tensor of a step must reach it (issue 29).

The real ``main_pretrain.py`` (every registered method, with the device augmentation stage and the
kNN monitor), ``main_linear.py`` (training, per-epoch evaluation and ``-e``) and ``main_knn.py`` run
with ``--device meta`` (:mod:`tests.device_probe`): a module or tensor left on the CPU meets a
meta tensor and raises "not on the expected device", as it would on CUDA. Without this guard a
CUDA run crashed on its first step (the augmentation's ``Normalize`` buffers stayed on the CPU).

The kNN vote reads sizes on the host to plan its chunks, which meta tensors cannot answer: it is
replaced by a check that features and labels reach it on one device (:func:`placed_knn`).
"""
import pytest
import torch

import main_knn
import main_linear
import main_pretrain
from contrast.eval import knn
from tests.device_probe import meta_device
from tests.synthetic import make_image_folder
from tests.test_cli_pretrain import METHOD_FLAGS, tiny_args


def placed_knn(monkeypatch):
    """``knn_evaluate`` (kNN monitor and main_knn.py) checks its inputs share a device, returns zeros."""
    def knn_evaluate(train_feats, train_labels, query_feats, query_labels, ks, *args, **kwargs):
        devices = {t.device for t in (train_feats, train_labels, query_feats, query_labels)}
        assert devices == {torch.device("meta")}, devices
        return {k: {"top1": 0.0, "top5": 0.0} for k in ks}
    monkeypatch.setattr(knn, "knn_evaluate", knn_evaluate)
    monkeypatch.setattr(main_knn, "knn_evaluate", knn_evaluate)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")), num_classes=2, per_class=4, size=(36, 36))


@pytest.mark.parametrize("method", sorted(METHOD_FLAGS))
def test_pretraining_step_runs_on_a_second_device(method, data, tmp_path, monkeypatch):
    extra = ["--knn-monitor", "--knn-k", "3"] if method in ("PIC", "SimCLR") else []
    placed_knn(monkeypatch)
    with meta_device(monkeypatch):
        main_pretrain.main(tiny_args(data, tmp_path, *METHOD_FLAGS[method], *extra, "--device", "meta"))
    assert (tmp_path / "current.pth").exists()


def test_linear_evaluation_and_knn_run_on_a_second_device(data, tmp_path, monkeypatch):
    main_pretrain.main(tiny_args(data, tmp_path / "pre", *METHOD_FLAGS["SimCLR"], "--device", "cpu"))
    pre = str(tmp_path / "pre" / "current.pth")
    linear = ["--pretrained-model", pre, "--data-dir", data, "--epochs", "1", "--total-batch-size", "4",
              "--num-workers", "0", "--no-tensorboard"]
    main_linear.main(linear + ["--output-dir", str(tmp_path / "lin_cpu"), "--device", "cpu"])
    placed_knn(monkeypatch)
    with meta_device(monkeypatch):
        main_linear.main(linear + ["--output-dir", str(tmp_path / "lin"), "--device", "meta"])   # train + evaluate()
        main_linear.main(linear + ["--output-dir", str(tmp_path / "lin_e"), "--device", "meta", "-e", "--resume",
                                   str(tmp_path / "lin_cpu" / "current.pth")])                # evaluate only
        main_knn.main(["--pretrained-model", pre, "--data-dir", data, "--knn-k", "3", "--num-workers", "0",
                       "--batch-size", "4", "--device", "meta"])
