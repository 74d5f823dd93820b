"""``--stem``: the three backbone stems, the deprecated ``--small-stem`` alias and older configs."""
import argparse
import importlib.util
import os

import pytest
import torch
from torch import nn

from contrast.checkpoint import read_checkpoint, write_pretrained_checkpoint
from contrast.eval.features import backbone_spec
from contrast.models import STEMS, build_backbone, stem_of
from contrast.option import method_config, parse_pretrain_args, resolve_from_config
from contrast.option_eval import parse_linear_args
from main_knn import parse_knn_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _export_tool():
    spec = importlib.util.spec_from_file_location("export_backbone", os.path.join(ROOT, "tools", "export_backbone.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# stem -> (conv1 kernel, has a max-pool, side after the stem for a 28 px input)
LAYOUT = {"imagenet": (7, True, 7), "small": (3, False, 28), "small-maxpool": (3, True, 14)}


def test_stems_are_the_documented_three():
    assert STEMS == ("imagenet", "small", "small-maxpool") and set(LAYOUT) == set(STEMS)


@pytest.mark.parametrize("stem", STEMS)
def test_stem_layout_and_spatial_size_at_28px(stem):
    kernel, pooled, side = LAYOUT[stem]
    net, feat_dim = build_backbone("resnet18", stem=stem)
    assert net.conv1.kernel_size == (kernel, kernel) and net.conv1.stride == ((2, 2) if kernel == 7 else (1, 1))
    assert isinstance(net.maxpool, nn.Identity) != pooled
    assert net.state_dict().keys() == build_backbone("resnet18")[0].state_dict().keys()
    seen = {}
    net.layer1.register_forward_hook(lambda m, i, o: seen.setdefault("input", i[0]))
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        out = net.eval()(x)
        stem_out = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    assert out.shape == (2, feat_dim) == (2, 512)
    assert seen["input"].shape == (2, 64, side, side) == stem_out.shape


def test_unknown_stem_names_the_choices():
    with pytest.raises(ValueError, match="--stem 'cifar'.*imagenet, small, small-maxpool"):
        build_backbone("resnet18", stem="cifar")


@pytest.mark.parametrize("config,stem", [({"stem": "small-maxpool"}, "small-maxpool"), ({"small_stem": True}, "small"),
                                         ({"small_stem": False}, "imagenet"), ({}, "imagenet"), (None, "imagenet"),
                                         ({"stem": "imagenet", "small_stem": True}, "imagenet"),
                                         (argparse.Namespace(small_stem=True), "small")])
def test_stem_of_reads_new_and_old_configs(config, stem):
    assert stem_of(config) == stem


def test_old_checkpoint_config_builds_the_small_stem(tmp_path):
    path = str(tmp_path / "old.pth")
    write_pretrained_checkpoint(path, {"backbone.x": torch.ones(1)}, {"arch": "resnet18", "small_stem": True}, 1)
    ckpt = read_checkpoint(path)
    assert backbone_spec(ckpt) == ("resnet18", "small")
    assert backbone_spec(ckpt, stem="imagenet")[1] == "imagenet"
    args = argparse.Namespace(arch=None, stem=None, image_size=None, val_crop_fraction=None)
    assert resolve_from_config(args, ckpt.config) == ["arch", "stem"]
    assert (args.arch, args.stem, args.image_size, args.val_crop_fraction) == ("resnet18", "small", 224, 0.875)


def test_stem_flags_and_the_small_stem_alias():
    pre = ["--model", "PIC"]
    lin = ["--pretrained-model", "x.pth"]
    assert parse_pretrain_args(pre).stem == "imagenet"
    assert parse_linear_args(lin).stem is None  # None: the checkpoint's stem
    for parse, base in ((parse_pretrain_args, pre), (parse_linear_args, lin)):
        assert parse(base + ["--small-stem"]).stem == "small"
        assert parse(base + ["--stem", "small-maxpool"]).stem == "small-maxpool"
        assert "small_stem" not in vars(parse(base + ["--small-stem"]))  # configs record only ``stem``
    assert method_config(parse_pretrain_args(pre + ["--small-stem"])).backbone.stem == "small"
    knn = ["--data-dir", "d", "--raw-pixels"]
    assert parse_knn_args(knn).stem is None  # None: the checkpoint's stem
    assert parse_knn_args(knn + ["--small-stem"]).stem == "small"
    assert parse_knn_args(knn + ["--no-small-stem"]).stem == "imagenet"
    assert parse_knn_args(knn + ["--stem", "small-maxpool"]).stem == "small-maxpool"


def test_bad_stem_flag_is_rejected(capsys):
    with pytest.raises(SystemExit):
        parse_pretrain_args(["--model", "PIC", "--stem", "cifar"])
    assert "invalid choice: 'cifar'" in capsys.readouterr().err


def test_export_stem_flags(tmp_path):
    export_backbone = _export_tool()
    ckpt = tmp_path / "c.pth"
    ckpt.write_bytes(b"")
    base = ["--checkpoint", str(ckpt), "--output", str(tmp_path / "o")]
    assert export_backbone.parse_export_args(base).stem is None
    assert export_backbone.parse_export_args(base + ["--small-stem"]).stem == "small"
    assert export_backbone.parse_export_args(base + ["--no-small-stem"]).stem == "imagenet"
    assert export_backbone.parse_export_args(base + ["--stem", "small-maxpool"]).stem == "small-maxpool"
    for stem in STEMS:
        net, _ = build_backbone("resnet18", stem=stem)
        net.reference_model().load_state_dict(net.state_dict(), strict=True)   # torchvision resnet18, same stem
