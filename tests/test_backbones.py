"""ResNet-D variants of the release (names, shapes, forward against a functional reference) and
zero-initialised residual gammas."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from contrast.models.backbones import ARCHS, RESNET_D, build_backbone

# Structure of the release's ResNet-D, written out here from the release's checkpoint format:
# arch -> (plain torchvision twin, bottleneck?, blocks per stage)
SPEC = {"resnet18_d": ("resnet18", False, (2, 2, 2, 2)), "resnet34_d": ("resnet34", False, (3, 4, 6, 3)),
        "resnet50_d": ("resnet50", True, (3, 4, 6, 3)), "resnet101_d": ("resnet101", True, (3, 4, 23, 3)),
        "resnet152_d": ("resnet152", True, (3, 8, 36, 3))}
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def release_shapes(arch):
    """Key -> shape of a release ResNet-D encoder backbone (without the head): torchvision's names,
    ``conv1.weight`` replaced by the deep stem and ``downsample.{0,1}`` moved to ``downsample.{1,2}``."""
    plain = getattr(torchvision.models, SPEC[arch][0])(weights=None)
    shapes = {}
    for k, v in plain.state_dict().items():
        if k.startswith("fc."):
            continue
        if k == "conv1.weight":
            shapes["conv1.0.0.weight"] = (32, 3, 3, 3)
            shapes.update({f"conv1.0.1.{b}": (32,) for b in BN_KEYS})
            shapes["conv1.1.0.weight"] = (32, 32, 3, 3)
            shapes.update({f"conv1.1.1.{b}": (32,) for b in BN_KEYS})
            shapes["conv1.2.weight"] = (64, 32, 3, 3)
            continue
        k = k.replace("downsample.1.", "downsample.2.").replace("downsample.0.", "downsample.1.")
        shapes[k] = tuple(v.shape)
    for k in list(shapes):
        if k.endswith("num_batches_tracked"):
            shapes[k] = ()
    return shapes


def random_state(shapes, seed):
    """A trained-looking state dict with exactly ``shapes``: positive BN variances, non-trivial gammas."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(5)
        elif k.endswith("running_var"):
            state[k] = torch.rand(shape, generator=g) + 0.5
        elif k.endswith("running_mean") or k.endswith("bias"):
            state[k] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:   # BN gamma
            state[k] = torch.rand(shape, generator=g) + 0.5
        else:                   # conv kernel, He-scaled so activations stay O(1)
            fan_in = shape[1] * shape[2] * shape[3]
            state[k] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return state


def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"],
                        training=False, eps=1e-5)


def reference_forward(sd, x, bottleneck, layers):
    """The release's ResNet-D forward (eval mode) written functionally from a state dict."""
    x = F.relu(_bn(F.conv2d(x, sd["conv1.0.0.weight"], stride=2, padding=1), sd, "conv1.0.1."))
    x = F.relu(_bn(F.conv2d(x, sd["conv1.1.0.weight"], padding=1), sd, "conv1.1.1."))
    x = F.conv2d(x, sd["conv1.2.weight"], padding=1)
    x = F.max_pool2d(F.relu(_bn(x, sd, "bn1.")), 3, 2, 1)
    for stage, n in enumerate(layers, 1):
        for b in range(n):
            p = f"layer{stage}.{b}."
            stride = 2 if stage > 1 and b == 0 else 1
            if bottleneck:
                out = F.relu(_bn(F.conv2d(x, sd[p + "conv1.weight"]), sd, p + "bn1."))
                out = F.relu(_bn(F.conv2d(out, sd[p + "conv2.weight"], stride=stride, padding=1), sd, p + "bn2."))
                out = _bn(F.conv2d(out, sd[p + "conv3.weight"]), sd, p + "bn3.")
            else:
                out = F.relu(_bn(F.conv2d(x, sd[p + "conv1.weight"], stride=stride, padding=1), sd, p + "bn1."))
                out = _bn(F.conv2d(out, sd[p + "conv2.weight"], padding=1), sd, p + "bn2.")
            shortcut = x
            if p + "downsample.1.weight" in sd:   # AvgPool2d(stride) then 1x1 stride-1 conv + BN
                pooled = F.avg_pool2d(x, stride) if stride > 1 else x
                shortcut = _bn(F.conv2d(pooled, sd[p + "downsample.1.weight"]), sd, p + "downsample.2.")
            x = F.relu(out + shortcut)
    return x.mean(dim=(2, 3))


def test_archs_include_the_release_resnet_d():
    assert set(SPEC) == set(RESNET_D) and set(SPEC) <= set(ARCHS)


@pytest.mark.parametrize("arch", sorted(SPEC))
def test_resnet_d_keys_and_shapes_are_the_release_encoders(arch):
    net, feat_dim = build_backbone(arch)
    state = net.state_dict()
    expected = release_shapes(arch)
    assert list(state) == list(expected)   # same names, same order as the release's state dict
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert feat_dim == (2048 if SPEC[arch][1] else 512) and isinstance(net.fc, nn.Identity)
    # a state dict built here with exactly those names and shapes loads strictly
    loaded = random_state(expected, seed=1)
    net.load_state_dict(loaded, strict=True)
    for k, v in net.state_dict().items():
        assert torch.equal(v, loaded[k]), k


@pytest.mark.parametrize("arch", ["resnet18_d", "resnet50_d"])
def test_resnet_d_forward_matches_functional_reference(arch):
    _, bottleneck, layers = SPEC[arch]
    net, feat_dim = build_backbone(arch)
    sd = random_state(release_shapes(arch), seed=2)
    net.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))   # even sides at every stage
    with torch.no_grad():
        out = net.eval()(x)
        ref = reference_forward(sd, x, bottleneck, layers)
    assert out.shape == (2, feat_dim)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_downsample_is_avgpool_then_1x1_conv_and_bn():
    net, _ = build_backbone("resnet18_d")
    block = net.layer2[0]
    down = block.downsample.eval()
    with torch.no_grad():
        down[2].running_mean.uniform_(-0.5, 0.5)
        down[2].running_var.uniform_(0.5, 2.0)
        down[2].weight.uniform_(0.5, 1.5)
        down[2].bias.uniform_(-0.5, 0.5)
    x = torch.randn(1, 64, 4, 4, generator=torch.Generator().manual_seed(4))
    w = down[1].weight[:, :, 0, 0]   # (128, 64)
    bn = down[2]
    # manual: mean of each 2x2 cell, channel mixing by the 1x1 kernel, then inference BN
    pooled = torch.stack([torch.stack([x[0, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(dim=(1, 2))
                                       for j in range(2)], dim=-1) for i in range(2)], dim=-2)   # (64, 2, 2)
    mixed = torch.einsum("oc,cij->oij", w, pooled)
    expected = (mixed - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps) \
        * bn.weight[:, None, None] + bn.bias[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(down(x)[0], expected, rtol=1e-5, atol=1e-5)
    assert down[1].stride == (1, 1) and down[1].kernel_size == (1, 1)
    # the block's own stride sits in its 3x3 conv (BasicBlock conv1; Bottleneck conv2), as in the release
    assert block.conv1.stride == (2, 2)
    r50, _ = build_backbone("resnet50_d")
    assert r50.layer3[0].conv2.stride == (2, 2) and r50.layer3[0].conv1.stride == (1, 1)
    assert isinstance(r50.layer1[0].downsample[0], nn.Identity)   # stride-1 shortcut: no pooling


def test_avgpool_at_odd_sides_averages_the_pixels_inside():
    """Where the release's floor-mode pool would break the residual sum (odd side), the edge cell is
    the mean of the pixels that exist; at even sides it equals the release's AvgPool2d(2)."""
    net, _ = build_backbone("resnet18_d")
    pool = net.layer2[0].downsample[0]
    x = torch.arange(25.0).reshape(1, 1, 5, 5)
    y = pool(x)
    assert y.shape == (1, 1, 3, 3)
    assert y[0, 0, 2, 2] == x[0, 0, 4, 4]
    assert y[0, 0, 0, 2] == x[0, 0, 0:2, 4].mean() and y[0, 0, 2, 0] == x[0, 0, 4, 0:2].mean()
    assert y[0, 0, 1, 1] == x[0, 0, 2:4, 2:4].mean()
    even = torch.randn(2, 3, 6, 8)
    torch.testing.assert_close(pool(even), nn.AvgPool2d(2)(even), rtol=0, atol=0)
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, 36, 36)).shape == (1, 512)   # 36 -> 18 -> 9: odd at layer2


def test_resnet_d_rejects_small_stems():
    for stem in ("small", "small-maxpool"):
        with pytest.raises(ValueError, match=f"--stem '{stem}' cannot be combined with --arch resnet50_d"):
            build_backbone("resnet50_d", stem=stem)


def _last_bn_gammas(net, bottleneck):
    """(last-BN gammas of every residual block, every other BN gamma), by the release's naming rule."""
    last = "bn3.weight" if bottleneck else "bn2.weight"
    residual, other = [], []
    for name, m in net.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            (residual if f"{name}.weight".endswith(last) and ".downsample." not in name else other).append(m.weight)
    return residual, other


@pytest.mark.parametrize("arch,bottleneck,blocks", [("resnet18", False, 8), ("resnet50", True, 16),
                                                    ("resnet18_d", False, 8), ("resnet50_d", True, 16),
                                                    ("wide_resnet50_2", True, 16)])
def test_zero_init_residual(arch, bottleneck, blocks):
    net, _ = build_backbone(arch)   # default: the release's zero gamma
    residual, other = _last_bn_gammas(net, bottleneck)
    assert len(residual) == blocks
    assert all(torch.all(g == 0) for g in residual) and all(torch.all(g == 1) for g in other)
    net, _ = build_backbone(arch, zero_init_residual=False)
    residual, other = _last_bn_gammas(net, bottleneck)
    assert all(torch.all(g == 1) for g in residual + other)


def test_zero_init_makes_every_block_start_as_identity_plus_shortcut():
    net, _ = build_backbone("resnet18")
    block = net.layer1[0].eval()
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.relu(x))


@pytest.mark.parametrize("stem", ["small", "small-maxpool", "imagenet"])
def test_plain_archs_keep_their_stems_with_zero_init(stem):
    net, _ = build_backbone("resnet18", stem=stem, zero_init_residual=True)
    assert net.conv1.kernel_size == ((7, 7) if stem == "imagenet" else (3, 3))
    assert torch.all(net.layer4[1].bn2.weight == 0)
