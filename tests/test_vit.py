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
from contrast.models.recipe import FLAG_FIELDS, Recipe
from contrast.optim import build_optimizer
from contrast.option import parse_pretrain_args, resolve_pretrain
from contrast.precision import resolve_precision
from tests.test_recipes import RELEASE

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
#: Methods whose official code publishes no ViT recipe: MoCo v3's AdamW with their own loss values.
NO_OFFICIAL_VIT = ("PIC", "InstDisc", "MoCo", "MoCov2", "SimCLR", "BYOL", "SwAV", "SimSiam", "BarlowTwins", "VICReg",
                   "NNCLR")
#: Every resolved flag of ``--arch vit_small --epochs 300`` for the methods whose official code has a ViT
#: recipe, written by hand from the sources (docs/backbones.md cites the same lines).
OFFICIAL_VIT = {
    # facebookresearch/moco-v3 c349e6e CONFIG.md lines 109-113 (ViT-Small: --optimizer=adamw --lr=1.5e-4
    # --weight-decay=.1 --epochs=300 --warmup-epochs=40 --stop-grad-conv1 --moco-m-cos --moco-t=.2) over
    # main_moco.py's defaults: batch 4096 (line 60), dim 256, hidden 4096, m 0.99 (95-100), crop-min 0.08 (117),
    # lr x B / 256 (190), warm-up from 0 then cosine (420-425), SyncBN (196), BYOL's augmentation (261-285);
    # moco/builder.py MoCo_ViT (112-122): 3-layer projector, predictor with its last BN; vits.py: CLS token,
    # no drop path
    "MoCov3": {**RELEASE, "aug": "BYOL", "crop": 0.08, "feature_dim": 256, "mlp_head": True, "mlp_hidden_dim": 4096,
               "contrast_temperature": 0.2, "contrast_momentum": 0.99, "optimizer": "adamw",
               "base_learning_rate": 1.5e-4, "lr_scaling": "linear", "weight_decay": 0.1, "weight_decay_end": None,
               "clip_grad": 0.0, "lr_scheduler": "cosine", "warmup_epoch": 40, "warmup_multiplier": 1e6,
               "drop_path": 0.0, "global_pool": "token", "freeze_patch_embed": True, "sync_batchnorm": True,
               "mocov3_proj_layers": 3, "mocov3_pred_last_bn": True},
    # facebookresearch/dino 7c446df README lines 162-166 (vanilla ViT-S/16, 100 epochs: --arch vit_small only)
    # over main_dino.py's defaults: patch 16, out_dim 65536, norm_last_layer, momentum_teacher 0.996, no BN in
    # head (lines 50-65); teacher temp 0.04 -> 0.04 over 0 epochs (68-75); weight decay 0.04 -> 0.4 cosine,
    # clip_grad 3.0, 64 per GPU x 8, freeze_last_layer 1, lr 0.0005 x B / 256, warm-up 10, min_lr 1e-6,
    # adamw, drop_path_rate 0.1 (82-105); global crops (0.4, 1), 8 local crops (0.05, 0.4) (108-117);
    # student temp 0.1, center momentum 0.9 (365-366); SyncBN (196-198); crops 224 / 96; CLS token after
    # the norm (vision_transformer.py 213-214)
    "DINO": {**RELEASE, "aug": "BYOLMultiCrop", "crop": 0.05, "crop2": 0.4, "image_size": 224, "image_size2": 96,
             "num_crop2": 8, "feature_dim": 65536, "mlp_head": True, "mlp_hidden_dim": 2048,
             "contrast_temperature": 0.1, "contrast_momentum": 0.996, "view_batching": "joint", "optimizer": "adamw",
             "base_learning_rate": 0.0005, "lr_scaling": "linear", "weight_decay": 0.04, "weight_decay_end": 0.4,
             "clip_grad": 3.0, "lr_scheduler": "cosine", "warmup_epoch": 10, "warmup_multiplier": 1e6,
             "drop_path": 0.1, "global_pool": "token", "freeze_patch_embed": False, "sync_batchnorm": True,
             "dino_bottleneck_dim": 256, "dino_norm_last_layer": True, "dino_use_bn_in_head": False,
             "dino_teacher_temp": 0.04, "dino_warmup_teacher_temp": 0.04, "dino_warmup_teacher_temp_epochs": 0,
             "dino_center_momentum": 0.9, "dino_freeze_last_layer": 1},
}


def test_every_registered_method_has_a_vit_recipe_row():
    assert set(NO_OFFICIAL_VIT) | set(OFFICIAL_VIT) == set(METHODS) and not set(NO_OFFICIAL_VIT) & set(OFFICIAL_VIT)
    assert all(METHODS[m].vit_recipe is not None for m in METHODS)


@pytest.mark.parametrize("model", list(OFFICIAL_VIT))
def test_vit_recipe_is_the_official_one(model):
    args, cfg = resolve_pretrain(model, "--arch", "vit_small", "--epochs", "300")
    ours = {**vars(args), "sync_batchnorm": METHODS[model].vit_recipe.sync_batchnorm}
    expected = OFFICIAL_VIT[model]
    assert not set(FLAG_FIELDS) - set(expected), "the table states every recipe flag"
    diffs = {k: (ours.get(k, "<absent>"), v) for k, v in expected.items() if ours.get(k, "<absent>") != v}
    assert not diffs, f"--model {model} --arch vit_small: ours vs official {diffs}"
    assert (cfg.backbone.drop_path, cfg.backbone.freeze_patch_embed) == (expected["drop_path"],
                                                                          expected["freeze_patch_embed"])


@pytest.mark.parametrize("model", NO_OFFICIAL_VIT)
def test_vit_recipe_is_moco_v3_adamw_and_keeps_the_method_s_loss_values(model):
    vit = vars(resolve_pretrain(model, "--arch", "vit_small", "--epochs", "300")[0])
    resnet = vars(resolve_pretrain(model, "--arch", "resnet50", "--epochs", "300")[0])
    assert {k: vit[k] for k in MOCO_V3_VIT_OPTIM} == MOCO_V3_VIT_OPTIM
    assert resnet["optimizer"] in ("sgd", "lars")
    kept = ("aug", "contrast_temperature", "contrast_momentum", "feature_dim", "mlp_head", "image_size",
            "num_crop2", "view_batching")
    assert {k: vit[k] for k in kept} == {k: resnet[k] for k in kept}
    assert (vit["drop_path"], vit["global_pool"], vit["freeze_patch_embed"]) == (0.0, "token", False)
    assert (vit["weight_decay_end"], vit["clip_grad"]) == (None, 0.0)


def test_barlow_twins_biases_take_the_weights_lr_under_adamw():
    """main.py's --learning-rate-biases 0.0048 (against 0.2 for the weights) is LARS's; the ViT recipe
    gives biases and norms AdamW's lr 1.5e-4, both x B / 256."""
    _, vit = resolve_pretrain("BarlowTwins", "--arch", "vit_pico", "--batch-size", "512")
    _, resnet = resolve_pretrain("BarlowTwins", "--arch", "resnet18", "--batch-size", "512")
    assert (vit.option("barlow_lr_biases"), resnet.option("barlow_lr_biases")) == (1.5e-4, 0.0048)
    _, given = resolve_pretrain("BarlowTwins", "--arch", "vit_pico", "--barlow-lr-biases", "0.01")
    assert given.option("barlow_lr_biases") == 0.01


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
