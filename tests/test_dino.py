"""DINO: loss and gradients against a slow reference, the head, the teacher (global crops only, cosine EMA),
the center, the teacher-temperature schedule, the frozen last layer, 2 gloo ranks x B/2 == 1 process x B,
the checkpoint round trip, the BYOLMultiCrop augmentation and the command line."""
import math
import os

import pytest
import torch
from torch import nn

from contrast import distributed as cd
from contrast.config import BackboneConfig, MethodConfig
from contrast.data.transforms import MULTI_CROP_NAMES, PER_VIEW_COLORS, _views_and_colors
from contrast.models import METHODS, build_method
from contrast.models.dino import DINO, DINOHead, WeightNormLinear, teacher_temperature
from contrast.models.losses import dino_loss
from contrast.models.views import MULTI_CROP_AUGS
from tests.dist_utils import assert_same_training, run_distributed, train_like_ddp

DTYPE = torch.float64


def _rand(*shape, seed, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


# ------------------------------------------------------------------------------ loss
def _dino_reference(student, teacher, center, ts, tt):
    """Mean over pairs (teacher crop i, student crop v != i) of mean_b -sum_k q_i[b, k] log p_v[b, k], loops."""
    terms = []
    for i, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == i:
                continue
            per_sample = []
            for b in range(t.shape[0]):
                e = [math.exp((t[b, k].item() - center[0, k].item()) / tt) for k in range(t.shape[1])]
                q = [x / sum(e) for x in e]
                lse = torch.logsumexp(s[b] / ts, dim=0)
                per_sample.append(sum(-q[k] * (s[b, k] / ts - lse) for k in range(s.shape[1])))
            terms.append(sum(per_sample) / len(per_sample))
    return sum(terms) / len(terms)


def test_dino_loss_and_gradients_match_reference():
    student = [_rand(3, 5, seed=s, scale=2).requires_grad_() for s in range(4)]   # 2 globals + 2 locals
    teacher = [_rand(3, 5, seed=10 + s).requires_grad_() for s in range(2)]
    center = _rand(1, 5, seed=20, scale=0.3)
    got = dino_loss(student, teacher, center, 0.1, 0.04)
    ref = _dino_reference(student, [t.detach() for t in teacher], center, 0.1, 0.04)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), ref, rtol=1e-5)
    for g, r in zip(torch.autograd.grad(got, student), torch.autograd.grad(ref, student)):
        assert torch.allclose(g.double(), r, atol=1e-5) and r.abs().sum() > 0
    assert torch.autograd.grad(dino_loss(student, teacher, center, 0.1, 0.04), teacher, allow_unused=True) == \
        (None, None)
    # the pair of a crop with itself is skipped: with one teacher crop, student crop 0 does not matter
    one = dino_loss(student[:3], teacher[:1], center, 0.1, 0.04)
    moved = dino_loss([student[0] + 100] + student[1:3], teacher[:1], center, 0.1, 0.04)
    assert torch.equal(one, moved)
    assert torch.allclose(one.double(), _dino_reference(student[:3], [teacher[0].detach()], center, 0.1, 0.04),
                          rtol=1e-5)


# ------------------------------------------------------------------------------ head
def test_head_matches_the_official_layout():
    torch.manual_seed(0)
    head = DINOHead(12, 40, hidden_dim=16, bottleneck_dim=8)
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert [(m.in_features, m.out_features) for m in head.mlp if isinstance(m, nn.Linear)] == \
        [(12, 16), (16, 16), (16, 8)]
    assert all(m.bias.abs().sum() == 0 and m.weight.std() < 0.05 for m in head.mlp if isinstance(m, nn.Linear))
    assert sorted(n for n, _ in head.last_layer.named_parameters()) == ["weight_g", "weight_v"]
    assert not head.last_layer.weight_g.requires_grad and torch.equal(head.last_layer.weight_g, torch.ones(40, 1))
    assert [type(m) for m in DINOHead(12, 40, 16, 8, use_bn=True).mlp][:3] == [nn.Linear, nn.BatchNorm1d, nn.GELU]
    assert DINOHead(12, 40, 16, 8, norm_last_layer=False).last_layer.weight_g.requires_grad
    # the weight-normalised layer equals torch's weight_norm with the same v and g
    layer = WeightNormLinear(8, 5, fix_norm=False)
    with torch.no_grad():
        layer.weight_g.copy_(torch.rand(5, 1) + 0.5)
    ref = nn.Linear(8, 5, bias=False)
    ref = torch.nn.utils.parametrizations.weight_norm(ref)
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(layer.weight_g)
        ref.parametrizations.weight.original1.copy_(layer.weight_v)
    x = torch.randn(3, 8)
    assert torch.allclose(layer(x), ref(x), atol=1e-6)
    # the head L2-normalises the bottleneck: scaling the last MLP layer changes nothing
    x = torch.randn(4, 12)
    y = head(x)
    with torch.no_grad():
        head.mlp[4].weight.mul_(3)
        head.mlp[4].bias.mul_(3)
    assert torch.allclose(head(x), y, atol=1e-6)


# ------------------------------------------------------------------------------ method
class TinyConv(nn.Sequential):
    """Any resolution; batch norm with no bias before it (its gradient would be float noise)."""

    def __init__(self):
        super().__init__(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _method(**kw):
    torch.manual_seed(0)
    args = dict(out_dim=10, hidden_dim=8, bottleneck_dim=4, multi_crop=True, base_momentum=0.9,
                warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=2)
    args.update(kw)
    return DINO(TinyConv(), 6, **args)


def _views(seed, batch=4, locals_=2):
    return [_rand(batch, 3, 8, 8, seed=seed + i).float() for i in range(2)] + \
        [_rand(batch, 3, 4, 4, seed=seed + 10 + i).float() for i in range(locals_)]


def test_teacher_sees_only_the_global_crops_and_loss_is_dino_loss():
    method = _method()
    method.on_train_start(total_steps=6, steps_per_epoch=3)
    seen = []
    method.teacher.backbone.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    views = _views(1)
    out = method(views, torch.arange(4))
    assert seen == [(8, 3, 8, 8)]   # the two 8 px globals as one batch, never the 4 px locals
    with torch.no_grad():
        method.train()
        s = [method.head(method.backbone(torch.cat(views[:2])))[:4], method.head(method.backbone(torch.cat(views[:2])))[4:]]
        s += list(method.head(method.backbone(torch.cat(views[2:]))).chunk(2))
        t = list(method.teacher(torch.cat(views[:2])).chunk(2))
        ref = _dino_reference([x.double() for x in s], [x.double() for x in t], method.center.double(), 0.1, 0.04)
    assert torch.allclose(out["loss"].double(), ref, rtol=1e-5)
    assert float(out["teacher_temperature"]) == pytest.approx(0.04)
    out["loss"].backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    # the pending batch center is the mean teacher output of the globals, applied after the step
    assert torch.allclose(method._batch_center, torch.cat(t).mean(0, keepdim=True), atol=1e-6)
    assert torch.equal(method.center, torch.zeros(1, 10))
    method.on_train_step_end(0, lr=0.1)
    assert torch.allclose(method.center, 0.1 * torch.cat(t).mean(0, keepdim=True), atol=1e-6)


def test_teacher_temperature_schedule_by_hand():
    # np.linspace(0.04, 0.07, 3) = 0.04, 0.055, 0.07, then 0.07
    assert [teacher_temperature(e, 0.04, 0.07, 3) for e in range(5)] == pytest.approx([0.04, 0.055, 0.07, 0.07, 0.07])
    assert [teacher_temperature(e, 0.04, 0.07, 1) for e in range(3)] == pytest.approx([0.04, 0.07, 0.07])
    assert [teacher_temperature(e, 0.04, 0.07, 0) for e in range(2)] == pytest.approx([0.07, 0.07])
    assert [teacher_temperature(e, 0.02, 0.06, 5) for e in range(6)] == pytest.approx([0.02, 0.03, 0.04, 0.05, 0.06,
                                                                                       0.06])
    # through the method: steps 0-2 are epoch 0, 3-5 epoch 1 (warm-up of 2 epochs: 0.04, then 0.07)
    method = _method()
    method.on_train_start(total_steps=9, steps_per_epoch=3)
    logged = []
    for step in range(7):
        logged.append(float(method(_views(step), torch.arange(4))["teacher_temperature"]))
        method.on_train_step_end(step, lr=0.1)
    assert logged == pytest.approx([0.04] * 3 + [0.07] * 4)


def test_cosine_momentum_of_the_teacher():
    method = _method()
    method.on_train_start(total_steps=7, steps_per_epoch=7)
    for k in range(7):   # DINO's cosine_scheduler(0.9, 1, ...)[k]
        assert method.teacher.momentum_at(k) == pytest.approx(1 + 0.5 * (0.9 - 1) * (1 + math.cos(math.pi * k / 7)), abs=1e-12)
    before = {n: p.detach().clone() for n, p in method.teacher.named_parameters()}
    online = dict(method.backbone.named_parameters()) | {"h" + n: p for n, p in method.head.named_parameters()}
    with torch.no_grad():
        for i, p in enumerate(online.values()):
            if p.requires_grad:
                p.add_(0.5 + i)
    method.on_train_step_end(2, lr=0.1)
    m = 1 + 0.5 * (0.9 - 1) * (1 + math.cos(math.pi * 2 / 7))
    for (n, p), q in zip(method.teacher.named_parameters(), online.values()):
        assert torch.allclose(p, m * before[n] + (1 - m) * q, atol=1e-6), n


def test_last_layer_frozen_in_epoch_one_and_trained_from_epoch_two():
    method = _method()
    method.on_train_start(total_steps=6, steps_per_epoch=2)
    opt = torch.optim.SGD(method.param_groups(0.1, 1e-4), lr=0.1, momentum=0.9, weight_decay=1e-4)
    v0 = method.head.last_layer.weight_v.detach().clone()
    grads = []
    for step in range(4):
        opt.zero_grad()
        method(_views(step), torch.arange(4))["loss"].backward()
        method.on_before_optimizer_step(step)
        grads.append(method.head.last_layer.weight_v.grad)
        opt.step()
        method.on_train_step_end(step, 0.1)
        if step < 2:
            assert torch.equal(method.head.last_layer.weight_v, v0), step   # no gradient, no decay, no momentum
    assert grads[0] is None and grads[1] is None and grads[2].abs().sum() > 0
    assert not torch.equal(method.head.last_layer.weight_v, v0)
    assert method.head.mlp[0].weight.grad is not None   # the rest trains from the first step
    # no decay on biases and 1-d parameters (utils.get_params_groups); the frozen norms are in no group
    decay, rest = method.param_groups(0.1, 1e-4)
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in rest["params"])
    ids = {id(p) for g in (decay, rest) for p in g["params"]}
    assert id(method.head.last_layer.weight_g) not in ids and not ids & {id(p) for p in method.teacher.parameters()}


def test_state_round_trip():
    method = _method()
    method.on_train_start(total_steps=6, steps_per_epoch=2)
    for step in range(3):
        method(_views(step), torch.arange(4))
        method.on_train_step_end(step, 0.1)
    state = method.state_dict()
    assert int(state["steps_done"]) == 3 and state["center"].abs().sum() > 0
    assert any(k.startswith("teacher.head.last_layer") for k in state)
    other = _method()
    other.load_state_dict(state)
    other.on_train_start(total_steps=6, steps_per_epoch=2)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())
    assert other._step == 3 and other.teacher_temperature_at(other._step) == 0.07   # epoch 1: warmed up


# ------------------------------------------------------------------------------ 2 ranks x B/2 == 1 x B
def _train(rank, world):
    method = cd.convert_sync_batchnorm(_method(), torch.device("cpu"))
    method.on_train_start(total_steps=8, steps_per_epoch=2)
    opt = torch.optim.SGD(method.param_groups(0.5, 1e-4), lr=0.5, momentum=0.9, weight_decay=1e-4)
    views = [_views(100 + 20 * step, batch=8) for step in range(4)]
    record = train_like_ddp(method, opt, views, rank, world)
    record["temps"] = [o["teacher_temperature"] for o in record["out"]]
    return record


def _worker(rank, world, out_dir):
    torch.save(_train(rank, world), os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.slow
def test_two_ranks_match_one_process():
    """Loss, every gradient (last layer absent in epoch 1), the center over the global batch, the EMA
    teacher and its global batch-norm statistics, after 4 steps."""
    ref = _train(0, 1)
    assert "head.last_layer.weight_v" not in ref["grads"][1] and "head.last_layer.weight_v" in ref["grads"][2]
    assert ref["temps"] == pytest.approx([0.04, 0.04, 0.07, 0.07])
    for got in run_distributed(_worker, 2):
        assert_same_training(got, ref)
    initial = _method().state_dict()
    assert ref["state"]["center"].abs().sum() > 0
    assert not torch.allclose(ref["state"]["teacher.backbone.0.weight"], initial["teacher.backbone.0.weight"])
    assert not torch.allclose(ref["state"]["teacher.backbone.1.running_mean"], initial["teacher.backbone.1.running_mean"])


# ------------------------------------------------------------------------------ augmentation and recipe
def test_byol_multicrop_colours_per_crop():
    assert set(MULTI_CROP_NAMES) == set(MULTI_CROP_AUGS)
    views, colors = _views_and_colors("BYOLMultiCrop", 2, 224, 0.05, 96, 0.14, 8)
    assert [(v.size, v.scale) for v in views] == [(224, (0.14, 1.0))] * 2 + [(96, (0.05, 0.14))] * 8
    g1, g2 = colors[:2]
    assert (g1.blur_p, g1.solarize_p, g2.blur_p, g2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert all((c.blur_p, c.solarize_p) == (0.5, 0.0) for c in colors[2:])
    assert all(c.jitter == (0.4, 0.4, 0.2, 0.1) and c.jitter_p == 0.8 and c.gray_p == 0.2 for c in colors)
    assert colors[:2] == list(PER_VIEW_COLORS["BYOL"])


def test_network_from_config():
    cfg = MethodConfig(name="DINO", backbone=BackboneConfig("resnet18", "small"), mlp_head=True, feature_dim=32,
                       head_hidden_dim=16, momentum=0.996, temperature=0.1, multi_crop=True, view_batching="joint",
                       options={f.dest: f.default for f in DINO.flags})
    method = build_method(cfg, num_instances=10)
    assert method.head.last_layer.weight_v.shape == (32, 256) and method.head.mlp[0].in_features == 512
    assert METHODS["DINO"] is DINO
    with pytest.raises(ValueError, match="--no-mlp-head"):
        DINO.check_config(MethodConfig(name="DINO", mlp_head=False, options=cfg.options))


def test_vit_teacher_has_no_stochastic_depth_and_the_student_s_weights():
    """main_dino.py builds the student with drop_path_rate and the teacher without; here the teacher's
    backbone is built with drop path 0 and loaded with the student's weights, drawing nothing from the
    global random stream (the student's head is the same with or without the teacher built)."""
    from contrast.option import resolve_pretrain
    _, cfg = resolve_pretrain("DINO", "--arch", "vit_pico", "--patch-size", "4", "--image-size", "32",
                              "--image-size2", "16", "--feature-dim", "32", "--mlp-hidden-dim", "16",
                              "--dino-bottleneck-dim", "8")
    assert cfg.backbone.drop_path == 0.1
    torch.manual_seed(0)
    method = build_method(cfg, num_instances=10)
    student, teacher = method.backbone, method.teacher.backbone
    assert student.state_dict().keys() == teacher.state_dict().keys()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in student.state_dict().items())
    method.train()
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))   # block 2 drops at rate 0.1
    with torch.no_grad():
        assert torch.equal(teacher(x), teacher(x))            # no random draw in train mode
        assert not torch.equal(student(x), student(x))        # the student drops paths
    torch.manual_seed(0)
    backbone, feat_dim = DINO.build_backbone(cfg)
    alone = DINO(backbone, feat_dim, 32, 16, 8, multi_crop=True)
    assert all(torch.equal(a, b) for a, b in zip(alone.head.parameters(), method.head.parameters()))


# ------------------------------------------------------------------------------ command line
@pytest.mark.slow
def test_pretrain_then_knn_and_linear(pretrained_run):
    """main_knn.py and main_linear.py on the run of test_cli_pretrain.py's cell, and the recipe it recorded."""
    ckpt, _ = pretrained_run("DINO").evaluated()
    assert ckpt.config["aug"] == "BYOLMultiCrop" and ckpt.config["clip_grad"] == 3.0
    assert ckpt.config["weight_decay_end"] == 0.01 and ckpt.config["num_crop2"] == 2
    assert any(k.startswith("teacher.") for k in ckpt.model) and "center" in ckpt.model


@pytest.mark.slow
def test_resume_from_the_middle_of_an_epoch_is_bit_exact(tmp_path, monkeypatch):
    """Stopped after step 3 of 2 epochs x 2 steps (the last layer frozen in epoch 1, the teacher temperature
    warming up, the cosine weight decay): --auto-resume ends with the weights, teacher, center, optimiser
    and weight decay of the uninterrupted run."""
    import main_pretrain
    from contrast.checkpoint import load_file
    from tests.synthetic import make_image_folder
    from tests.test_cli_pretrain import METHOD_FLAGS, tiny_args
    from tests.test_resume import _assert_same_state, _Stop, _stop_after_mid_epoch_save
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=4, size=(36, 36))
    flags = METHOD_FLAGS["DINO"] + ["--warmup-epoch", "1", "--save-every-minutes", "1e-9"]
    main_pretrain.main(tiny_args(data, tmp_path / "straight", *flags, epochs=2))
    with monkeypatch.context() as m:
        _stop_after_mid_epoch_save(m, at_step=3)
        with pytest.raises(_Stop):
            main_pretrain.main(tiny_args(data, tmp_path / "resumed", *flags, epochs=2))
    torch.manual_seed(99)
    main_pretrain.main(tiny_args(data, tmp_path / "resumed", *flags, "--auto-resume", epochs=2))
    a, b = load_file(str(tmp_path / "straight" / "current.pth")), load_file(str(tmp_path / "resumed" / "current.pth"))
    _assert_same_state(a, b)
    assert int(a["model"]["steps_done"]) == 4 and a["model"]["center"].abs().sum() > 0
    wd = [g["weight_decay"] for g in a["optimizer"]["param_groups"]]
    assert wd == [g["weight_decay"] for g in b["optimizer"]["param_groups"]] and wd[1] == 0.0
    assert wd[0] == pytest.approx(0.01)   # after the 4 of 4 steps: --weight-decay-end
