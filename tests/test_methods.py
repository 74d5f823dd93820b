"""Backbones, heads and the four methods in one process."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from contrast.config import BackboneConfig, MethodConfig
from contrast.models import (ARCHS, METHODS, InstDisc, MoCo, PIC, SimCLR, build_backbone, build_head,
                             build_instance_classifier, build_method, encode_views, method_class)


def tiny_encoder():
    """BN-free encoder accepting any resolution: (B, 3, H, W) -> (B, 6)."""
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def images(b, size, seed):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ backbones and heads
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_backbone_state_dict_loads_into_torchvision(arch):
    backbone, feat_dim = build_backbone(arch)
    plain = getattr(torchvision.models, arch)(weights=None)
    assert feat_dim == plain.fc.in_features
    del plain.fc
    plain.fc = nn.Identity()
    plain.load_state_dict(backbone.state_dict(), strict=True)
    x = images(2, 64, 0)
    backbone.eval(), plain.eval()
    assert torch.allclose(plain(x), backbone(x))


def test_small_stem_keeps_names_and_works_at_32px():
    small, feat_dim = build_backbone("resnet18", stem="small")
    plain, _ = build_backbone("resnet18")
    assert small.state_dict().keys() == plain.state_dict().keys()
    assert small.conv1.weight.shape == (64, 3, 3, 3) and plain.conv1.weight.shape == (64, 3, 7, 7)
    assert isinstance(small.maxpool, nn.Identity)
    features = {}
    small.layer4.register_forward_hook(lambda m, i, o: features.setdefault("layer4", o))
    assert small(images(2, 32, 1)).shape == (2, feat_dim)
    assert features["layer4"].shape[-1] == 4  # 32 / 8: only the three strided stages downsample


def test_unknown_arch_lists_choices():
    with pytest.raises(ValueError, match="--arch 'resnet5'.*resnet18.*wide_resnet101_2"):
        build_backbone("resnet5")
    assert len(ARCHS) == 12  # 7 torchvision ResNets + the release's 5 ResNet-D


def test_heads():
    mlp = build_head(8, 3, mlp=True)
    assert [type(m) for m in mlp] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (mlp[0].in_features, mlp[0].out_features, mlp[2].out_features) == (8, 2048, 3)  # the release's width
    linear = build_head(8, 3)
    assert isinstance(linear, nn.Linear) and linear.out_features == 3


def test_encode_views_separate_or_joint():
    enc = tiny_encoder()
    views = [images(2, 8, 0), images(2, 4, 1), images(2, 4, 2), images(2, 8, 3)]
    for batching, expected_calls in (("joint", [2, 4, 2]), ("separate", [2, 2, 2, 2])):
        calls = []
        outs = encode_views(lambda x: calls.append(x.shape[0]) or enc(x), views, batching)
        assert calls == expected_calls
        for out, v in zip(outs, views):
            assert torch.allclose(out, enc(v), atol=1e-6)
    with pytest.raises(ValueError, match="--view-batching"):
        encode_views(enc, views, "together")


def test_view_batching_changes_batch_norm_statistics():
    """With batch norm, one pass per view normalises each view by its own statistics (the release);
    the joint pass normalises both by the statistics of the concatenation."""
    bn = nn.BatchNorm2d(3)
    views = [images(4, 4, 0), images(4, 4, 1) * 3 + 1]
    separate = encode_views(bn, views, "separate")
    joint = encode_views(bn, views, "joint")
    for v, out in zip(views, separate):
        ref = (v - v.mean((0, 2, 3), keepdim=True)) / torch.sqrt(v.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
        assert torch.allclose(out, ref, atol=1e-5)
    both = torch.cat(views)
    ref = (both - both.mean((0, 2, 3), keepdim=True)) / torch.sqrt(both.var((0, 2, 3), unbiased=False, keepdim=True)
                                                                 + 1e-5)
    assert torch.allclose(torch.cat(joint), ref, atol=1e-5)


# ------------------------------------------------------------------------------ build_method
def _cfg(model, arch="resnet18", multi_crop=False, **options):
    defaults = {f.dest: f.default for f in method_class(model).flags}
    return MethodConfig(name=model, backbone=BackboneConfig(arch, "small"), mlp_head=True, feature_dim=16,
                        temperature=0.2, momentum=0.9, num_negative=8, multi_crop=multi_crop,
                        options={**defaults, **options})


@pytest.mark.parametrize("model,aug", [("PIC", "MultiCrop"), ("PIC", "SimCLR"), ("InstDisc", "InstDisc"),
                                       ("MoCo", "MoCov2"), ("SimCLR", "SimCLR")])
def test_each_method_trains_a_step_on_resnet18(model, aug):
    splits = {"bn_splits": 2} if model == "MoCo" else {}   # one process: 2 split-BN groups of the batch of 4
    method = build_method(_cfg(model, multi_crop=aug == "MultiCrop", **splits), num_instances=10)
    n = method_class(model).views.total(aug, num_crop2=3)
    large = method_class(model).views.count
    views = [images(4, 32 if i < large or aug != "MultiCrop" else 16, i) for i in range(n)]
    out = method(views, torch.tensor([0, 3, 5, 9]))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert method.backbone.conv1.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in method.parameters() if p.grad is not None)
    method.on_train_step_end(0, 0.1)


def test_registry_errors_and_views():
    with pytest.raises(ValueError, match="--model 'Barlow'.*PIC"):
        build_method(_cfg("PIC").__class__(name="Barlow"), 10)
    with pytest.raises(ValueError, match="--pic-num-negative"):
        build_instance_classifier(10, 4, 0.2, num_negative=-1)
    assert {name: cls.name for name, cls in METHODS.items()} == {name: name for name in METHODS}
    assert [METHODS[m].views.total("SimCLR", 3) for m in ("PIC", "InstDisc", "MoCo", "SimCLR")] == [1, 1, 2, 2]
    assert METHODS["PIC"].views.total("MultiCrop", 3) == 4
    method = build_method(_cfg("PIC"), 10)
    assert isinstance(method, PIC) and method.rank_state_dict() is None
    sampled = build_method(_cfg("PIC", pic_num_negative=4), 10)
    assert type(sampled.classifier).__name__ == "SampledInstanceClassifier"
    with pytest.raises(ValueError, match=r"MoCo takes 2 view\(s\) per image, got 1"):
        build_method(_cfg("MoCo"), 10)([images(2, 32, 0)], torch.arange(2))
    with pytest.raises(ValueError, match="does not take --aug MultiCrop"):
        build_method(_cfg("MoCo", multi_crop=True), 10)
    with pytest.raises(KeyError, match="method option .pic_.* was not given to PIC"):
        PIC.from_config(MethodConfig(name="PIC", backbone=BackboneConfig("resnet18")), 10)


# ------------------------------------------------------------------------------ PIC
def _pic_reference_ce(z, weight, index, tau):
    return F.cross_entropy(z @ F.normalize(weight, dim=1).t() / tau, index)


def test_pic_multicrop_weight_gradient_comes_from_large_crop_only():
    method = PIC(tiny_encoder(), 6, num_instances=7, feature_dim=4, mlp_head=False, temperature=0.2,
                 multi_crop=True)
    index = torch.tensor([6, 2, 2])
    views = [images(3, 8, 0), images(3, 4, 1), images(3, 4, 2)]
    method(views, index)["loss"].backward()
    got = method.classifier.weight.grad.clone()
    weight = method.classifier.weight.detach().clone().requires_grad_()
    z_large = F.normalize(method.head(method.backbone(views[0])), dim=1).detach()
    (_pic_reference_ce(z_large, weight, index, 0.2) / 3).backward()
    assert torch.allclose(got, weight.grad, atol=1e-6) and got.abs().sum() > 0


def test_pic_several_large_crops_match_the_release_formula():
    """--num-crop 2: the release concatenates the logits of the k large crops (against W) and the small
    crops (against a detached W) and takes one cross-entropy over all (k + k_small) B rows."""
    method = PIC(tiny_encoder(), 6, num_instances=7, feature_dim=4, mlp_head=False, temperature=0.2,
                 multi_crop=True, num_crop=2)
    index = torch.tensor([6, 2, 0])
    views = [images(3, 8, 0), images(3, 8, 1), images(3, 4, 2), images(3, 4, 3), images(3, 4, 4)]
    loss = method(views, index)["loss"]
    loss.backward()
    got_w, got_conv = method.classifier.weight.grad.clone(), method.backbone[0].weight.grad.clone()

    enc = method.backbone
    head = method.head
    w = method.classifier.weight.detach().clone().requires_grad_()
    conv = enc[0].weight
    conv.grad = None
    wn = F.normalize(w, dim=1)
    logits = [F.normalize(head(enc(v)), dim=1) @ (wn if i < 2 else wn.detach()).t() / 0.2 for i, v in enumerate(views)]
    ref = F.cross_entropy(torch.cat(logits), index.repeat(5))
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-6)
    assert torch.allclose(got_w, w.grad, atol=1e-6) and torch.allclose(got_conv, conv.grad, atol=1e-6)
    with pytest.raises(ValueError, match="needs --aug MultiCrop"):
        PIC(tiny_encoder(), 6, num_instances=7, feature_dim=4, mlp_head=False, num_crop=2)
    with pytest.raises(ValueError, match="dense classifier"):
        PIC(tiny_encoder(), 6, num_instances=7, feature_dim=4, mlp_head=False, multi_crop=True, num_crop=2,
            classifier=build_instance_classifier(7, 4, 0.2, num_negative=2))


def test_pic_classifier_init():
    torch.manual_seed(1)
    clf = build_instance_classifier(4000, 32, 0.2)
    assert clf.weight.shape == (4000, 32)
    assert abs(clf.weight.std().item() - 0.01) < 5e-4 and abs(clf.weight.mean().item()) < 5e-4


# ------------------------------------------------------------------------------ InstDisc
def test_instdisc_bank_update_math_and_duplicates():
    method = InstDisc(tiny_encoder(), 6, num_instances=9, feature_dim=4, temperature=0.07, num_negative=5,
                      bank_momentum=0.5)
    assert torch.allclose(method.bank.norm(dim=1), torch.ones(9))
    old = method.bank.clone()
    index = torch.tensor([2, 7, 2, 0])           # 2 occurs twice: the last occurrence wins
    x = images(4, 8, 0)
    out = method([x], index)
    out["loss"].backward()
    assert torch.equal(method.bank, old)          # the bank changes only after the optimiser step
    method.on_train_step_end(0, 0.1)
    z = F.normalize(method.head(method.backbone(x)), dim=1).detach()
    expected = old.clone()
    for row, i in ((1, 7), (2, 2), (3, 0)):
        v = 0.5 * old[i] + 0.5 * z[row]
        expected[i] = v / v.norm()
    assert torch.allclose(method.bank, expected, atol=1e-6)
    assert not torch.allclose(expected[2], (0.5 * old[2] + 0.5 * z[0]) / (0.5 * old[2] + 0.5 * z[0]).norm())


def test_instdisc_negatives_are_seeded_and_uniform():
    a = InstDisc(tiny_encoder(), 6, num_instances=50, feature_dim=4, num_negative=4000, seed=3)
    b = InstDisc(tiny_encoder(), 6, num_instances=50, feature_dim=4, num_negative=4000, seed=3)
    neg = a.draw_negatives(2)
    assert neg.shape == (2, 4000) and torch.equal(neg, b.draw_negatives(2))
    counts = torch.bincount(neg.flatten(), minlength=50).float()
    assert counts.min() > 0.6 * counts.mean() and counts.max() < 1.4 * counts.mean()
    assert not torch.equal(a.draw_negatives(2), neg)  # the generator advances


# ------------------------------------------------------------------------------ MoCo
def test_moco_momentum_update_math():
    method = MoCo(tiny_encoder(), 6, feature_dim=4, momentum=0.9, num_negative=8)
    key_before = {n: p.clone() for n, p in method.key_encoder.backbone.named_parameters()}
    assert all(torch.equal(p, dict(method.backbone.named_parameters())[n]) for n, p in key_before.items())
    assert not any(p.requires_grad for p in method.key_encoder.parameters())
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    method.on_train_step_end(0, 0.1)
    for n, p in method.key_encoder.backbone.named_parameters():
        expected = 0.9 * key_before[n] + 0.1 * (key_before[n] + 1.0)
        assert torch.allclose(p, expected, atol=1e-6)


def test_moco_queue_enqueue_wraps_pointer():
    method = MoCo(tiny_encoder(), 6, feature_dim=4, momentum=1.0, num_negative=6)
    assert torch.allclose(method.queue.features.norm(dim=1), torch.ones(6))
    initial = method.queue.features.clone()
    keys = []
    for step in range(2):
        x = [images(4, 8, 2 * step), images(4, 8, 2 * step + 1)]
        method(x, torch.arange(4))
        keys.append(F.normalize(method.key_encoder(x[1]), dim=1).detach())
        method.on_train_step_end(step, 0.1)
        assert int(method.queue.ptr) == [4, 2][step]
    expected = torch.cat([keys[1][2:], keys[0][2:], keys[1][:2]])
    assert torch.allclose(method.queue.features, expected, atol=1e-6)
    assert not torch.allclose(method.queue.features, initial)
    with pytest.raises(ValueError, match="shorter than the batch"):
        method.queue.enqueue(torch.zeros(7, 4))


def test_moco_loss_uses_current_queue():
    method = MoCo(tiny_encoder(), 6, feature_dim=4, temperature=0.2, num_negative=5)
    x = [images(3, 8, 0), images(3, 8, 1)]
    loss = method(x, torch.arange(3))["loss"]
    q = F.normalize(method.head(method.backbone(x[0])), dim=1)
    k = F.normalize(method.key_encoder(x[1]), dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ method.queue.features.t()], 1) / 0.2
    assert torch.allclose(loss, F.cross_entropy(logits, torch.zeros(3, dtype=torch.long)), atol=1e-6)


# ------------------------------------------------------------------------------ SimCLR
def test_simclr_single_process_loss():
    method = SimCLR(tiny_encoder(), 6, feature_dim=4, temperature=0.1)
    x = [images(3, 8, 0), images(3, 8, 1)]
    loss = method(x, torch.arange(3))["loss"]
    z = torch.cat([F.normalize(method.head(method.backbone(v)), dim=1) for v in x])
    sim = z @ z.t() / 0.1
    sim.fill_diagonal_(float("-inf"))
    target = torch.tensor([3, 4, 5, 0, 1, 2])
    assert torch.allclose(loss, F.cross_entropy(sim, target), atol=1e-6)
