"""Batched colour augmentations with per-sample random parameters (the device stage, issue 5).

The seed pipeline runs ColorJitter, RandomGrayscale and GaussianBlur on PIL images in the
DataLoader workers, which costs most of the CPU time of data loading. Here the same
transforms run on a whole batch ``x: (B, 3, H, W)`` float32 in ``[0, 1]`` on the training
device. Every sample draws its own parameters from the same distributions as the torchvision
transform it replaces (``torchvision.transforms.ColorJitter``, ``RandomGrayscale``,
``GaussianBlur``, ``RandomSolarize``, each optionally wrapped in ``RandomApply(p)``); the
arithmetic follows ``torchvision.transforms.v2.functional`` on float tensors.

Randomness: every module's ``forward(x, generator=None)`` draws from ``generator`` when given
(parameters are sampled on the generator's device, then moved to ``x.device``), otherwise from
the global RNG of ``x.device``.

Synchronisation: on the CPU an op that applies to some samples only (blur, greyscale, hue)
selects them with ``nonzero`` and transforms just those. On an accelerator that would be a
host-device synchronisation per op (the host needs the count), so there every sample is
transformed and ``torch.where`` keeps the selected ones: the same values, no host read
(:func:`sync_free`; a module's ``sync_free`` attribute forces either path).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Slot codes of ColorJitter's four operations, in torchvision's order.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


def _rand(shape: Sequence[int], device: torch.device, generator: Optional[torch.Generator]) -> Tensor:
    """``U[0, 1)`` samples of ``shape`` on ``device``, drawn from ``generator`` if given."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _uniform(n: int, low: float, high: float, device: torch.device,
             generator: Optional[torch.Generator]) -> Tensor:
    """``(n,)`` samples of ``U[low, high)``."""
    return low + (high - low) * _rand((n,), device, generator)


def sync_free(x: Tensor, forced: Optional[bool] = None) -> bool:
    """Whether ops on ``x`` use masks instead of ``nonzero`` (off the CPU, unless ``forced``)."""
    return forced if forced is not None else x.device.type != "cpu"


class RandomOp(nn.Module):
    """Base of the random modules: ``sync_free`` None picks the path by device (:func:`sync_free`)."""

    sync_free: Optional[bool] = None


def _per_sample(v: Tensor) -> Tensor:
    """``(B,)`` -> ``(B, 1, 1, 1)`` for broadcasting against images."""
    return v.view(-1, 1, 1, 1)


# --------------------------------------------------------------------------------------------
# Functional ops: x (B, 3, H, W) float in [0, 1], parameters (B,)
# --------------------------------------------------------------------------------------------

def rgb_to_grayscale(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma (torchvision weights): ``(B, 3, H, W) -> (B, 1, H, W)``."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """``clamp(f * x + (1 - f) * other, 0, 1)`` with per-sample ``factor (B,)``."""
    f = _per_sample(factor)
    return (x * f + (1.0 - f) * other).clamp_(0.0, 1.0)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """Per-sample ``adjust_brightness``: ``clamp(f x)``."""
    return (x * _per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Per-sample ``adjust_contrast``: blend with the mean grey level of each image."""
    mean = rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean, factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Per-sample ``adjust_saturation``: blend with the greyscale image."""
    return _blend(x, rgb_to_grayscale(x), factor)


def adjust_hue(x: Tensor, factor: Tensor) -> Tensor:
    """Per-sample ``adjust_hue``: rotate the HSV hue by ``factor`` in ``[-0.5, 0.5]`` (in turns).

    A hue rotation keeps each pixel's max and min channel, so instead of a full RGB -> HSV -> RGB
    round trip the output is ``max - (max - min) * clamp(min(k, 4 - k), 0, 1)`` per channel with
    ``k = (n_c + 6 h') mod 6``, ``n = (5, 3, 1)`` for (R, G, B): the closed form of HSV -> RGB.
    """
    r, g, b = x.unbind(dim=-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    delta = maxc - minc
    d = torch.where(delta > 0, delta, torch.ones_like(delta))
    # hue in sixths of a turn, as in torchvision's _rgb_to_hsv (grey pixels: delta = 0, any hue)
    r_max, g_max = maxc == r, maxc == g
    num = torch.where(r_max, g - b, torch.where(g_max, b - r, r - g))
    h6 = (num / d).add_(torch.where(r_max, 0.0, torch.where(g_max, 2.0, 4.0))).unsqueeze(-3)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = h6 + (n + _per_sample(6.0 * factor))
    k.add_(torch.floor(k * (1.0 / 6.0)), alpha=-6.0)  # k mod 6 (remainder() is much slower on CPU)
    w = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return (maxc.unsqueeze(-3) - delta.unsqueeze(-3) * w).clamp_(0.0, 1.0)


def gaussian_kernel1d(kernel_size: int, sigma: Tensor) -> Tensor:
    """Normalised Gaussian taps ``(B, kernel_size)`` for per-sample ``sigma (B,)``."""
    half = (kernel_size - 1) / 2.0
    t = torch.linspace(-half, half, kernel_size, device=sigma.device, dtype=sigma.dtype)
    k = torch.exp(-0.5 * (t / sigma.view(-1, 1)) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def _blur_grouped_conv(x: Tensor, kernel_size: int, k: Tensor) -> Tensor:
    """Separable blur as two depthwise convolutions, one kernel per (sample, channel)."""
    b, c, h, w = x.shape
    k = k.repeat_interleave(c, dim=0)  # (B*C, K)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, kernel_size, 1), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, 1, kernel_size), groups=b * c)
    return y.view(b, c, h, w)


def _blur_shifted_sum(x: Tensor, kernel_size: int, k: Tensor) -> Tensor:
    """Separable blur as ``kernel_size`` shifted multiply-adds per axis (faster on CPU than
    oneDNN's depthwise convolution with per-channel kernels)."""
    b, c, h, w = x.shape
    pad = kernel_size // 2
    k = k.view(b, 1, 1, 1, kernel_size)
    y = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    rows = torch.zeros(b, c, h + 2 * pad, w, dtype=x.dtype, device=x.device)
    for t in range(kernel_size):
        rows.addcmul_(y[..., t:t + w], k[..., t])
    out = torch.zeros_like(x)
    for t in range(kernel_size):
        out.addcmul_(rows[..., t:t + h, :], k[..., t])
    return out


def gaussian_blur(x: Tensor, kernel_size: int, sigma: Tensor) -> Tensor:
    """Per-sample isotropic Gaussian blur with reflect padding, as torchvision's ``gaussian_blur``.

    Separable (the 2-D kernel is the outer product of the 1-D one): grouped convolutions on
    accelerators, shifted multiply-adds on the CPU.
    """
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f"gaussian_blur: kernel_size must be odd and positive, got {kernel_size}")
    k = gaussian_kernel1d(kernel_size, sigma.to(x.dtype))
    blur = _blur_shifted_sum if x.device.type == "cpu" else _blur_grouped_conv
    return blur(x, kernel_size, k)


def solarize(x: Tensor, threshold: float) -> Tensor:
    """Invert the pixels ``>= threshold`` (threshold on the ``[0, 1]`` scale)."""
    return torch.where(x >= threshold, 1.0 - x, x)


def color_jitter(x: Tensor, factors: Tensor, order: Tensor, masked: bool = False) -> Tensor:
    """ColorJitter with per-sample factors and per-sample order of the four operations.

    Args:
        x: ``(B, 3, H, W)`` float in ``[0, 1]``.
        factors: ``(B, 4)`` brightness, contrast, saturation factors and hue shift; a sample whose
            factors are ``(1, 1, 1, 0)`` is left unchanged (that is how "not applied" is encoded).
        order: ``(B, 4)`` long, a permutation of ``0..3`` per row (slot -> operation code).

    Brightness, contrast and saturation are all ``f x + (1 - f) r`` with ``r`` = 0, the mean
    grey level or the grey image, so each of the four slots is one blend over the whole batch
    plus a hue rotation on the samples whose slot holds the hue operation (``masked``: computed
    for every sample and kept where selected, without a host read).
    """
    rows = torch.arange(x.shape[0], device=x.device)
    zero = torch.zeros((), device=x.device, dtype=x.dtype)
    for slot in range(4):
        op = order[:, slot]
        f = factors[rows, op]
        cheap = op != HUE
        f_cheap = torch.where(cheap, f, torch.ones_like(f))
        gray = rgb_to_grayscale(x)
        # f x + (1 - f) ref, ref = 0 (brightness), mean grey (contrast) or grey image (saturation):
        # = f x + a * gray + c with per-sample a, c
        a = torch.where(op == SATURATION, 1.0 - f_cheap, zero)
        c = torch.where(op == CONTRAST, 1.0 - f_cheap, zero)
        if masked or bool((op == CONTRAST).any()):
            c = c * gray.mean(dim=(-3, -2, -1))
        offset = torch.addcmul(_per_sample(c), gray, _per_sample(a))
        x = torch.addcmul(offset, x, _per_sample(f_cheap)).clamp_(0.0, 1.0)
        hue = ~cheap & (f != 0)
        if masked:
            x = torch.where(_per_sample(hue), adjust_hue(x, torch.where(hue, f, zero)), x)
            continue
        hue_idx = torch.nonzero(hue).flatten()
        if hue_idx.numel() > 0:
            # x is this function's own tensor since the first addcmul: update it in place
            x.index_copy_(0, hue_idx, adjust_hue(x.index_select(0, hue_idx), f.index_select(0, hue_idx)))
    return x


# --------------------------------------------------------------------------------------------
# Random modules: forward(x (B, 3, H, W) float in [0, 1], generator=None) -> same shape
# --------------------------------------------------------------------------------------------

class RandomColorJitter(RandomOp):
    """``RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p)``, per sample.

    As ``torchvision.transforms.ColorJitter``: brightness, contrast and saturation factors are
    ``U[max(0, 1 - v), 1 + v]``, the hue shift ``U[-hue, hue]``, and the four operations run in
    a uniformly random order (drawn per sample). A zero strength disables that operation.
    """

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0,
                 hue: float = 0.0, p: float = 1.0) -> None:
        super().__init__()
        for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if v < 0:
                raise ValueError(f"RandomColorJitter: {name} must be >= 0, got {v}")
        if not 0 <= hue <= 0.5:
            raise ValueError(f"RandomColorJitter: hue must be in [0, 0.5], got {hue}")
        self.brightness, self.contrast, self.saturation, self.hue, self.p = brightness, contrast, saturation, hue, p

    def sample_params(self, n: int, device: torch.device,
                      generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """``factors (n, 4)`` (identity ``(1, 1, 1, 0)`` where not applied) and ``order (n, 4)``."""
        cols = [_uniform(n, max(0.0, 1.0 - v), 1.0 + v, device, generator)
                for v in (self.brightness, self.contrast, self.saturation)]
        cols.append(_uniform(n, -self.hue, self.hue, device, generator))
        factors = torch.stack(cols, dim=1)
        identity = torch.tensor([1.0, 1.0, 1.0, 0.0], device=device)
        strengths = torch.tensor([self.brightness, self.contrast, self.saturation, self.hue], device=device)
        factors = torch.where(strengths > 0, factors, identity)
        applied = _rand((n,), device, generator) < self.p
        factors = torch.where(applied.unsqueeze(1), factors, identity)
        order = _rand((n, 4), device, generator).argsort(dim=1)
        return factors, order

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        factors, order = self.sample_params(x.shape[0], x.device, generator)
        return color_jitter(x, factors, order, sync_free(x, self.sync_free))

    def extra_repr(self) -> str:
        return (f"brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation}, "
                f"hue={self.hue}, p={self.p}")


class RandomGrayscale(RandomOp):
    """``RandomGrayscale(p)`` per sample: the luma replicated on 3 channels."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        applied = _rand((x.shape[0],), x.device, generator) < self.p
        if sync_free(x, self.sync_free):
            return torch.where(_per_sample(applied), rgb_to_grayscale(x).expand(-1, 3, -1, -1), x)
        idx = torch.nonzero(applied).flatten()
        if idx.numel() == 0:
            return x
        return x.index_copy(0, idx, rgb_to_grayscale(x.index_select(0, idx)).expand(-1, 3, -1, -1))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class RandomGaussianBlur(RandomOp):
    """``RandomApply([GaussianBlur(kernel_size, sigma)], p)`` per sample.

    ``sigma ~ U[sigma_min, sigma_max]`` per sample, the same for both axes (as torchvision).
    Only the selected samples are convolved.
    """

    def __init__(self, kernel_size: int, sigma: tuple[float, float] = (0.1, 2.0), p: float = 1.0) -> None:
        super().__init__()
        if kernel_size % 2 != 1 or kernel_size < 1:
            raise ValueError(f"RandomGaussianBlur: kernel_size must be odd and positive, got {kernel_size}")
        if not 0 < sigma[0] <= sigma[1]:
            raise ValueError(f"RandomGaussianBlur: need 0 < sigma_min <= sigma_max, got {sigma}")
        self.kernel_size, self.sigma, self.p = kernel_size, tuple(sigma), p

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        n = x.shape[0]
        applied = _rand((n,), x.device, generator) < self.p
        sigma = _uniform(n, self.sigma[0], self.sigma[1], x.device, generator)
        if sync_free(x, self.sync_free):
            return torch.where(_per_sample(applied), gaussian_blur(x, self.kernel_size, sigma), x)
        idx = torch.nonzero(applied).flatten()
        if idx.numel() == 0:
            return x
        blurred = gaussian_blur(x.index_select(0, idx), self.kernel_size, sigma.index_select(0, idx))
        return x.index_copy(0, idx, blurred)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, sigma={self.sigma}, p={self.p}"


class RandomSolarize(nn.Module):
    """``RandomSolarize(threshold, p)`` per sample (``threshold`` on the ``[0, 1]`` scale)."""

    def __init__(self, threshold: float = 0.5, p: float = 0.5) -> None:
        super().__init__()
        self.threshold, self.p = threshold, p

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        applied = _per_sample(_rand((x.shape[0],), x.device, generator) < self.p)
        return torch.where(applied & (x >= self.threshold), 1.0 - x, x)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, p={self.p}"


class Normalize(nn.Module):
    """Channel normalisation ``(x - mean) / std`` (ImageNet statistics by default)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return (x - self.mean) * self.inv_std


def to_float(x: Tensor) -> Tensor:
    """uint8 ``[0, 255]`` -> float32 ``[0, 1]``; floating input is returned as float32 unchanged."""
    if x.is_floating_point():
        return x.float()
    if x.dtype != torch.uint8:
        raise TypeError(f"to_float: expected uint8 or floating images, got {x.dtype}")
    return x.float().div_(255.0)


class BatchedPipeline(nn.Module):
    """A sequence of the random modules above, run on one batch of one view.

    ``forward(x (B, 3, H, W) uint8 or float in [0, 1], generator=None) -> (B, 3, H, W) float32``.

    On the CPU the batch is processed in chunks of about ``cpu_chunk_bytes`` of float32 pixels:
    the ops are memory-bound and a chunk that stays in cache runs several times faster than
    whole-batch passes. Parameters are per sample either way, so chunking does not change the
    distribution.
    """

    def __init__(self, ops: Sequence[nn.Module], cpu_chunk_bytes: int = 4 << 20) -> None:
        super().__init__()
        if cpu_chunk_bytes < 1:
            raise ValueError(f"BatchedPipeline: cpu_chunk_bytes must be >= 1, got {cpu_chunk_bytes}")
        self.ops = nn.ModuleList(ops)
        self.cpu_chunk_bytes = cpu_chunk_bytes

    def _run(self, x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        x = to_float(x)
        for op in self.ops:
            x = op(x, generator)
        return x

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        chunk = max(1, self.cpu_chunk_bytes // (4 * x[0].numel())) if x.shape[0] else 1
        if x.device.type != "cpu" or x.shape[0] <= chunk:
            return self._run(x, generator)
        return torch.cat([self._run(c, generator) for c in x.split(chunk)])


class MultiViewDeviceStage(nn.Module):
    """The device stage of an augmentation: one :class:`BatchedPipeline` per view.

    ``forward(views: list[(B, 3, H, W)], generator=None) -> list[(B, 3, H, W) float32]``.
    Views that share a pipeline and a shape are concatenated and processed in one call (each
    sample still draws its own parameters), e.g. the two views of SimCLR.
    """

    def __init__(self, pipelines: Sequence[BatchedPipeline], view_pipeline: Sequence[int]) -> None:
        super().__init__()
        if any(not 0 <= i < len(pipelines) for i in view_pipeline):
            raise ValueError(f"MultiViewDeviceStage: view_pipeline {list(view_pipeline)} indexes past "
                             f"{len(pipelines)} pipelines")
        self.pipelines = nn.ModuleList(pipelines)
        self.view_pipeline = list(view_pipeline)

    def forward(self, views: Sequence[Tensor], generator: Optional[torch.Generator] = None) -> list[Tensor]:
        if len(views) != len(self.view_pipeline):
            raise ValueError(f"device stage expects {len(self.view_pipeline)} views, got {len(views)}")
        groups: dict[tuple, list[int]] = {}
        for i, v in enumerate(views):
            groups.setdefault((self.view_pipeline[i], tuple(v.shape[1:])), []).append(i)
        out: list[Optional[Tensor]] = [None] * len(views)
        for (p, _), idx in groups.items():
            batch = torch.cat([views[i] for i in idx]) if len(idx) > 1 else views[idx[0]]
            res = self.pipelines[p](batch, generator)
            for i, chunk in zip(idx, res.split([views[i].shape[0] for i in idx])):
                out[i] = chunk
        return out  # type: ignore[return-value]
