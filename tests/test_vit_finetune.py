"""Full fine-tuning of a ViT (``main_linear.py --finetune`` on ``--arch vit_*``): MAE's recipe
(facebookresearch/mae main_finetune.py, FINETUNE.md, util/lr_decay.py). Layer-wise lr decay against a
table written by hand and against MAE's ``param_groups_lrd`` rule as a plain loop, MAE's no-decay set,
label smoothing against its formula, the resolved defaults against MAE's values, then a tiny ``vit_pico``
run (32 px, patch 4) that trains the backbone and resumes bit for bit, and 2 gloo processes that equal one."""
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import main_linear
import main_pretrain
from contrast.checkpoint import FINETUNE, read_checkpoint
from contrast.config import BackboneConfig
from contrast.models import make_backbone
from contrast.optim import ETA_MIN, build_optimizer
from contrast.option_eval import eval_config, parse_linear_args, resolve_protocol
from tests.dist_utils import free_port
from tests.synthetic import make_image_folder
from tests.test_cli_linear import stop_after_the_first_epoch
from tests.test_cli_pretrain import tiny_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
         "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
#: vit_pico (2 blocks) + the classifier, layer decay 0.5: layer i of L = 2 gets 0.5 ** (3 - i); the patch
#: embedding, CLS token and position embedding are layer 0, block k layer k + 1, final norm and fc layer 3.
HAND_TABLE = {"backbone.cls_token": 0.125, "backbone.pos_embed": 0.125, "backbone.patch_embed.proj.weight": 0.125,
              "backbone.patch_embed.proj.bias": 0.125,
              **{f"backbone.blocks.0.{n}": 0.25 for n in BLOCK}, **{f"backbone.blocks.1.{n}": 0.5 for n in BLOCK},
              "backbone.norm.weight": 1.0, "backbone.norm.bias": 1.0, "fc.weight": 1.0, "fc.bias": 1.0}


def pico_classifier(num_classes=3, **kw):
    torch.manual_seed(0)
    backbone = make_backbone(BackboneConfig("vit_pico", image_size=32, patch_size=4))
    return main_linear.LinearClassifier(backbone, num_classes, finetune=True, **kw)


def scales_of(groups, model, lr):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["lr"] / lr for g in groups for p in g["params"]}


def mae_lr_scales(model, layer_decay):
    """MAE util/lr_decay.py ``param_groups_lrd`` / ``get_layer_id_for_vit`` as a plain loop (our ``fc`` is
    MAE's ``head``)."""
    backbone = model.backbone
    num_layers = len(backbone.blocks) + 1
    out = {}
    for n, p in list(backbone.named_parameters()) + [("head." + k, p) for k, p in model.fc.named_parameters()]:
        if n in ["cls_token", "pos_embed"] or n.startswith("patch_embed"):
            layer_id = 0
        elif n.startswith("blocks"):
            layer_id = int(n.split(".")[1]) + 1
        else:
            layer_id = num_layers
        out[("fc." + n[5:]) if n.startswith("head.") else "backbone." + n] = layer_decay ** (num_layers - layer_id)
    return out


def test_layer_decay_groups_are_the_hand_table_and_maes_rule():
    model = pico_classifier()
    groups, _ = model.finetune_groups(0.1, 0.5)
    assert scales_of(groups, model, 0.1) == pytest.approx(HAND_TABLE)
    assert set(scales_of(groups, model, 0.1)) == set(HAND_TABLE) == {n for n, _ in model.named_parameters()}
    assert len(groups) == 4
    for decay in (0.65, 0.75):
        got = scales_of(model.finetune_groups(2e-3, decay)[0], model, 2e-3)
        assert got == pytest.approx(mae_lr_scales(model, decay))
    groups, _ = model.finetune_groups(0.1, 1.0)   # no layer decay: one group, every parameter in order
    assert len(groups) == 1 and groups[0]["params"] == list(model.parameters()) and groups[0]["lr"] == 0.1


def test_adamw_leaves_maes_no_decay_set_undecayed():
    """MAE: no weight decay on 1-D parameters and the model's ``no_weight_decay()`` (pos_embed, cls_token)."""
    model = pico_classifier()
    groups, no_decay = model.finetune_groups(1e-3, 0.65)
    opt = build_optimizer(groups, "adamw", 1e-3, 0.9, 0.05, no_decay=no_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    mae = {n: 0.0 if p.ndim == 1 or n in ("backbone.pos_embed", "backbone.cls_token") else 0.05
           for n, p in model.named_parameters()}
    assert decay == mae and decay["fc.weight"] == 0.05 and decay["backbone.blocks.0.attn.qkv.weight"] == 0.05
    assert all(g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 for g in opt.param_groups)
    lrs = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs == pytest.approx({n: 1e-3 * s for n, s in mae_lr_scales(model, 0.65).items()})


def test_resnet_layer_decay_is_by_stage():
    torch.manual_seed(0)
    net = make_backbone(BackboneConfig("resnet18", stem="small"))
    model = main_linear.LinearClassifier(net, 2, finetune=True)
    scales = scales_of(model.finetune_groups(1.0, 0.5)[0], model, 1.0)
    assert scales["backbone.conv1.weight"] == scales["backbone.bn1.bias"] == 0.5 ** 5
    assert scales["backbone.layer1.0.conv1.weight"] == 0.5 ** 4 and scales["backbone.layer4.1.bn2.weight"] == 0.5
    assert scales["fc.weight"] == 1.0


def test_label_smoothing_is_the_smoothed_cross_entropy():
    model = pico_classifier(num_classes=5, label_smoothing=0.1).eval()
    x, label = torch.randn(3, 3, 32, 32), torch.tensor([0, 4, 2])
    with torch.no_grad():
        loss = model([x], label)["loss"]
        logp = F.log_softmax(model.logits(x).double(), 1)
    expected = sum(0.9 * -logp[i, label[i]] + 0.1 * -logp[i].mean() for i in range(3)) / 3   # timm's / MAE's
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


#: MAE's ViT-B fine-tuning (FINETUNE.md, "Fine-tuning": --epochs 100 --blr 5e-4 --layer_decay 0.65
#: --weight_decay 0.05 --drop_path 0.1; main_finetune.py defaults --warmup_epochs 5 --smoothing 0.1
#: --min_lr 1e-6, torch.optim.AdamW, lr = blr x eff_batch_size / 256, half-cycle cosine per iteration).
MAE_VIT_B = {"optimizer": "adamw", "learning_rate": 5e-4, "lr_scaling": "linear", "weight_decay": 0.05,
             "layer_decay": 0.65, "drop_path": 0.1, "label_smoothing": 0.1, "warmup_epoch": 5, "epochs": 100,
             "lr_scheduler": "cosine"}


def test_vit_finetune_defaults_are_maes():
    cfg = resolve_protocol(eval_config(parse_linear_args(["--pretrained-model", "x.pth", "--arch", "vit_base",
                                                          "--finetune", "--total-batch-size", "1024"])))
    got = {**vars(cfg.optim), **vars(cfg.loop), **vars(cfg.model)}
    assert {k: got[k] for k in MAE_VIT_B} == MAE_VIT_B
    assert cfg.optim.learning_rate * 1024 / 256 == pytest.approx(2e-3)   # FINETUNE.md's batch 1024
    assert ETA_MIN == 1e-6 and cfg.optim.warmup_multiplier == 1e6         # min lr; warm-up from lr / 1e6
    large = resolve_protocol(eval_config(parse_linear_args(   # FINETUNE.md's ViT-L command: flags override
        ["--pretrained-model", "x.pth", "--arch", "vit_base", "--finetune", "--learning-rate", "1e-3",
         "--layer-decay", "0.75", "--epochs", "50", "--drop-path", "0.2"])))
    assert (large.optim.learning_rate, large.optim.layer_decay, large.loop.epochs, large.model.drop_path,
            large.optim.optimizer) == (1e-3, 0.75, 50, 0.2, "adamw")


def test_layer_decay_flags_are_checked(capsys):
    for flag in ("--layer-decay", "--drop-path", "--label-smoothing"):
        with pytest.raises(SystemExit):
            parse_linear_args(["--pretrained-model", "x.pth", flag, "1.5"])
        assert f"{flag} must be in [0, 1]" in capsys.readouterr().err


@pytest.fixture(scope="module")
def vit_pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("vitft")
    data = make_image_folder(str(root / "data"), num_classes=2, per_class=4, size=(36, 36))
    main_pretrain.main(tiny_args(data, root / "pre", "--model", "MoCo", "--contrast-num-negative", "8",
                                 "--arch", "vit_pico", "--patch-size", "4", "--base-learning-rate", "0.01"))
    return data, str(root / "pre" / "current.pth")


def vit_finetune_args(data, ckpt, out, *extra, epochs=1):
    """Arch, patch and image size from the checkpoint; every protocol value MAE's (warm-up clamped to the run)."""
    return ["--data-dir", str(data), "--pretrained-model", str(ckpt), "--output-dir", str(out), "--finetune",
            "--total-batch-size", "4", "--epochs", str(epochs), "--num-workers", "0", "--print-freq", "1",
            "--no-tensorboard", *extra]


def test_vit_finetune_trains_the_backbone(vit_pretrained, tmp_path):
    data, ckpt = vit_pretrained
    pre = read_checkpoint(ckpt).backbone_state()
    result = main_linear.main(vit_finetune_args(data, ckpt, tmp_path / "ft", "--learning-rate", "0.05"))
    ft = read_checkpoint(str(tmp_path / "ft" / "current.pth"))
    assert ft.kind == FINETUNE and ft.config["arch"] == "vit_pico" and ft.config["patch_size"] == 4
    assert (ft.config["optimizer"], ft.config["layer_decay"], ft.config["drop_path"],
            ft.config["label_smoothing"], ft.config["weight_decay"]) == ("adamw", 0.65, 0.1, 0.1, 0.05)
    moved = {k for k in pre if not torch.equal(pre[k], ft.backbone_state()[k])}
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.weight"} <= moved
    log = open(tmp_path / "ft" / "log.txt").read()
    losses = [float(x) for x in re.findall(r"train epoch .* loss (\S+) ", log)]
    assert losses and all(math.isfinite(x) for x in losses) and 0 <= result["last_acc1"] <= 100
    lrs = sorted({g["lr"] for g in ft.record.optimizer["param_groups"]})   # 4 layers: 0.65^3, 0.65^2, 0.65, 1 x lr
    assert [lr / lrs[-1] for lr in lrs] == pytest.approx([0.65 ** 3, 0.65 ** 2, 0.65, 1.0])


def test_vit_finetune_resume_matches_an_uninterrupted_run(vit_pretrained, tmp_path, monkeypatch):
    """Drop path and the layer-decay groups: 2 epochs straight == stopped after epoch 1 + --auto-resume."""
    data, ckpt = vit_pretrained
    args = ("--total-batch-size", "2", "--warmup-epoch", "1")
    straight = main_linear.main(vit_finetune_args(data, ckpt, tmp_path / "a", *args, epochs=2))
    stop_after_the_first_epoch(monkeypatch, vit_finetune_args(data, ckpt, tmp_path / "c", *args, epochs=2))
    resumed = main_linear.main(vit_finetune_args(data, ckpt, tmp_path / "c", *args, "--auto-resume", epochs=2))
    a, c = (read_checkpoint(str(tmp_path / d / "current.pth")) for d in "ac")
    assert a.epoch == c.epoch == 2 and all(torch.equal(a.model[k], c.model[k]) for k in a.model)
    assert resumed == straight


@pytest.mark.slow
def test_vit_finetune_two_gloo_processes_equal_one(vit_pretrained, tmp_path):
    """torchrun, 2 processes x 2 images == 1 process x 4 images (no drop path: its draws are per rank), on half
    of the labels (the same class-balanced subset on both ranks)."""
    data, ckpt = vit_pretrained
    args = ("--drop-path", "0", "--label-fraction", "0.5", "--warmup-epoch", "0", "--learning-rate", "0.05")
    main_linear.main(vit_finetune_args(data, ckpt, tmp_path / "one", *args, epochs=2))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", "main_linear.py",
                        *vit_finetune_args(data, ckpt, tmp_path / "two", *args, epochs=2)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = (read_checkpoint(str(tmp_path / d / "current.pth")) for d in ("one", "two"))
    assert two.kind == FINETUNE and two.world_size == 2 and one.world_size == 1
    assert (tmp_path / "one" / "label_subset.txt").read_text() == (tmp_path / "two" / "label_subset.txt").read_text()
    pre = read_checkpoint(ckpt).backbone_state()
    assert any(not torch.equal(pre[k], v) for k, v in one.backbone_state().items())   # the backbone trained
    for k in one.model:
        torch.testing.assert_close(two.model[k], one.model[k], atol=1e-5, rtol=1e-4, msg=k)
