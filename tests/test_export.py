"""tools/export_backbone.py: torchvision and detectron2 exports of a pretraining checkpoint."""
import importlib.util
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from contrast.checkpoint import write_pretrained_checkpoint
from contrast.models import build_backbone
from tests.conftest import trained_looking_backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("export_backbone", os.path.join(ROOT, "tools", "export_backbone.py"))
export_backbone = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_backbone)


@pytest.fixture
def fake_checkpoint(pretrained_checkpoint):
    """``make(path, arch, stem, ddp, config)``: a method-like checkpoint with a trained-looking backbone;
    returns the backbone. ``config`` replaces the recorded ``{"arch", "stem", "model"}`` (e.g. an older config)."""
    def make(path, arch="resnet18", stem="imagenet", ddp=True, config=None):
        backbone = trained_looking_backbone(arch, stem)
        config = {"arch": arch, "stem": stem, "model": "PIC"} if config is None else config
        pretrained_checkpoint(path, backbone, config, prefix="module." if ddp else "")
        return backbone
    return make


def test_torchvision_export_loads_strict_and_matches_features(tmp_path, capsys, fake_checkpoint):
    original = fake_checkpoint(tmp_path / "ckpt.pth")
    written = export_backbone.main(["--checkpoint", str(tmp_path / "ckpt.pth"), "--output", str(tmp_path / "r18")])
    assert "max abs feature difference" in capsys.readouterr().out
    state = torch.load(written["torchvision"])
    assert not any(k.startswith("fc.") for k in state)

    net = torchvision.models.resnet18()
    result = net.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []

    net = torchvision.models.resnet18()
    net.fc = nn.Identity()
    net.load_state_dict(state, strict=True)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), original(x), rtol=0, atol=1e-6)


def expected_d2_keys(blocks, bottleneck):
    """detectron2 ResNet parameter names, written out from its module structure."""
    norm = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = {"stem.conv1.weight"} | {f"stem.conv1.norm.{n}" for n in norm}
    convs = ["conv1", "conv2", "conv3"] if bottleneck else ["conv1", "conv2"]
    for stage, count in zip(range(2, 6), blocks):
        for b in range(count):
            for c in convs:
                keys |= {f"res{stage}.{b}.{c}.weight"} | {f"res{stage}.{b}.{c}.norm.{n}" for n in norm}
            if b == 0 and (stage > 2 or bottleneck):
                keys |= {f"res{stage}.0.shortcut.weight"} | {f"res{stage}.0.shortcut.norm.{n}" for n in norm}
    return keys


def test_detectron2_export_names_values_and_format(tmp_path, fake_checkpoint):
    fake_checkpoint(tmp_path / "ckpt.pth", ddp=False)
    written = export_backbone.main(["--checkpoint", str(tmp_path / "ckpt.pth"), "--output", str(tmp_path / "r18"),
                                    "--format", "d2"])
    assert set(written) == {"d2"}
    with open(written["d2"], "rb") as f:
        obj = pickle.load(f)
    assert obj["matching_heuristics"] is True and isinstance(obj["__author__"], str)
    model = obj["model"]
    assert set(model) == expected_d2_keys([2, 2, 2, 2], bottleneck=False)
    assert all(isinstance(v, np.ndarray) for v in model.values())
    tv = torch.load(tmp_path / "ckpt.pth")["model"]
    pairs = {"stem.conv1.weight": "backbone.conv1.weight", "stem.conv1.norm.running_var": "backbone.bn1.running_var",
             "res2.1.conv2.norm.bias": "backbone.layer1.1.bn2.bias",
             "res3.0.shortcut.weight": "backbone.layer2.0.downsample.0.weight",
             "res5.0.shortcut.norm.running_mean": "backbone.layer4.0.downsample.1.running_mean",
             "res4.1.conv1.weight": "backbone.layer3.1.conv1.weight"}
    for d2_name, tv_name in pairs.items():
        np.testing.assert_array_equal(model[d2_name], tv[tv_name].numpy())


def test_detectron2_names_for_bottleneck_resnet50():
    state = torchvision.models.resnet50().state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    obj = export_backbone.to_detectron2(state)
    assert set(obj["model"]) == expected_d2_keys([3, 4, 6, 3], bottleneck=True)
    assert "res2.0.conv3.norm.weight" in obj["model"] and "res2.0.shortcut.norm.bias" in obj["model"]
    back = export_backbone.from_detectron2(obj)
    assert list(back) == list(state)


def test_small_stem_export(tmp_path, capsys, fake_checkpoint):
    """An older checkpoint, whose config records ``small_stem: True`` instead of ``stem``."""
    original = fake_checkpoint(tmp_path / "ckpt.pth", stem="small",
                               config={"arch": "resnet18", "small_stem": True, "model": "PIC"})
    written = export_backbone.main(["--checkpoint", str(tmp_path / "ckpt.pth"), "--output", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert "small stem backbone" in out and "there is no max-pool" in out
    state = torch.load(written["torchvision"])
    assert tuple(state["conv1.weight"].shape) == (64, 3, 3, 3)
    net = torchvision.models.resnet18()
    net.fc, net.maxpool = nn.Identity(), nn.Identity()
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), original(x), rtol=0, atol=1e-6)
    with open(written["d2"], "rb") as f:
        assert pickle.load(f)["model"]["stem.conv1.weight"].shape == (64, 3, 3, 3)


def test_small_maxpool_stem_export(tmp_path, capsys, fake_checkpoint):
    original = fake_checkpoint(tmp_path / "ckpt.pth", stem="small-maxpool")
    written = export_backbone.main(["--checkpoint", str(tmp_path / "ckpt.pth"), "--output", str(tmp_path / "m")])
    out = capsys.readouterr().out
    assert "small-maxpool stem backbone" in out and "the max-pool is kept" in out
    state = torch.load(written["torchvision"])
    assert tuple(state["conv1.weight"].shape) == (64, 3, 3, 3)
    net = torchvision.models.resnet18()
    net.fc = nn.Identity()
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # torchvision's max-pool stays
    net.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), original(x), rtol=0, atol=1e-6)
        no_pool = torchvision.models.resnet18()
        no_pool.fc, no_pool.maxpool, no_pool.conv1 = nn.Identity(), nn.Identity(), nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        no_pool.load_state_dict(state, strict=True)  # same tensors, but another network: features differ
        assert (no_pool.eval()(x) - original(x)).abs().max() > 1e-3
    with open(written["d2"], "rb") as f:
        back = export_backbone.from_detectron2(pickle.load(f))
    assert all(torch.equal(back[k], v) for k, v in state.items())
    with pytest.raises(Exception, match="ckpt.pth"):  # the override must fit the weights
        export_backbone.main(["--checkpoint", str(tmp_path / "ckpt.pth"), "--output", str(tmp_path / "x"),
                              "--stem", "imagenet"])


def test_verification_rejects_a_wrong_export(tmp_path, fake_checkpoint):
    original = fake_checkpoint(tmp_path / "ckpt.pth")
    state = export_backbone.torchvision_state(original)
    state["layer3.0.bn1.running_mean"] = state["layer3.0.bn1.running_mean"] + 0.5
    with pytest.raises(RuntimeError, match="differs from the original"):
        export_backbone.check_export(original, state, "resnet18", "imagenet", "torchvision export", 1e-5, 32)


def test_bad_checkpoint_errors_name_the_file(tmp_path, fake_checkpoint):
    write_pretrained_checkpoint(str(tmp_path / "nob.pth"), {"head.weight": torch.ones(1)}, {"arch": "resnet18"}, 1)
    with pytest.raises(Exception, match="nob.pth.*backbone"):
        export_backbone.main(["--checkpoint", str(tmp_path / "nob.pth"), "--output", str(tmp_path / "x")])
    fake_checkpoint(tmp_path / "ckpt.pth")
    with pytest.raises(Exception, match="ckpt.pth"):  # weights do not fit another arch
        export_backbone.main(["--checkpoint", str(tmp_path / "ckpt.pth"), "--output", str(tmp_path / "x"),
                              "--arch", "resnet34"])


def test_resnet_d_is_refused_in_one_line(tmp_path, pretrained_checkpoint):
    from contrast.models import build_backbone
    backbone, _ = build_backbone("resnet18_d")
    pretrained_checkpoint(tmp_path / "d.pth", backbone.eval(), {"arch": "resnet18_d", "stem": "imagenet"})
    with pytest.raises(ValueError, match=r"d\.pth: resnet18_d is the release's ResNet-D, not a torchvision"):
        export_backbone.main(["--checkpoint", str(tmp_path / "d.pth"), "--output", str(tmp_path / "x")])
