"""Augmentation recipes: both paths, output contract, draft decoding, recipe parameters."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from contrast.data import batched_ops as B
from scipy import stats
from torchvision import transforms as T
from torchvision.transforms import RandomResizedCrop

from contrast.data.transforms import (AUG_NAMES, blur_kernel_size, build_augmentation, draft_decode,
                                      random_resized_crop_box, view_specs)

MEAN = torch.tensor(B.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(B.IMAGENET_STD).view(1, 3, 1, 1)
LOW, HIGH = (0 - MEAN) / STD, (1 - MEAN) / STD


def _photo(w=96, h=72, seed=0) -> np.ndarray:
    """A smooth colourful image (gradients + blobs), so resampling differences stay small."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w * 255, yy / h * 255, 128 + 100 * np.sin(xx / 9 + yy / 13)], axis=-1)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(5, 20)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(arr: np.ndarray, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


JPEG = _jpeg(_photo())


def _open(data=JPEG) -> Image.Image:
    return Image.open(io.BytesIO(data))


EXPECTED_VIEWS = {"InstDisc": [32] * 2, "MoCov2": [32] * 2, "SimCLR": [32] * 2, "RandAug": [32] * 2, "BYOL": [32] * 2,
                  "MultiCrop": [32, 32, 16, 16, 16], "NULL": [32], "val": [32],  # MultiCrop: num_views large crops
                  "BYOLMultiCrop": [32, 32, 16, 16, 16]}


def _in_range(x: torch.Tensor) -> bool:
    return bool(((x >= LOW - 1e-5) & (x <= HIGH + 1e-5)).all())


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("name", AUG_NAMES)
def test_output_contract(name, fast):
    aug = build_augmentation(name, num_views=2, image_size=32, image_size2=16, num_crop2=3, fast=fast)
    samples = [aug.cpu(_open()) for _ in range(4)]
    sizes = EXPECTED_VIEWS[name]
    for views in samples:
        assert [tuple(v.shape) for v in views] == [(3, s, s) for s in sizes]
        for v in views:
            if fast:
                assert v.dtype == torch.uint8
            else:
                assert v.dtype == torch.float32 and _in_range(v.unsqueeze(0))
    batch = [torch.stack(v) for v in zip(*samples)]
    out = aug.device(batch)
    assert [tuple(o.shape) for o in out] == [(4, 3, s, s) for s in sizes]
    for o, v in zip(out, batch):
        assert o.dtype == torch.float32 and _in_range(o) and torch.isfinite(o).all()
        if not fast:
            assert torch.equal(o, v)  # plain path: device stage is a pass-through


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="--aug.*'Foo'.*InstDisc, MoCov2, SimCLR, MultiCrop, RandAug, BYOL, NULL, val"):
        build_augmentation("Foo")
    with pytest.raises(ValueError, match="MultiCrop needs 0 < --crop < --crop2"):
        build_augmentation("MultiCrop", crop=0.2, crop2=0.14)
    with pytest.raises(ValueError, match="--crop"):
        build_augmentation("SimCLR", crop=0.0)


def test_inputs_of_any_mode_become_rgb():
    gray_jpeg = Image.open(io.BytesIO(_jpeg(_photo(), mode="L")))
    rgba = Image.fromarray(_photo()).convert("RGBA")
    for fast in (True, False):
        aug = build_augmentation("SimCLR", num_views=2, image_size=24, fast=fast)
        for img in (Image.open(io.BytesIO(_jpeg(_photo(), mode="L"))), rgba, gray_jpeg.copy()):
            assert [tuple(v.shape) for v in aug.cpu(img)] == [(3, 24, 24)] * 2


def test_views_are_independent():
    aug = build_augmentation("SimCLR", num_views=2, image_size=32)
    a, b = aug.cpu(_open())
    assert not torch.equal(a, b)
    out = aug.device([torch.stack([a] * 4), torch.stack([a] * 4)])
    assert not torch.allclose(out[0], out[1])


def test_draft_decode_reduces_scale_and_maps_boxes():
    data = _jpeg(_photo(512, 384))
    img, fx, fy = draft_decode(_open(data), 0.2)
    assert img.mode == "RGB" and img.size == (128, 96) and (fx, fy) == (0.25, 0.25)
    img, fx, fy = draft_decode(_open(data), 0.6)  # no DCT scale keeps 60%: full decode
    assert img.size == (512, 384) and (fx, fy) == (1.0, 1.0)
    loaded = _open(data)
    loaded.load()
    assert draft_decode(loaded, 0.1)[0].size == (512, 384)  # already decoded: nothing to do


def test_fast_crop_uses_draft_and_matches_full_decode():
    data = _jpeg(_photo(512, 384, seed=3))
    aug = build_augmentation("MultiCrop", image_size=32, image_size2=16, crop=0.3, crop2=0.5)
    lazy = _open(data)
    torch.manual_seed(5)
    drafted = aug.cpu(lazy)
    assert lazy.size[0] < 512  # the decoder was asked for a reduced size
    full = _open(data)
    full.load()  # draft is a no-op on a decoded image; same seed -> same boxes and flips
    torch.manual_seed(5)
    reference = aug.cpu(full)
    for d, r in zip(drafted, reference):
        # every crop still had >= output resolution after the reduced decode
        assert (d.float() - r.float()).abs().mean() < 3.0


@pytest.mark.parametrize("name", ["SimCLR", "BYOL"])
def test_fast_and_plain_paths_have_similar_statistics(name):
    images = [_jpeg(_photo(96, 72, seed=s)) for s in range(4)]
    stats = {}
    for fast in (True, False):
        aug = build_augmentation(name, num_views=2, image_size=24, fast=fast)
        torch.manual_seed(0)
        samples = [aug.cpu(_open(images[i % 4])) for i in range(128)]
        out = torch.cat(aug.device([torch.stack(v) for v in zip(*samples)]))
        gray = out.std(dim=1).mean(dim=(1, 2)) < 1e-3  # grayscale views
        stats[fast] = (out.mean(dim=(0, 2, 3)), out.std(dim=(2, 3)).mean(0), gray.float().mean())
    for a, b in zip(stats[True], stats[False]):
        torch.testing.assert_close(a, b, atol=0.12, rtol=0.0)


def test_recipe_parameters():
    aug = build_augmentation("SimCLR", num_views=2, image_size=224)
    (pipe,) = aug.device.pipelines
    jit, gray, blur, _ = pipe.ops
    assert (jit.brightness, jit.contrast, jit.saturation, jit.hue, jit.p) == (0.8, 0.8, 0.8, 0.2, 0.8)
    assert gray.p == 0.2 and (blur.kernel_size, blur.sigma, blur.p) == (23, (0.1, 2.0), 0.5)
    assert aug.device.view_pipeline == [0, 0]

    jit, gray, _ = build_augmentation("InstDisc").device.pipelines[0].ops
    assert (jit.brightness, jit.contrast, jit.saturation, jit.hue, jit.p, gray.p) == (0.4, 0.4, 0.4, 0.4, 1.0, 0.2)
    jit, gray, blur, _ = build_augmentation("MoCov2").device.pipelines[0].ops
    assert (jit.hue, jit.p, gray.p, blur.p) == (0.1, 0.8, 0.2, 0.5)

    mc = build_augmentation("MultiCrop", image_size=160, image_size2=96)
    assert mc.device.view_pipeline == [0, 1, 1, 1]
    assert [p.ops[2].kernel_size for p in mc.device.pipelines] == [17, 9]
    assert [(v.size, v.scale) for v in mc.cpu.views] == [(160, (0.14, 1.0))] + [(96, (0.08, 0.14))] * 3
    assert blur_kernel_size(32) == 3

    plain = build_augmentation("SimCLR", fast=False).cpu.transforms[0].transforms
    assert plain[0].scale == (0.08, 1.0) and plain[0].size == (224, 224)
    assert plain[2].p == 0.8 and plain[2].transforms[0].hue == (-0.2, 0.2)
    assert plain[4].p == 0.5 and plain[4].transforms[0].kernel_size == (23, 23)

    val = build_augmentation("val", image_size=224, fast=False).cpu.transforms[0].transforms
    assert val[0].size == 256 and val[1].size == (224, 224)


def test_byol_recipe_is_asymmetric():
    """Grill et al. 2020, Table 6: both views jitter (0.4, 0.4, 0.2, 0.1) p 0.8 and grayscale 0.2; view 1
    blur p 1.0, no solarize; view 2 blur p 0.1, solarize p 0.2 (threshold 0.5); views alternate."""
    aug = build_augmentation("BYOL", num_views=2, image_size=224)
    assert aug.device.view_pipeline == [0, 1] and [(v.size, v.scale) for v in aug.cpu.views] == [(224, (0.08, 1.0))] * 2
    for pipe, blur_p, solarize_p in zip(aug.device.pipelines, (1.0, 0.1), (None, 0.2)):
        ops = pipe.ops
        jit, gray, blur = ops[:3]
        assert (jit.brightness, jit.contrast, jit.saturation, jit.hue, jit.p) == (0.4, 0.4, 0.2, 0.1, 0.8)
        assert gray.p == 0.2 and (blur.kernel_size, blur.sigma, blur.p) == (23, (0.1, 2.0), blur_p)
        solarize = [op for op in ops if isinstance(op, B.RandomSolarize)]
        assert [(op.threshold, op.p) for op in solarize] == ([] if solarize_p is None else [(0.5, solarize_p)])
        assert isinstance(ops[-1], B.Normalize)
    assert build_augmentation("BYOL", num_views=3, image_size=32).device.view_pipeline == [0, 1, 0]

    plain = [t.transforms for t in build_augmentation("BYOL", num_views=2, fast=False).cpu.transforms]
    assert plain[0][2].transforms[0].saturation == (0.8, 1.2) and plain[0][2].p == 0.8
    assert plain[0][4].p == 1.0 and plain[1][4].p == 0.1
    assert not any(isinstance(t, T.RandomSolarize) for t in plain[0])
    (sol,) = [t for t in plain[1] if isinstance(t, T.RandomSolarize)]
    assert sol.threshold == 128 and sol.p == 0.2   # uint8 pixels >= 128 <=> >= 0.5 on [0, 1]


@pytest.mark.parametrize("fast", [True, False])
def test_byol_second_view_is_solarized(fast):
    """On a bright image whose colours the jitter cannot pull below 0.5, view 2 shows solarized (dark)
    pixels in about 20% of the samples and view 1 never does."""
    bright = Image.fromarray(np.full((40, 40, 3), 250, dtype=np.uint8))
    aug = build_augmentation("BYOL", num_views=2, image_size=16, fast=fast)
    torch.manual_seed(0)
    samples = [aug.cpu(bright) for _ in range(300)]
    views = aug.device([torch.stack(v) for v in zip(*samples)])
    dark = [((v * STD + MEAN) < 0.45).flatten(1).any(dim=1).float().mean().item() for v in views]
    assert dark[0] == 0.0 and 0.13 < dark[1] < 0.27


def test_device_stage_is_reproducible_with_a_generator():
    aug = build_augmentation("MoCov2", num_views=2, image_size=24)
    views = [torch.stack(v) for v in zip(*[aug.cpu(_open()) for _ in range(3)])]
    stage = aug.device.to("cpu")
    a = stage(views, torch.Generator().manual_seed(1))
    b = stage(views, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_crop_box_distribution_matches_torchvision():
    n, w, h, scale = 3000, 500, 375, (0.08, 1.0)
    ours = np.array([random_resized_crop_box(w, h, scale) for _ in range(n)], dtype=np.float64)
    dummy = torch.empty(3, h, w)
    ref = np.array([RandomResizedCrop.get_params(dummy, list(scale), [3 / 4, 4 / 3]) for _ in range(n)],
                   dtype=np.float64)
    for boxes in (ours, ref):
        assert np.all(boxes[:, 0] + boxes[:, 2] <= h) and np.all(boxes[:, 1] + boxes[:, 3] <= w)
    features = lambda b: [b[:, 2] * b[:, 3] / (w * h), np.log(b[:, 3] / b[:, 2]),  # noqa: E731
                          b[:, 0] / (h - b[:, 2] + 1), b[:, 1] / (w - b[:, 3] + 1)]
    for a, r in zip(features(ours), features(ref)):
        assert stats.ks_2samp(a, r).pvalue > 1e-3
    # every try fails on a thin strip: both fall back to the same centre crop
    strip = torch.empty(3, 40, 400)
    assert random_resized_crop_box(400, 40, (0.9, 1.0)) == RandomResizedCrop.get_params(strip, [0.9, 1.0], [3 / 4, 4 / 3])


@pytest.mark.parametrize("fast", [True, False])
def test_val_crop_fraction(fast):
    """``val`` resizes to size / fraction and centre-crops: 1.0 keeps a square image whole."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    whole = build_augmentation("val", image_size=28, fast=fast, val_crop_fraction=1.0)
    out = whole.device([torch.stack(v) for v in zip(whole.cpu(img))])[0][0]
    expected = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
                - torch.tensor(B.IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(B.IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    cropped = build_augmentation("val", image_size=28, fast=fast)  # 0.875: resize to 32, crop 28
    out = cropped.device([torch.stack(v) for v in zip(cropped.cpu(img))])[0][0]
    assert out.shape == expected.shape and not torch.allclose(out, expected, atol=0.1)
    with pytest.raises(ValueError, match="--val-crop-fraction"):
        build_augmentation("val", image_size=28, val_crop_fraction=1.5)


@pytest.mark.parametrize("name", ["MultiCrop", "BYOLMultiCrop"])
def test_small_crops_larger_than_the_global_ones_are_refused(name):
    """--image-size 32 with a recipe's --image-size2 96 (sized for 224 px) would make the 'small' crops 3x larger."""
    with pytest.raises(ValueError, match=r"--image-size2 96.*--image-size 32"):
        build_augmentation(name, num_views=2, image_size=32, image_size2=96)
    assert len(view_specs(name, num_views=2, image_size=32, image_size2=16, num_crop2=2)) == 4
    build_augmentation(name, num_views=2, image_size=32, image_size2=32, num_crop2=1)
