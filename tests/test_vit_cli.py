"""Every method on a ViT end to end (slow): ``main_pretrain.py`` on one process and under torchrun with 2
gloo processes, a kill -9 in the middle of a save then ``--auto-resume`` reaching the weights of an
uninterrupted run bit for bit, and the evaluations: ``main_knn.py`` (CLS), ``main_linear.py``
(``--linear-feature cls4``, then ``-e``) and ``tools/export_backbone.py`` (a timm state dict that
``timm.create_model`` loads strictly, with the same features).

Every registered method (the registry, with its tiny flags in ``VIT_METHODS``) runs every cell: the
in-process one (pretraining, kNN, linear evaluation and export), the kill -9 one, and one torchrun launch
that trains every method in turn (tests/sequence_runner.py: a launch costs more than 13 tiny runs).

Scale: ``vit_pico`` (``vit_tiny``'s configuration at width 64, depth 2: tests/test_vit.py checks the real
sizes), 32 px images with patch 4, 16 px small crops for the multi-crop methods (position-embedding
interpolation), drop path 0.1 (random draws a resume must repeat), 8 images, batch 4.
"""
import importlib.util
import json
import math
import os
import re

import pytest
import timm
import torch

import main_knn
import main_linear
import main_pretrain
from contrast.checkpoint import read_checkpoint
from contrast.eval.features import backbone_from_checkpoint
from contrast.models import METHODS
from tests.synthetic import make_image_folder
from tests.sequence_runner import joined
from tests.test_faults import Proc, weights

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQUENCE_RUNNER = os.path.join(ROOT, "tests", "sequence_runner.py")

MULTI_CROP = ["--aug", "MultiCrop", "--image-size2", "16", "--num-crop2", "1", "--crop", "0.08", "--crop2", "0.3"]
VIT_METHODS = {
    "PIC": ["--model", "PIC", *MULTI_CROP, "--window-size", "8", "--window-stride", "4"],
    "InstDisc": ["--model", "InstDisc", "--contrast-num-negative", "16"],
    "MoCo": ["--model", "MoCo", "--contrast-num-negative", "16"],
    "MoCov2": ["--model", "MoCov2", "--contrast-num-negative", "16", "--mlp-hidden-dim", "32"],
    "SimCLR": ["--model", "SimCLR", "--mlp-hidden-dim", "32"],
    "BYOL": ["--model", "BYOL", "--mlp-hidden-dim", "32"],
    "SwAV": ["--model", "SwAV", *MULTI_CROP, "--mlp-hidden-dim", "32", "--swav-num-prototypes", "10",
             "--swav-freeze-prototypes-iters", "1"],
    "MoCov3": ["--model", "MoCov3", "--mlp-hidden-dim", "32"],
    "DINO": ["--model", "DINO", "--image-size2", "16", "--num-crop2", "1", "--crop", "0.08", "--crop2", "0.3",
             "--mlp-hidden-dim", "32", "--dino-bottleneck-dim", "8"],
    "SimSiam": ["--model", "SimSiam", "--mlp-hidden-dim", "32", "--simsiam-pred-dim", "8"],
    "BarlowTwins": ["--model", "BarlowTwins", "--mlp-hidden-dim", "32"],
    "VICReg": ["--model", "VICReg", "--mlp-hidden-dim", "32"],
    "NNCLR": ["--model", "NNCLR", "--mlp-hidden-dim", "32", "--nnclr-pred-hidden-dim", "32",
              "--nnclr-support-size", "16"],
}


def test_every_registered_method_has_tiny_vit_flags():
    assert set(VIT_METHODS) == set(METHODS)
    assert all(flags[:2] == ["--model", name] for name, flags in VIT_METHODS.items())


def vit_args(data, out, method, *extra, batch=4, epochs=1):
    return ["--data-dir", str(data), "--output-dir", str(out), *VIT_METHODS[method], "--arch", "vit_pico",
            "--patch-size", "4", "--image-size", "32", "--drop-path", "0.1", "--feature-dim", "16",
            "--batch-size", str(batch), "--epochs", str(epochs), "--num-workers", "0", "--print-freq", "1",
            "--warmup-epoch", "1", "--base-learning-rate", "0.01", "--no-tensorboard", *extra]


def losses(out):
    with open(os.path.join(out, "log.txt")) as f:
        return [float(x) for x in re.findall(r"train epoch .* loss (\S+) ", f.read())]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")), num_classes=2, per_class=4, size=(36, 36))


def _export_tool():
    spec = importlib.util.spec_from_file_location("export_backbone", os.path.join(ROOT, "tools", "export_backbone.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", list(METHODS))
def test_vit_pretrain_then_knn_linear_and_timm_export(method, data, tmp_path, monkeypatch):
    asked = {}
    real = main_pretrain.resolve_precision

    def spy(level, device, **kw):
        asked.update(kw)
        return real(level, device, **kw)
    monkeypatch.setattr(main_pretrain, "resolve_precision", spy)
    pre = tmp_path / "pre"
    main_pretrain.main(vit_args(data, pre, method, epochs=2))
    assert asked == {"prefer_bf16": True}   # --amp-opt-level auto would be bf16 on a CUDA device with bf16
    assert losses(pre) and all(math.isfinite(x) for x in losses(pre))
    path = str(pre / "current.pth")
    ckpt = read_checkpoint(path)
    assert ckpt.config["optimizer"] == "adamw" and ckpt.config["patch_size"] == 4
    assert "backbone.pos_embed" in ckpt.model and "backbone.cls_token" in ckpt.model

    knn = main_knn.main(["--checkpoint", path, "--data-dir", data, "--knn-k", "3", "--num-workers", "0",
                         "--batch-size", "4", "--device", "cpu"])
    assert knn["feature"] == "cls" and knn["feat_dim"] == 64 and 0 <= knn["knn"]["3"]["top1"] <= 100

    lin_dir = tmp_path / "lin"
    lin = main_linear.main(["--data-dir", data, "--pretrained-model", path, "--output-dir", str(lin_dir),
                            "--total-batch-size", "4", "--epochs", "1", "--num-workers", "0", "--warmup-epoch", "0",
                            "--no-tensorboard", "--linear-feature", "cls4"])
    assert 0 <= lin["last_acc1"] <= 100
    linear_ckpt = read_checkpoint(str(lin_dir / "current.pth"))
    assert linear_ckpt.model["fc.weight"].shape == (2, 2 * 64)   # CLS of the last min(4, depth = 2) blocks
    again = main_linear.main(["--data-dir", data, "--output-dir", str(lin_dir), "-e", "--auto-resume",
                              "--num-workers", "0", "--no-tensorboard", "--linear-feature", "cls4"])
    assert again["acc1"] == lin["last_acc1"]

    written = _export_tool().main(["--checkpoint", path, "--output", str(tmp_path / "vit")])
    assert set(written) == {"timm"}
    with open(tmp_path / "vit.json") as f:
        spec = json.load(f)
    net = timm.create_model(spec["name"], pretrained=False, **spec["kwargs"]).eval()
    net.load_state_dict(torch.load(written["timm"]), strict=True)
    backbone, _, _ = backbone_from_checkpoint(path)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(net(x), backbone.eval()(x), atol=1e-5, rtol=1e-5)


def test_vit_torchrun_two_gloo_processes_every_method(data, tmp_path):
    """One torchrun launch of 2 gloo processes trains every method in turn (tests/sequence_runner.py)."""
    outs = {method: tmp_path / method for method in VIT_METHODS}
    flags = joined(vit_args(data, out, method, batch=2) for method, out in outs.items())
    proc = Proc(flags, tmp_path, nproc=2, runner=SEQUENCE_RUNNER)
    rc = proc.wait(600)
    assert rc == 0, proc.stderr()[-3000:]
    for method, out in outs.items():
        ckpt = read_checkpoint(str(out / "current.pth"))
        assert ckpt.config["model"] == method and ckpt.config["world_size"] == 2 and ckpt.step == 2, method
        assert losses(out) and all(math.isfinite(x) for x in losses(out)), method


@pytest.mark.parametrize("method", list(METHODS))
def test_vit_kill9_inside_a_save_then_resume_is_bit_exact(method, data, tmp_path):
    """An uninterrupted run (in this process); a run in its own process killed -9 in the middle of
    writing its third checkpoint, then resumed with --auto-resume (in this process): same weights."""
    common = ["--amp-opt-level", "O0", "--save-every-minutes", "1e-9"]
    ref = tmp_path / "ref"
    main_pretrain.main(vit_args(data, ref, method, *common, epochs=3))

    out = tmp_path / "killed"
    marker = str(tmp_path / "paused")
    proc = Proc([*vit_args(data, out, method, *common, epochs=3), "--test-real-backbone", "--test-pause-in-save",
                 marker, "--test-pause-at", "main:3"], out)
    proc.wait_file(marker, timeout=300)
    proc.p.kill()
    assert proc.wait() == -9
    torch.manual_seed(1234)   # the resumed run must not depend on the state of this process
    main_pretrain.main(vit_args(data, out, method, *common, "--auto-resume", epochs=3))
    with open(out / "log.txt") as f:
        assert re.search(r"resumed from \S+ \(epoch \d+, step 2", f.read())   # the third save never committed
    a, b = weights(ref), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])][:5]
