"""ViT backbones (timm): sizes, features, position-embedding interpolation, weight decay, frozen patch
projection, bf16 autocast, precision choice and the ViT recipes of every method.

Small: ``vit_pico`` (the ``vit_tiny`` configuration with width 64, depth 2) at 32 px with patch 4.
"""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from contrast.config import BackboneConfig
from contrast.models import METHODS, build_method, make_backbone, register, unregister
from contrast.models.recipe import Recipe
from contrast.optim import build_optimizer
from contrast.option import parse_pretrain_args, resolve_pretrain
from contrast.precision import resolve_precision

PICO = BackboneConfig("vit_pico", image_size=32, patch_size=4)
VIT = ["--arch", "vit_pico", "--patch-size", "4", "--image-size", "32"]

#: MoCo v3 CONFIG.md, ViT-Small and ViT-Base (github.com/facebookresearch/moco-v3): --optimizer=adamw
#: --lr=1.5e-4 --weight-decay=.1 --warmup-epochs=40, main_moco.py: lr = lr * batch_size / 256, cosine
#: after a linear warm-up from 0 (here from lr / 1e6). Written by hand, not read from the code.
MOCO_V3_VIT_OPTIM = {"optimizer": "adamw", "base_learning_rate": 1.5e-4, "lr_scaling": "linear",
                     "weight_decay": 0.1, "lr_scheduler": "cosine", "warmup_epoch": 40,
                     "warmup_multiplier": 1e6}
#: timm's architectures (vision_transformer.py: vit_tiny/small/base_patch16_224): width, depth, heads.
SIZES = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12), "vit_pico": (64, 2, 2)}


def images(b, size, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", list(SIZES))
def test_vit_sizes_and_patch16_default(arch):
    with torch.device("meta"):
        net = make_backbone(BackboneConfig(arch))
    width, depth, heads = SIZES[arch]
    assert net.feat_dim == width and len(net.blocks) == depth and net.blocks[0].attn.num_heads == heads
    assert net.patch_embed.proj.kernel_size == (16, 16) and net.pos_embed.shape == (1, 1 + 14 * 14, width)


def test_patch4_32px_and_interpolated_position_embedding_for_small_crops():
    torch.manual_seed(0)
    net = make_backbone(PICO).eval()
    assert net.pos_embed.shape == (1, 1 + 8 * 8, 64)
    x16 = images(2, 16)
    # independent reference: a 16 px ViT whose position embedding is the 8x8 grid resized bicubically
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=4,
                            embed_dim=64, depth=2, num_heads=2).eval()
    state = dict(net.state_dict())
    grid = state["pos_embed"][:, 1:].reshape(1, 8, 8, 64).permute(0, 3, 1, 2)
    small = F.interpolate(grid, size=(4, 4), mode="bicubic", antialias=True, align_corners=False)
    state["pos_embed"] = torch.cat([state["pos_embed"][:, :1], small.permute(0, 2, 3, 1).reshape(1, 16, 64)], 1)
    ref.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert net(images(2, 32)).shape == (2, 64)
        torch.testing.assert_close(net(x16), ref(x16), atol=1e-5, rtol=1e-5)


def test_evaluation_features_against_timm_intermediates():
    torch.manual_seed(0)
    net = make_backbone(BackboneConfig("vit_pico", image_size=32, patch_size=4)).eval()
    x = images(3, 32)
    with torch.no_grad():
        final, inter = net.forward_intermediates(x, indices=2, norm=True, return_prefix_tokens=True)
        cls_last = inter[-1][1][:, 0]
        patches = inter[-1][0].flatten(2).mean(-1)  # (B, D, h, w) spatial tokens
        torch.testing.assert_close(net.features(x, "cls"), cls_last)
        torch.testing.assert_close(net.features(x, "pooled"), cls_last)   # global pool token: the CLS token
        torch.testing.assert_close(net.features(x, "avgpool"), patches)
        torch.testing.assert_close(net.features(x, "cls4"), torch.cat([t[1][:, 0] for t in inter], 1))
        torch.testing.assert_close(net.features(x, "cls+avgpool"), torch.cat([cls_last, patches], 1))
    assert {k: net.feature_dim(k) for k in net.feature_kinds} == \
        {"pooled": 64, "cls": 64, "avgpool": 64, "cls4": 128, "cls+avgpool": 128}
    assert net.eval_feature == "cls"
    avg = make_backbone(BackboneConfig("vit_pico", image_size=32, patch_size=4, global_pool="avg")).eval()
    with torch.no_grad():
        tokens = avg.forward_features(x)
        torch.testing.assert_close(avg(x), avg.fc_norm(tokens[:, 1:].mean(1)))
    resnet = make_backbone(BackboneConfig("resnet18"))
    with pytest.raises(ValueError, match="'cls4' is not available for a resnet backbone"):
        resnet.features(x, "cls4")


def _names_without_decay(net):
    """Independent of the code: biases, every LayerNorm weight, the position embedding and the class token."""
    return {n for n, _ in net.named_parameters()
            if n.endswith(".bias") or ".norm" in n or n.startswith("norm.") or n in ("pos_embed", "cls_token")}


def test_no_weight_decay_names_and_adamw_groups():
    torch.manual_seed(0)
    net = make_backbone(PICO)
    assert net.no_weight_decay() == _names_without_decay(net)
    _, cfg = resolve_pretrain("SimCLR", *VIT, "--feature-dim", "8", "--mlp-hidden-dim", "16")
    method = build_method(cfg, 8)
    skip = method.no_weight_decay_params()
    opt = build_optimizer(method.param_groups(1.0, 0.1), "adamw", 1.0, 0.9, 0.1, no_decay=skip)
    assert isinstance(opt, torch.optim.AdamW)
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    for p in method.parameters():
        p.grad = torch.zeros_like(p)   # Adam's step is 0: only the decay moves a weight, w <- w (1 - lr wd)
    opt.step()
    expected_undecayed = {"backbone." + n for n in _names_without_decay(net)} | \
        {n for n, p in method.named_parameters() if p.ndim < 2}
    for n, p in method.named_parameters():
        want = before[n] if n in expected_undecayed else before[n] * (1 - 1.0 * 0.1)
        torch.testing.assert_close(p.detach(), want, msg=n)


def test_frozen_patch_projection_does_not_change_while_training():
    _, cfg = resolve_pretrain("MoCov2", *VIT, "--freeze-patch-embed", "--feature-dim", "8",
                              "--contrast-num-negative", "8")
    torch.manual_seed(0)
    method = build_method(cfg, 8)
    proj = {k: v.clone() for k, v in method.backbone.patch_embed.proj.state_dict().items()}
    other = method.backbone.blocks[0].attn.qkv.weight.detach().clone()
    opt = build_optimizer(method.param_groups(1e-3, 0.1), "adamw", 1e-3, 0.9, 0.1,
                          no_decay=method.no_weight_decay_params())
    method.on_train_start(3, 3)
    for step in range(3):
        views = [images(4, 32, 10 * step + v) for v in range(2)]
        loss = method(views, torch.arange(4) + 4 * (step % 2))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.on_train_step_end(step, 1e-3)
    for k, v in method.backbone.patch_embed.proj.state_dict().items():
        assert torch.equal(v, proj[k]), f"patch_embed.proj.{k} moved"
    assert not torch.equal(method.backbone.blocks[0].attn.qkv.weight, other)
    assert all(not p.requires_grad for p in method.backbone.patch_embed.proj.parameters())


@pytest.mark.parametrize("model", ["PIC", "MoCov2", "BYOL", "SwAV"])
def test_bf16_autocast_cpu_steps_have_finite_fp32_losses(model):
    flags = {"PIC": [], "MoCov2": ["--contrast-num-negative", "8"], "BYOL": ["--mlp-hidden-dim", "32"],
             "SwAV": ["--aug", "MultiCrop", "--image-size2", "16", "--num-crop2", "1", "--crop", "0.08",
                      "--crop2", "0.3", "--mlp-hidden-dim", "32", "--swav-num-prototypes", "10"]}[model]
    _, cfg = resolve_pretrain(model, *VIT, "--feature-dim", "16", *flags)
    torch.manual_seed(0)
    method = build_method(cfg, 8)
    opt = build_optimizer(method.param_groups(1e-3, 0.1), "adamw", 1e-3, 0.9, 0.1,
                          no_decay=method.no_weight_decay_params())
    method.on_train_start(4, 4)
    sizes = [32] * cfg.num_crop + ([16] if cfg.multi_crop else [])
    for step in range(4):
        views = [images(4, s, 100 * step + i) for i, s in enumerate(sizes)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = method(views, torch.arange(4) + 4 * (step % 2))
        assert out["loss"].dtype == torch.float32 and math.isfinite(out["loss"].item()), (step, out["loss"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        method.on_train_step_end(step, 1e-3)
    assert all(torch.isfinite(p).all() for p in method.parameters())


def test_auto_precision_is_bf16_on_cuda_for_a_backbone_that_prefers_it():
    cuda = torch.device("cuda")
    prec, note = resolve_precision("auto", cuda, prefer_bf16=True, cuda_bf16_probe=lambda: True)
    assert prec.dtype == torch.bfloat16 and prec.scaler is None and "bf16" in note
    prec, _ = resolve_precision("auto", cuda, prefer_bf16=True, cuda_bf16_probe=lambda: False)
    assert prec.dtype == torch.float16 and prec.scaler is not None        # pre-Ampere: the release's fp16
    prec, _ = resolve_precision("auto", cuda, prefer_bf16=False, cuda_bf16_probe=lambda: True)
    assert prec.dtype == torch.float16                                     # ResNets keep the release's O1
    prec, _ = resolve_precision("auto", torch.device("cpu"), prefer_bf16=True, bf16_probe=lambda: (True, "x"))
    assert prec.dtype is None                                              # fp32 on the CPU unless asked
    assert make_backbone(PICO).prefers_bf16 and not make_backbone(BackboneConfig("resnet18")).prefers_bf16


# ------------------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize("model", ["PIC", "InstDisc", "MoCo", "MoCov2", "SimCLR", "BYOL", "SwAV"])
def test_vit_recipe_is_moco_v3_adamw_and_keeps_the_method_s_loss_values(model):
    vit = vars(resolve_pretrain(model, "--arch", "vit_small", "--epochs", "300")[0])
    resnet = vars(resolve_pretrain(model, "--arch", "resnet50", "--epochs", "300")[0])
    assert {k: vit[k] for k in MOCO_V3_VIT_OPTIM} == MOCO_V3_VIT_OPTIM
    assert resnet["optimizer"] in ("sgd", "lars")
    kept = ("aug", "contrast_temperature", "contrast_momentum", "feature_dim", "mlp_head", "image_size",
            "num_crop2", "view_batching")
    assert {k: vit[k] for k in kept} == {k: resnet[k] for k in kept}
    assert (vit["drop_path"], vit["global_pool"], vit["freeze_patch_embed"]) == (0.0, "token", False)


def test_a_method_without_a_vit_recipe_is_refused_in_one_line(capsys):
    class NoViT(METHODS["SimCLR"]):
        name = "NoViTTest"
        vit_recipe = None
    register(NoViT)
    try:
        assert parse_pretrain_args(["--model", "NoViTTest"]).optimizer == "lars"   # ResNet: its recipe
        with pytest.raises(SystemExit):
            parse_pretrain_args(["--model", "NoViTTest", "--arch", "vit_tiny"])
        assert "--model NoViTTest declares no recipe for --arch vit_tiny" in capsys.readouterr().err
    finally:
        unregister("NoViTTest")


def test_recipe_fields_for_the_vit_flags_are_given_by_a_vit_recipe():
    class Frozen(METHODS["MoCov2"]):
        name = "FrozenViTTest"
        vit_recipe = Recipe(optimizer="adamw", drop_path=0.1, freeze_patch_embed=True, global_pool="avg")
    register(Frozen)
    try:
        _, cfg = resolve_pretrain("FrozenViTTest", *VIT)
        assert (cfg.backbone.drop_path, cfg.backbone.freeze_patch_embed, cfg.backbone.global_pool) == \
            (0.1, True, "avg")
        _, cfg = resolve_pretrain("FrozenViTTest", *VIT, "--no-freeze-patch-embed", "--drop-path", "0")
        assert (cfg.backbone.drop_path, cfg.backbone.freeze_patch_embed) == (0.0, False)
    finally:
        unregister("FrozenViTTest")


def test_train_step_benchmark_times_a_vit_with_its_vit_recipe(tmp_path):
    import importlib.util
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("train_step_vit", os.path.join(root, "benchmarks", "train_step.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--methods", "SimCLR", "--arch", "vit_pico", "resnet18", "--batch-size", "2", "--iters", "1",
                       "--warmup", "0", "--precisions", "fp32", "--channels-last", "0", "--device", "cpu",
                       "--output-json", str(tmp_path / "ts.json")])
    assert [(r["arch"], r["optimizer"]) for r in rows] == [("vit_pico", "adamw"), ("resnet18", "lars")]
    assert all(r["images_per_s"] > 0 for r in rows)
