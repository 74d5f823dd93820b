"""Augmentation recipes (``--aug``) split into a CPU stage and a device stage.

``build_augmentation(name, ...)`` returns an :class:`Augmentation` with

* ``cpu``: what DataLoader workers run, ``PIL.Image -> list[Tensor (3, H, W)]``. It accepts a
  still *unloaded* image straight from ``Image.open`` (any mode) and converts to 8-bit RGB itself
  (:func:`to_rgb`: 16-bit and other high-bit-depth images are scaled, not clipped), so that the
  fast path can ask the JPEG decoder for a reduced-size decode (``Image.draft``) before any pixel
  is decoded. Callers must keep the underlying file open until ``cpu`` returns. Its random draws
  come from the CPU torch generator, which the datasets seed per sample
  (:func:`contrast.seeding.seeded_rng`) with a seed derived from ``(sampler seed, epoch, position
  of the sample in the epoch)``.
* ``device``: an ``nn.Module`` run by the training loop after moving the batch to the device,
  ``list[Tensor (B, 3, H, W)] -> list[Tensor (B, 3, H, W) float32, ImageNet-normalised]``.

Two paths:

* ``fast=False`` (seed style): torchvision transforms on PIL images ending in ``ToTensor`` +
  ``Normalize``, all in the worker; ``device`` only casts to float32.
* ``fast=True`` (default): the worker decodes at reduced scale where the crops allow it, then does
  random resized crop + flip and returns uint8 views; colour jitter, grayscale, blur and
  normalisation run batched with per-sample parameters in ``device``
  (:mod:`contrast.data.batched_ops`). The distributions are those of the plain path; pixel values
  differ by interpolation/rounding details only.

Recipes (parameters from the PIC release, ``get_transform``):

==========  =====================================================================================
InstDisc    RRC(scale (crop, 1)), flip, ColorJitter(0.4, 0.4, 0.4, 0.4), grayscale p 0.2 [Wu 2018]
MoCov2      RRC, flip, ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2, blur p 0.5 [Chen 2020]
SimCLR      RRC, flip, ColorJitter(0.8, 0.8, 0.8, 0.2) p 0.8, grayscale 0.2, blur p 0.5 [Chen 2020]
MultiCrop   SimCLR colours; ``num_views`` crops ``image_size`` scale (crop2, 1) + ``num_crop2`` crops
            ``image_size2`` scale (crop, crop2) [Caron 2020, PIC]
RandAug     RRC, flip, RandAugment(2 ops, magnitude 10, fill = ImageNet mean) on uint8, then the
            MoCov2 colour path. (The release, after InfoMin, applies ColorJitter 0.8 + blur *before*
            RandAugment; here RandAugment must run first because colour runs on the device.)
BYOL        RRC, flip, ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2, then per view: blur p 1.0
            and no solarize (odd views), blur p 0.1 and solarize p 0.2 (even views) [Grill 2020]
BYOLMultiCrop  MultiCrop's crops with BYOL's colours: large crops alternate BYOL's two views (blur 1.0 /
            blur 0.1 + solarize 0.2), small crops blur p 0.5 (DINO's DataAugmentationDINO) [Caron 2021]
NULL        RRC(scale (crop, 1)), flip (linear-evaluation training; ``crop`` defaults to 0.08)
val         resize shorter side to ``round(image_size / 0.875)``, centre crop ``image_size``
==========  =====================================================================================

Gaussian blur: sigma ``U[0.1, 2]``, kernel size ~10% of the view size rounded to odd (23 at 224,
as SimCLR). Flip commutes with every colour op, so doing it before them changes nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision import transforms as T
from torchvision.transforms import v2

from contrast.data import batched_ops as B

AUG_NAMES = ("InstDisc", "MoCov2", "SimCLR", "MultiCrop", "RandAug", "BYOL", "NULL", "val", "BYOLMultiCrop")
#: Recipes of ``num_views`` large crops plus ``num_crop2`` small ones.
MULTI_CROP_NAMES = ("MultiCrop", "BYOLMultiCrop")
RATIO = (3.0 / 4.0, 4.0 / 3.0)
VAL_CROP_FRACTION = 0.875
RANDAUG_FILL = [round(255 * m) for m in B.IMAGENET_MEAN]


@dataclass
class Augmentation:
    """A recipe split into a worker stage and a device stage (see the module docstring)."""

    name: str
    cpu: Callable[[Image.Image], list[Tensor]]
    device: nn.Module
    fast: bool


@dataclass(frozen=True)
class ViewSpec:
    """One output view: square ``size`` crop with area fraction in ``scale``."""

    size: int
    scale: tuple[float, float]


def blur_kernel_size(image_size: int) -> int:
    """Odd kernel of ~10% of the image side (SimCLR: 23 for 224), at least 3."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


# --------------------------------------------------------------------------------------------
# Colour recipes, shared by both paths
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ColorRecipe:
    """Colour part of a recipe, applied as jitter -> grayscale -> blur -> solarize.

    ``jitter = (brightness, contrast, saturation, hue)`` or None; ``blur_p = 0`` means no blur,
    ``solarize_p = 0`` no solarisation (threshold 0.5 of the [0, 1] range, BYOL's).
    """

    jitter: Optional[tuple[float, float, float, float]]
    jitter_p: float
    gray_p: float
    blur_p: float
    solarize_p: float = 0.0


COLOR_RECIPES = {
    "InstDisc": ColorRecipe(jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, gray_p=0.2, blur_p=0.0),
    "MoCov2": ColorRecipe(jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.5),
    "SimCLR": ColorRecipe(jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, gray_p=0.2, blur_p=0.5),
    "NONE": ColorRecipe(jitter=None, jitter_p=0.0, gray_p=0.0, blur_p=0.0),
}
#: Recipes whose views differ in colour: view i gets ``PER_VIEW_COLORS[name][i % len(...)]``.
PER_VIEW_COLORS = {
    "BYOL": (ColorRecipe(jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=1.0, solarize_p=0.0),
             ColorRecipe(jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.1, solarize_p=0.2)),
}
#: Colours of the small crops of BYOLMultiCrop (DINO's ``local_transfo``).
SMALL_CROP_BYOL = ColorRecipe(jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.5)
#: Solarisation threshold on the [0, 1] scale (BYOL); PIL images get the uint8 equivalent 128.
SOLARIZE_THRESHOLD = 0.5


def plain_color_transforms(recipe: ColorRecipe, size: int) -> list[Callable]:
    """torchvision PIL transforms of a colour recipe (seed-style path)."""
    ops: list[Callable] = []
    if recipe.jitter is not None:
        jitter = T.ColorJitter(*recipe.jitter)
        ops.append(jitter if recipe.jitter_p >= 1.0 else T.RandomApply([jitter], p=recipe.jitter_p))
    if recipe.gray_p > 0:
        ops.append(T.RandomGrayscale(p=recipe.gray_p))
    if recipe.blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(size), sigma=(0.1, 2.0))], p=recipe.blur_p))
    if recipe.solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=math.ceil(255 * SOLARIZE_THRESHOLD), p=recipe.solarize_p))
    return ops


def batched_color_pipeline(recipe: ColorRecipe, size: int) -> B.BatchedPipeline:
    """The same colour recipe as batched per-sample device ops, followed by normalisation."""
    ops: list[nn.Module] = []
    if recipe.jitter is not None:
        ops.append(B.RandomColorJitter(*recipe.jitter, p=recipe.jitter_p))
    if recipe.gray_p > 0:
        ops.append(B.RandomGrayscale(p=recipe.gray_p))
    if recipe.blur_p > 0:
        ops.append(B.RandomGaussianBlur(blur_kernel_size(size), sigma=(0.1, 2.0), p=recipe.blur_p))
    if recipe.solarize_p > 0:
        ops.append(B.RandomSolarize(SOLARIZE_THRESHOLD, p=recipe.solarize_p))
    ops.append(B.Normalize())
    return B.BatchedPipeline(ops)


# --------------------------------------------------------------------------------------------
# CPU stages
# --------------------------------------------------------------------------------------------

HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _high_depth_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """8-bit values of a one-channel high-bit-depth image, scaled by the range of its type."""
    if mode.startswith("I;16"):
        return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)          # round(v * 255 / 65535)
    if mode == "I":
        a = a.astype(np.int64)
        if a.size == 0 or (a.min() >= 0 and a.max() <= 65535):               # 16-bit data held as int32
            return ((a + 128) // 257).astype(np.uint8)
        if a.min() >= 0:
            return np.rint(a * (255 / (2 ** 31 - 1))).astype(np.uint8)
        return np.rint((a + 2 ** 31) * (255 / (2 ** 32 - 1))).astype(np.uint8)
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)  # "F"
    top = a.max() if a.size else 1.0
    scale = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0 if top <= 65535.0 else top
    return np.rint(np.clip(a, 0.0, scale) * (255.0 / scale)).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded image as 8-bit RGB, the one conversion every decode path uses.

    High-bit-depth greyscale (PIL modes ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` from 16-bit PNG,
    TIFF or PGM files) is scaled by the range of its type, ``round(v * 255 / 65535)``, instead of
    being clipped at 255 as ``Image.convert("RGB")`` does. Mode ``I`` (32-bit int) is scaled the
    same way when its values lie in ``[0, 65535]`` (how some Pillow versions hold 16-bit data),
    else by the int32 range; mode ``F`` (float) is read as ``[0, 1]``, ``[0, 255]`` or
    ``[0, 65535]`` data by its maximum (NaN -> 0, negatives -> 0). Pillow itself reduces 16-bit
    RGB/RGBA PNG and TIFF files to 8 bits when it opens them (high byte, ``v >> 8``). Every
    other mode (palette, alpha, CMYK, ...) goes through ``Image.convert("RGB")`` as before.
    """
    if img.mode == "RGB":
        return img
    if img.mode in HIGH_DEPTH_MODES:
        gray = Image.fromarray(_high_depth_to_uint8(np.asarray(img), img.mode), mode="L")
        return gray.convert("RGB")
    return img.convert("RGB")


def pil_to_uint8(img: Image.Image) -> Tensor:
    """RGB PIL image -> uint8 tensor ``(3, H, W)`` (a channel-first view of the HWC pixels; the
    collate's ``torch.stack`` makes the batch contiguous)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def random_resized_crop_box(width: int, height: int, scale: Sequence[float],
                            ratio: Sequence[float] = RATIO) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a random crop, the distribution of torchvision's
    ``RandomResizedCrop.get_params`` (10 tries at area ~ U(scale) and log-uniform aspect ratio,
    then a centre crop clamped to ``ratio``), with one RNG call instead of ~6 per try."""
    area = width * height
    log_r0, log_r1 = math.log(ratio[0]), math.log(ratio[1])
    for u_area, u_ratio, u_top, u_left in torch.rand(10, 4).tolist():
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_r0 + (log_r1 - log_r0) * u_ratio)
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draft_decode(img: Image.Image, min_scale: float) -> tuple[Image.Image, float, float]:
    """Decode ``img`` as RGB at the smallest JPEG DCT scale (1/2, 1/4, 1/8) that keeps at least
    ``min_scale`` of the original resolution.

    Only acts on a not-yet-loaded JPEG (``Image.draft``); otherwise decodes at full size.
    Returns the RGB image and the factors mapping original x/y coordinates onto it.
    """
    w, h = img.size
    fx = fy = 1.0
    if min_scale <= 0.5:
        res = img.draft("RGB", (max(1, math.ceil(w * min_scale)), max(1, math.ceil(h * min_scale))))
        if res is not None:
            box = res[1]
            fx, fy = box[2] / w, box[3] / h
    return to_rgb(img), fx, fy


class PlainViews:
    """Seed-style worker stage: ``num_views`` independent draws of torchvision transforms."""

    def __init__(self, transforms: Sequence[Callable[[Image.Image], Tensor]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, img: Image.Image) -> list[Tensor]:
        img = to_rgb(img)
        return [t(img) for t in self.transforms]


class FastCropFlip:
    """Fast worker stage: reduced-size decode, random resized crop, flip -> uint8 views.

    All crop boxes are drawn on the original image size first (:func:`random_resized_crop_box`,
    the distribution of torchvision's ``RandomResizedCrop``), then the JPEG is decoded at the coarsest DCT scale at
    which every crop still has at least its output resolution, and each view is produced by one
    PIL ``resize`` with a (sub-pixel) source box: bilinear with antialiasing, like torchvision's
    PIL ``resized_crop``.

    Args:
        views: one :class:`ViewSpec` per output view.
        post: optional uint8 tensor transform run on each view (RandAugment).
    """

    def __init__(self, views: Sequence[ViewSpec], post: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        self.views = list(views)
        self.post = post

    def __call__(self, img: Image.Image) -> list[Tensor]:
        w, h = img.size
        boxes = [random_resized_crop_box(w, h, v.scale) for v in self.views]
        # Coarsest decode at which each crop keeps >= its output size on both axes.
        min_scale = max(v.size / min(bh, bw) for v, (_, _, bh, bw) in zip(self.views, boxes))
        img, fx, fy = draft_decode(img, min(1.0, min_scale))
        out = []
        for v, (top, left, bh, bw) in zip(self.views, boxes):
            crop = img.resize((v.size, v.size), Image.BILINEAR,
                              box=(left * fx, top * fy, (left + bw) * fx, (top + bh) * fy))
            if torch.rand(1).item() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            t = pil_to_uint8(crop)
            out.append(self.post(t) if self.post is not None else t)
        return out


class FastResizeCenterCrop:
    """Fast worker stage of ``val``: reduced-size decode, resize shorter side, centre crop."""

    def __init__(self, resize: int, size: int) -> None:
        self.resize, self.size = resize, size

    def __call__(self, img: Image.Image) -> list[Tensor]:
        img, _, _ = draft_decode(img, self.resize / min(img.size))
        img = T.functional.center_crop(T.functional.resize(img, self.resize), self.size)
        return [pil_to_uint8(img)]


class FloatPassThrough(nn.Module):
    """Device stage of the plain path: views are already normalised; only cast to float32."""

    def forward(self, views: Sequence[Tensor], generator: Optional[torch.Generator] = None) -> list[Tensor]:
        return [v.float() for v in views]


# --------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------

def _views_and_colors(name: str, num_views: int, image_size: int, crop: float, image_size2: int,
                      crop2: float, num_crop2: int) -> tuple[list[ViewSpec], list[ColorRecipe]]:
    if name in MULTI_CROP_NAMES:
        if not 0 < crop < crop2 <= 1:
            raise ValueError(f"{name} needs 0 < --crop < --crop2 <= 1, got crop={crop}, crop2={crop2}")
        if num_crop2 and image_size2 > image_size:
            raise ValueError(f"{name}: the small crops (--image-size2 {image_size2}) are larger than the global ones "
                             f"(--image-size {image_size}); give --image-size2 with --image-size (e.g. half of it)")
        views = [ViewSpec(image_size, (crop2, 1.0))] * num_views + [ViewSpec(image_size2, (crop, crop2))] * num_crop2
        if name == "MultiCrop":
            return views, [COLOR_RECIPES["SimCLR"]] * len(views)
        large = PER_VIEW_COLORS["BYOL"]
        return views, [large[i % len(large)] for i in range(num_views)] + [SMALL_CROP_BYOL] * num_crop2
    if not 0 < crop <= 1:
        raise ValueError(f"--crop must be in (0, 1], got {crop}")
    n = 1 if name == "NULL" else num_views
    cycle = PER_VIEW_COLORS.get(name) or \
        ({"RandAug": COLOR_RECIPES["MoCov2"], "NULL": COLOR_RECIPES["NONE"]}.get(name) or COLOR_RECIPES[name],)
    return [ViewSpec(image_size, (crop, 1.0))] * n, [cycle[i % len(cycle)] for i in range(n)]


def view_specs(name: str, num_views: int = 1, image_size: int = 224, crop: float = 0.08, image_size2: int = 96,
               crop2: float = 0.14, num_crop2: int = 3) -> list[ViewSpec]:
    """The size and crop scale of every view ``build_augmentation`` makes with these arguments (not ``val``)."""
    return _views_and_colors(name, num_views, image_size, crop, image_size2, crop2, num_crop2)[0]


def _randaugment() -> v2.RandAugment:
    return v2.RandAugment(num_ops=2, magnitude=10, fill=RANDAUG_FILL)


def build_augmentation(name: str, num_views: int = 1, image_size: int = 224, crop: float = 0.08,
                       image_size2: int = 96, crop2: float = 0.14, num_crop2: int = 3,
                       fast: bool = True, val_crop_fraction: float = VAL_CROP_FRACTION) -> Augmentation:
    """Build the ``--aug name`` recipe (see the module docstring for each recipe).

    Args:
        name: one of ``AUG_NAMES``.
        num_views: independent views per image for InstDisc/MoCov2/SimCLR/RandAug/BYOL, large crops for
            MultiCrop (which adds ``num_crop2`` small ones); NULL and val give 1.
        image_size, crop: output side and minimum crop area fraction (``--image-size``, ``--crop``).
        image_size2, crop2, num_crop2: MultiCrop small crops (``--image-size2``, ``--crop2``,
            ``--num-crop2``).
        fast: CPU stage = decode/crop/flip to uint8 and colour ops batched on the device; else the
            seed-style PIL pipeline.
        val_crop_fraction: ``val`` resizes the shorter side to ``image_size / val_crop_fraction``
            before the centre crop (``--val-crop-fraction``; 1.0 for 28-32 px data).
    """
    if name not in AUG_NAMES:
        raise ValueError(f"--aug: unknown augmentation {name!r}; valid names: {', '.join(AUG_NAMES)}")
    if num_views < 1:
        raise ValueError(f"build_augmentation: num_views must be >= 1, got {num_views}")
    if image_size < 1 or image_size2 < 1:
        raise ValueError(f"--image-size/--image-size2 must be positive, got {image_size}, {image_size2}")
    normalize = T.Normalize(B.IMAGENET_MEAN, B.IMAGENET_STD)

    if name == "val":
        if not 0.0 < val_crop_fraction <= 1.0:
            raise ValueError(f"--val-crop-fraction must be in (0, 1], got {val_crop_fraction}")
        resize = round(image_size / val_crop_fraction)
        if fast:
            return Augmentation(name, FastResizeCenterCrop(resize, image_size),
                                B.MultiViewDeviceStage([B.BatchedPipeline([B.Normalize()])], [0]), True)
        plain = T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), normalize])
        return Augmentation(name, PlainViews([plain]), FloatPassThrough(), False)

    views, colors = _views_and_colors(name, num_views, image_size, crop, image_size2, crop2, num_crop2)
    if fast:
        post = _randaugment() if name == "RandAug" else None
        pipelines: list[B.BatchedPipeline] = []
        index: dict[tuple, int] = {}
        view_pipeline = []
        for v, c in zip(views, colors):
            key = (v.size, c)
            if key not in index:
                index[key] = len(pipelines)
                pipelines.append(batched_color_pipeline(c, v.size))
            view_pipeline.append(index[key])
        return Augmentation(name, FastCropFlip(views, post), B.MultiViewDeviceStage(pipelines, view_pipeline), True)

    plain_views = []
    for v, c in zip(views, colors):
        geo = [T.RandomResizedCrop(v.size, scale=v.scale, ratio=RATIO), T.RandomHorizontalFlip()]
        if name == "RandAug":
            geo.append(_randaugment())
        plain_views.append(T.Compose(geo + plain_color_transforms(c, v.size) + [T.ToTensor(), normalize]))
    return Augmentation(name, PlainViews(plain_views), FloatPassThrough(), False)
