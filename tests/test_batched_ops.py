"""Batched per-sample colour ops against torchvision's functional ops, sample by sample."""
import colorsys
import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torchvision.transforms.v2 import functional as TF

from contrast.data import batched_ops as B


def _images(n=6, h=20, w=24, seed=0):
    """Random colour images plus a few pixels that are exactly grey (hue/saturation edge cases)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h, w, generator=g)
    x[:, :, :2, :2] = x[:, :1, :2, :2]  # grey patch
    x[0, :, 5:8, 5:8] = 1.0
    x[1, :, 5:8, 5:8] = 0.0
    return x


def _assert_uint8_close(a, b):
    diff = ((a * 255).round() - (b * 255).round()).abs().max().item()
    assert diff <= 1, f"max diff {diff} uint8 levels"


@pytest.mark.parametrize("op,ref,factors", [
    (B.adjust_brightness, TF.adjust_brightness, [0.0, 0.3, 0.9, 1.0, 1.4, 1.8]),
    (B.adjust_contrast, TF.adjust_contrast, [0.0, 0.3, 0.9, 1.0, 1.4, 1.8]),
    (B.adjust_saturation, TF.adjust_saturation, [0.0, 0.3, 0.9, 1.0, 1.4, 1.8]),
    (B.adjust_hue, TF.adjust_hue, [-0.5, -0.2, -0.01, 0.0, 0.13, 0.5]),
])
def test_functional_ops_match_torchvision_per_sample(op, ref, factors):
    x = _images()
    out = op(x.clone(), torch.tensor(factors))
    for i, f in enumerate(factors):
        _assert_uint8_close(out[i], ref(x[i], f))


def test_grayscale_and_solarize_match_torchvision():
    x = _images()
    _assert_uint8_close(B.rgb_to_grayscale(x), TF.rgb_to_grayscale(x, num_output_channels=1))
    for t in (0.0, 0.3, 0.5, 1.0):
        _assert_uint8_close(B.solarize(x, t), TF.solarize(x, t))


@pytest.mark.parametrize("impl", ["dispatch", "grouped_conv"])
@pytest.mark.parametrize("kernel_size", [3, 7, 9])
def test_gaussian_blur_per_sample_sigma_matches_torchvision(kernel_size, impl):
    x = _images(n=5)
    sigmas = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    if impl == "dispatch":  # CPU: shifted multiply-adds
        out = B.gaussian_blur(x, kernel_size, sigmas)
    else:  # the accelerator implementation, run here on the CPU
        out = B._blur_grouped_conv(x, kernel_size, B.gaussian_kernel1d(kernel_size, sigmas))
    for i, s in enumerate(sigmas.tolist()):
        _assert_uint8_close(out[i], TF.gaussian_blur(x[i], [kernel_size, kernel_size], [s, s]))
    with pytest.raises(ValueError, match="odd"):
        B.gaussian_blur(x, 4, sigmas)


_TV_OPS = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]


def _sequential_reference(img, factors, order):
    for op in order:
        img = _TV_OPS[op](img, factors[op])
    return img


def test_color_jitter_applies_each_samples_order():
    perms = list(itertools.permutations(range(4)))
    n = len(perms)
    x = _images(n=n, seed=1)
    g = torch.Generator().manual_seed(3)
    factors = torch.stack([0.2 + 1.6 * torch.rand(n, generator=g), 0.2 + 1.6 * torch.rand(n, generator=g),
                           0.2 + 1.6 * torch.rand(n, generator=g), torch.rand(n, generator=g) - 0.5], dim=1)
    order = torch.tensor(perms)
    out = B.color_jitter(x.clone(), factors, order)
    wrong_order_detected = 0
    for i in range(n):
        f, o = factors[i].tolist(), perms[i]
        _assert_uint8_close(out[i], _sequential_reference(x[i], f, o))
        other = _sequential_reference(x[i], f, tuple(reversed(o)))
        wrong_order_detected += int(((out[i] - other).abs() * 255).max() > 1)
    assert wrong_order_detected >= n - 2  # the test can tell orders apart


def test_color_jitter_identity_factors_leave_sample_unchanged():
    x = _images(n=3)
    factors = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.5, 0.5, 1.2, 0.1], [1.0, 1.0, 1.0, 0.0]])
    order = torch.tensor([[3, 2, 1, 0], [0, 1, 2, 3], [1, 3, 0, 2]])
    out = B.color_jitter(x.clone(), factors, order)
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    assert not torch.allclose(out[1], x[1])


def _binomial_ok(k, n, p):
    return abs(k - n * p) <= 4.5 * math.sqrt(n * p * (1 - p))


def test_jitter_parameter_distributions():
    n = 20000
    jit = B.RandomColorJitter(0.8, 0.4, 1.5, 0.2, p=0.8)
    g = torch.Generator().manual_seed(0)
    factors, order = jit.sample_params(n, torch.device("cpu"), g)
    applied = (factors != torch.tensor([1.0, 1.0, 1.0, 0.0])).any(dim=1)
    assert _binomial_ok(applied.sum().item(), n, 0.8)
    f = factors[applied].double().numpy()
    for col, (lo, hi) in enumerate([(0.2, 1.8), (0.6, 1.4), (0.0, 2.5), (-0.2, 0.2)]):
        assert stats.kstest(f[:, col], stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3, col
    # every permutation of the four ops equally likely
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)[[sum(c * m for c, m in zip(p, (64, 16, 4, 1)))
                                                   for p in itertools.permutations(range(4))]]
    assert counts.sum().item() == n
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3
    # zero strength disables an op
    factors, _ = B.RandomColorJitter(0.4, 0.0, 0.4, 0.0).sample_params(100, torch.device("cpu"), g)
    assert torch.all(factors[:, 1] == 1) and torch.all(factors[:, 3] == 0)


def test_random_jitter_forward_brightness_and_hue_distribution():
    n = 4000
    g = torch.Generator().manual_seed(1)
    x = torch.full((n, 3, 2, 2), 0.5)
    out = B.RandomColorJitter(brightness=0.4, p=0.6)(x, g)
    f = out[:, 0, 0, 0] / 0.5
    changed = (f - 1).abs() > 1e-6
    assert _binomial_ok(changed.sum().item(), n, 0.6)
    assert stats.kstest(f[changed].double().numpy(), stats.uniform(0.6, 0.8).cdf).pvalue > 1e-3

    red = torch.zeros(n, 3, 2, 2)
    red[:, 0] = 1.0
    out = B.RandomColorJitter(hue=0.3)(red, g)
    hues = np.array([colorsys.rgb_to_hsv(*out[i, :, 0, 0].tolist())[0] for i in range(n)])
    shifts = (hues + 0.5) % 1.0 - 0.5
    assert stats.kstest(shifts, stats.uniform(-0.3, 0.6).cdf).pvalue > 1e-3


def test_random_grayscale():
    n = 2000
    x = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = B.RandomGrayscale(p=0.2)(x, torch.Generator().manual_seed(1))
    gray = (out[:, 0] == out[:, 1]).all(dim=(1, 2)) & (out[:, 1] == out[:, 2]).all(dim=(1, 2))
    assert _binomial_ok(gray.sum().item(), n, 0.2)
    _assert_uint8_close(out[gray], TF.rgb_to_grayscale(x[gray], num_output_channels=3))
    assert torch.equal(out[~gray], x[~gray])


def test_random_blur_sigma_distribution_and_probability():
    n, k = 3000, 9
    x = torch.zeros(n, 3, 11, 11)
    x[:, :, 5, 5] = 1.0  # impulse: the output is the kernel itself
    out = B.RandomGaussianBlur(k, sigma=(0.1, 2.0), p=0.5)(x, torch.Generator().manual_seed(2))
    blurred = (out != x).flatten(1).any(dim=1)
    assert _binomial_ok(blurred.sum().item(), n, 0.5)
    assert torch.equal(out[~blurred], x[~blurred])
    # sampled Gaussian: tap ratio k(1)/k(0) = exp(-1 / (2 sigma^2))
    ratio = (out[blurred, 0, 5, 6].double() / out[blurred, 0, 5, 5].double())
    sigma = torch.sqrt(-1.0 / (2.0 * torch.log(ratio))).numpy()
    assert stats.kstest(sigma, stats.uniform(0.1, 1.9).cdf).pvalue > 1e-3


def test_random_solarize():
    n = 2000
    x = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = B.RandomSolarize(threshold=0.6, p=0.3)(x, torch.Generator().manual_seed(1))
    hit = ~(out == x).all(dim=(1, 2, 3))
    assert _binomial_ok(hit.sum().item(), n, 0.3)
    assert torch.equal(out[hit], TF.solarize(x[hit], 0.6))
    assert torch.equal(out[~hit], x[~hit])


def test_generator_reproducibility_and_sample_independence():
    pipe = B.BatchedPipeline([B.RandomColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8), B.RandomGrayscale(0.2),
                              B.RandomGaussianBlur(5, p=0.5), B.Normalize()])
    x = (_images(n=8) * 255).round().to(torch.uint8)
    a = pipe(x, torch.Generator().manual_seed(7))
    b = pipe(x, torch.Generator().manual_seed(7))
    c = pipe(x, torch.Generator().manual_seed(8))
    assert a.dtype == torch.float32 and torch.equal(a, b) and not torch.equal(a, c)
    same = x[:1].expand(8, -1, -1, -1)
    outs = pipe(same, torch.Generator().manual_seed(0))
    assert len({tuple(o.flatten()[:50].tolist()) for o in outs}) >= 6  # per-sample parameters


def test_normalize_and_to_float():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    out = B.BatchedPipeline([B.Normalize()])(x)
    mean = torch.tensor(B.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(B.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (x.float() / 255 - mean) / std)
    with pytest.raises(TypeError, match="uint8"):
        B.to_float(x.int())


def test_multiview_stage_groups_views_and_keeps_order():
    norm = B.BatchedPipeline([B.Normalize()])
    jit = B.BatchedPipeline([B.RandomColorJitter(0.8, 0.8, 0.8, 0.2)])
    stage = B.MultiViewDeviceStage([norm, jit], [1, 0, 1, 0])
    big = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    small = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8)
    views = [big, big, small, small]
    out = stage(views, torch.Generator().manual_seed(0))
    assert [tuple(o.shape) for o in out] == [tuple(v.shape) for v in views]
    torch.testing.assert_close(out[1], norm(big))
    torch.testing.assert_close(out[3], norm(small))
    assert not torch.allclose(out[0], big.float() / 255)  # jittered, not normalised
    with pytest.raises(ValueError, match="expects 4 views"):
        stage(views[:2])


def test_cpu_chunking_keeps_results_and_inputs():
    x = _images(n=5)
    keep = x.clone()
    norm_whole = B.BatchedPipeline([B.Normalize()])(x)
    norm_chunked = B.BatchedPipeline([B.Normalize()], cpu_chunk_bytes=1)(x)  # chunks of one sample
    torch.testing.assert_close(norm_chunked, norm_whole)
    jit = B.BatchedPipeline([B.RandomColorJitter(0.8, 0.8, 0.8, 0.2), B.RandomGrayscale(0.5),
                             B.RandomGaussianBlur(3, p=0.5)], cpu_chunk_bytes=1)
    out = jit(x[:1].expand(5, -1, -1, -1), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and len({round(o.sum().item(), 3) for o in out}) == 5
    jit(x)
    assert torch.equal(x, keep)  # inputs are never modified in place
