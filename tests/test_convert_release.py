"""tools/convert_release_checkpoint.py on checkpoints built here in the PIC release's format.

The release-format files are made from the key list of the release's checkpoint (``opt``
Namespace, ``model`` with ``module.encoder.*`` etc.) with random tensors; the reference features
come from a functional ResNet forward written here that reads the release's key names, so the
round trip release tensors -> converted checkpoint -> our backbone / torchvision is checked
against code that shares nothing with the converter or our models.
"""
import argparse
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from contrast.checkpoint import CheckpointError, read_checkpoint, restore_training_state
from contrast.eval.features import backbone_from_checkpoint
from contrast.models import build_backbone
from tests.synthetic import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "convert_release_checkpoint.py")
_spec = importlib.util.spec_from_file_location("convert_release_checkpoint", TOOL)
convert_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_tool)

FEATURE_DIM = 8
SIZE = 32


# ------------------------------------------------------------------ the release's format, from its key list
def _conv(g, out_c, in_c, k):
    return torch.randn(out_c, in_c, k, k, generator=g) * (2.0 / (k * k * out_c)) ** 0.5


def _bn(g, prefix, c, state):
    state[prefix + "weight"] = 1 + 0.2 * torch.randn(c, generator=g)
    state[prefix + "bias"] = 0.1 * torch.randn(c, generator=g)
    state[prefix + "running_mean"] = 0.1 * torch.randn(c, generator=g)
    state[prefix + "running_var"] = 0.5 + torch.rand(c, generator=g)
    state[prefix + "num_batches_tracked"] = torch.tensor(17)


def release_encoder_state(arch, mlp_head, seed):
    """The release ResNet-18 / ResNet-18-D encoder's state dict (BasicBlocks [2, 2, 2, 2]) with its head."""
    g = torch.Generator().manual_seed(seed)
    s = {}
    if arch == "resnet18_d":
        s["conv1.0.0.weight"] = _conv(g, 32, 3, 3)
        _bn(g, "conv1.0.1.", 32, s)
        s["conv1.1.0.weight"] = _conv(g, 32, 32, 3)
        _bn(g, "conv1.1.1.", 32, s)
        s["conv1.2.weight"] = _conv(g, 64, 32, 3)
    else:
        s["conv1.weight"] = _conv(g, 64, 3, 7)
    _bn(g, "bn1.", 64, s)
    inplanes = 64
    for stage, planes in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"layer{stage}.{block}."
            cin = inplanes if block == 0 else planes
            s[p + "conv1.weight"] = _conv(g, planes, cin, 3)
            _bn(g, p + "bn1.", planes, s)
            s[p + "conv2.weight"] = _conv(g, planes, planes, 3)
            _bn(g, p + "bn2.", planes, s)
            if block == 0 and stage > 1:
                if arch == "resnet18_d":   # AvgPool2d (no tensors), conv1x1 stride 1, BN
                    s[p + "downsample.1.weight"] = _conv(g, planes, inplanes, 1)
                    _bn(g, p + "downsample.2.", planes, s)
                else:
                    s[p + "downsample.0.weight"] = _conv(g, planes, inplanes, 1)
                    _bn(g, p + "downsample.1.", planes, s)
        inplanes = planes
    if mlp_head:
        s["fc1.weight"], s["fc1.bias"] = 0.02 * torch.randn(2048, 512, generator=g), 0.1 * torch.randn(2048, generator=g)
        s["fc2.weight"], s["fc2.bias"] = 0.02 * torch.randn(FEATURE_DIM, 2048, generator=g), \
            0.1 * torch.randn(FEATURE_DIM, generator=g)
    else:
        s["fc.weight"], s["fc.bias"] = 0.05 * torch.randn(FEATURE_DIM, 512, generator=g), \
            0.1 * torch.randn(FEATURE_DIM, generator=g)
    return s


def release_opt(model, arch, mlp_head, **kw):
    """The release's ``opt`` Namespace (its option.py fields; values as its scripts would set)."""
    opt = dict(data_dir="./data/ImageNet-Zip", crop=0.08, aug="MultiCrop" if model == "PIC" else "SimCLR", zip=True,
               cache_mode="part", num_workers=4, batch_size=64, window_size=131072, window_stride=16384,
               use_sliding_window_sampler=model == "PIC", shuffle_per_epoch=model == "PIC", image_size=SIZE,
               image_size2=96, crop2=0.14, num_crop=1, num_crop2=3, arch=arch, model=model,
               contrast_temperature=0.2, contrast_momentum=0.999, contrast_num_negative=16, feature_dim=FEATURE_DIM,
               mlp_head=mlp_head, base_learning_rate=0.03, optimizer="sgd", lr_scheduler="cosine", warmup_epoch=98,
               warmup_multiplier=100, lr_decay_epochs=[120, 160, 200], lr_decay_rate=0.1, weight_decay=1e-4,
               momentum=0.9, amp_opt_level="O1", start_epoch=1, epochs=3910, output_dir="./output/PIC/epoch-400",
               auto_resume=False, resume="", print_freq=100, save_freq=10, local_rank=0, num_instances=10)
    opt.update(kw)
    return argparse.Namespace(**opt)


def make_release_checkpoint(path, model, arch, mlp_head, seed=0, num_instances=10, queue_len=16):
    g = torch.Generator().manual_seed(seed + 100)
    enc = release_encoder_state(arch, mlp_head, seed)
    state = {"module.encoder." + k: v for k, v in enc.items()}
    if model == "PIC":
        state["module.sim_matrix"] = 0.01 * torch.randn(num_instances, FEATURE_DIM, generator=g)
    elif model == "InstDisc":
        state["module.memory"] = F.normalize(torch.randn(num_instances, FEATURE_DIM, generator=g), dim=0)
    elif model == "MoCo":
        state.update({"module.encoder_k." + k: v for k, v in release_encoder_state(arch, mlp_head, seed + 1).items()})
        state["module.queue"] = F.normalize(torch.randn(FEATURE_DIM, queue_len, generator=g), dim=0)
        state["module.queue_ptr"] = torch.tensor([5])
    raw = {"opt": release_opt(model, arch, mlp_head, num_instances=num_instances), "model": state,
           "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 7}, "epoch": 7,
           "amp": {"loss_scaler0": {"loss_scale": 65536.0}}}
    if model == "PIC":
        raw["sampler"] = {"start_index": 16384}
    torch.save(raw, path)
    return enc, state


# ------------------------------------------------------------------ reference forward on the release's keys
def _bn_eval(x, s, p):
    return F.batch_norm(x, s[p + "running_mean"], s[p + "running_var"], s[p + "weight"], s[p + "bias"], False, 0.0,
                        1e-5)


def release_features(s, arch, x):
    """Pooled features of the release's ResNet-18(-D) in eval mode, from its state dict ``s``."""
    if arch == "resnet18_d":
        x = F.relu(_bn_eval(F.conv2d(x, s["conv1.0.0.weight"], stride=2, padding=1), s, "conv1.0.1."))
        x = F.relu(_bn_eval(F.conv2d(x, s["conv1.1.0.weight"], padding=1), s, "conv1.1.1."))
        x = F.conv2d(x, s["conv1.2.weight"], padding=1)
    else:
        x = F.conv2d(x, s["conv1.weight"], stride=2, padding=3)
    x = F.max_pool2d(F.relu(_bn_eval(x, s, "bn1.")), 3, 2, 1)
    for stage in range(1, 5):
        for block in range(2):
            p = f"layer{stage}.{block}."
            stride = 2 if block == 0 and stage > 1 else 1
            out = F.relu(_bn_eval(F.conv2d(x, s[p + "conv1.weight"], stride=stride, padding=1), s, p + "bn1."))
            out = _bn_eval(F.conv2d(out, s[p + "conv2.weight"], padding=1), s, p + "bn2.")
            if p + "downsample.0.weight" in s:
                short = _bn_eval(F.conv2d(x, s[p + "downsample.0.weight"], stride=stride), s, p + "downsample.1.")
            elif p + "downsample.1.weight" in s:
                short = _bn_eval(F.conv2d(F.avg_pool2d(x, stride, stride), s[p + "downsample.1.weight"]), s,
                                 p + "downsample.2.")
            else:
                short = x
            x = F.relu(out + short)
    return x.mean((2, 3))


def release_embedding(s, arch, x):
    f = release_features(s, arch, x)
    if "fc1.weight" in s:
        return F.linear(F.relu(F.linear(f, s["fc1.weight"], s["fc1.bias"])), s["fc2.weight"], s["fc2.bias"])
    return F.linear(f, s["fc.weight"], s["fc.bias"])


def batch(seed=5, n=3):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ tests
CASES = [("PIC", "resnet18", True), ("PIC", "resnet18_d", True), ("MoCo", "resnet18", False),
         ("InstDisc", "resnet18", True), ("SimCLR", "resnet18_d", True)]


@pytest.mark.parametrize("model,arch,mlp_head", CASES)
def test_convert_round_trip(model, arch, mlp_head, tmp_path, capsys):
    src = tmp_path / "current.pth"
    enc, state = make_release_checkpoint(src, model, arch, mlp_head)
    out = convert_tool.main(["--release-checkpoint", str(src), "--output-dir", str(tmp_path / "conv")])
    assert "evaluation only" in capsys.readouterr().out

    ckpt = read_checkpoint(out["checkpoint"])
    assert ckpt.kind == "pretrain" and not ckpt.resumable and ckpt.epoch == 7
    assert (ckpt.config["model"], ckpt.config["arch"], ckpt.config["stem"]) == (model, arch, "imagenet")
    assert ckpt.config["mlp_head"] is mlp_head and ckpt.config["mlp_hidden_dim"] == 2048
    assert ckpt.config["val_crop_fraction"] == SIZE / (SIZE + 32)   # the release's Resize(size + 32)

    x = batch()
    ref = release_features(enc, arch, x)
    backbone, feat_dim, _ = backbone_from_checkpoint(out["checkpoint"])   # what main_knn / main_linear / export do
    with torch.no_grad():
        assert torch.allclose(backbone.eval()(x), ref, atol=1e-5), "converted backbone features"
    assert feat_dim == 512

    # the method under our names: head, and the method's state
    method = convert_tool.method_for(ckpt.config, 10 if model in ("PIC", "InstDisc") else 1)
    method.load_state_dict(ckpt.model, strict=True)
    method.eval()
    with torch.no_grad():
        assert torch.allclose(method.head(method.backbone(x)), release_embedding(enc, arch, x), atol=1e-5)
    if model == "PIC":
        assert torch.equal(ckpt.model["classifier.weight"], state["module.sim_matrix"])
    if model == "InstDisc":
        assert torch.equal(ckpt.model["bank"], state["module.memory"]) and int(ckpt.model["neg_draws"]) == 0
    if model == "MoCo":
        assert torch.equal(ckpt.model["queue.features"], state["module.queue"].t())   # (D, K) -> (K, D)
        assert ckpt.model["queue.ptr"].shape == () and int(ckpt.model["queue.ptr"]) == 5
        enc_k = {k[len("module.encoder_k."):]: v for k, v in state.items() if k.startswith("module.encoder_k.")}
        with torch.no_grad():
            assert torch.allclose(method.key_encoder.backbone(x), release_features(enc_k, arch, x), atol=1e-5)
            assert torch.allclose(method.key_encoder(x), release_embedding(enc_k, arch, x), atol=1e-5)

    # backbone.pth: torchvision (plain) or our ResNet-D, strict, same features
    tv_state = torch.load(out["backbone"])
    assert not any(k.startswith(("fc", "fc1", "fc2")) for k in tv_state)
    if arch in ("resnet18",):
        net = torchvision.models.resnet18(weights=None)
        net.fc = nn.Identity()
    else:
        net, _ = build_backbone(arch)
    net.load_state_dict(tv_state, strict=True)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), ref, atol=1e-5)

    # a converted file is for evaluation: resuming it is refused with a clear message
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        restore_training_state(ckpt, method, opt)


def test_converted_checkpoint_runs_in_knn_linear_and_export(tmp_path):
    import main_knn
    import main_linear
    src = tmp_path / "current.pth"
    enc, _ = make_release_checkpoint(src, "PIC", "resnet18", True)
    out = convert_tool.main(["--release-checkpoint", str(src), "--output-dir", str(tmp_path / "conv")])
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=3, size=(36, 36))
    common = ["--data-dir", data, "--num-workers", "0", "--device", "cpu"]
    knn = main_knn.main(["--checkpoint", out["checkpoint"], *common, "--knn-k", "2", "--batch-size", "4"])
    assert knn["model"] == "PIC" and knn["feat_dim"] == 512 and 0 <= knn["knn"]["2"]["top1"] <= 100
    lin = main_linear.main(["--pretrained-model", out["checkpoint"], *common, "--output-dir", str(tmp_path / "lin"),
                            "--total-batch-size", "2", "--epochs", "1", "--warmup-epoch", "0", "--no-tensorboard",
                            "--amp-opt-level", "O0"])
    assert 0 <= lin["last_acc1"] <= 100
    lin_ckpt = read_checkpoint(str(tmp_path / "lin" / "current.pth"))
    assert lin_ckpt.config["image_size"] == SIZE and lin_ckpt.config["arch"] == "resnet18"   # no flags needed
    x = batch()
    with torch.no_grad():   # the linear run's frozen backbone is the release's
        net = torchvision.models.resnet18(weights=None)
        net.fc = nn.Identity()
        net.load_state_dict(lin_ckpt.backbone_state(), strict=True)
        assert torch.allclose(net.eval()(x), release_features(enc, "resnet18", x), atol=1e-5)
    spec = importlib.util.spec_from_file_location("export_backbone", os.path.join(ROOT, "tools", "export_backbone.py"))
    export_backbone = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export_backbone)
    export_backbone.main(["--checkpoint", out["checkpoint"], "--output", str(tmp_path / "exp" / "r18"),
                          "--format", "torchvision"])
    exported = torch.load(tmp_path / "exp" / "r18.pth")
    assert exported.keys() == torch.load(out["backbone"]).keys()


def test_non_release_files_get_one_clear_line(tmp_path, capsys):
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, other)
    with pytest.raises(SystemExit) as e:   # what `python tools/convert_release_checkpoint.py ...` runs
        convert_tool.engine.run_cli(convert_tool.main, ["--release-checkpoint", str(other), "--output-dir",
                                                        str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1
    assert "other.pth" in err and "not a PIC release pretraining checkpoint" in err
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt: not a readable PyTorch checkpoint"):
        convert_tool.main(["--release-checkpoint", str(text), "--output-dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as e:
        convert_tool.main(["--release-checkpoint", str(tmp_path / "missing.pth"), "--output-dir", str(tmp_path / "o")])
    assert e.value.code == 2 and "missing.pth: file does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_own_and_linear_checkpoints_are_refused(tmp_path):
    src = tmp_path / "current.pth"
    make_release_checkpoint(src, "SimCLR", "resnet18", True)
    out = convert_tool.main(["--release-checkpoint", str(src), "--output-dir", str(tmp_path / "conv")])
    with pytest.raises(CheckpointError, match="already a contrast checkpoint"):
        convert_tool.main(["--release-checkpoint", out["checkpoint"], "--output-dir", str(tmp_path / "again")])
    linear = tmp_path / "linear.pth"
    torch.save({"args": argparse.Namespace(arch="resnet50"), "model": {"module.fc.weight": torch.zeros(2, 2)},
                "best_acc1": 1.0, "epoch": 1}, linear)
    with pytest.raises(CheckpointError, match="linear-evaluation checkpoint"):
        convert_tool.main(["--release-checkpoint", str(linear), "--output-dir", str(tmp_path / "lin")])
    bad = tmp_path / "bad.pth"
    raw = torch.load(src, weights_only=False)
    raw["model"]["module.extra_tensor"] = torch.zeros(3)
    torch.save(raw, bad)
    with pytest.raises(CheckpointError, match="unexpected tensors.*module.extra_tensor"):
        convert_tool.main(["--release-checkpoint", str(bad), "--output-dir", str(tmp_path / "bad")])
