"""Data-pipeline throughput: seed-style PIL pipeline vs the fast CPU + batched device split.

Single process, ``torch.set_num_threads(1)``, so every figure is images/s per core. Images are
real photographs shipped with scikit-image (no download), resized to ~500x375 (ImageNet-like)
and re-encoded as JPEG quality 90; each measurement decodes from the JPEG bytes.

Measured per recipe (SimCLR 2 x 224, MultiCrop 160 + 3 x 96):

* plain:     ``build_augmentation(fast=False).cpu`` (decode, crop, flip, colour ops on PIL, ToTensor,
             Normalize) -- what every DataLoader worker does in the seed code.
* fast cpu:  ``build_augmentation(fast=True).cpu`` alone (draft decode, crop, flip -> uint8):
             the worker cost when the colour ops run on an accelerator.             -> goal (a) >= 3x
* fast total: fast cpu + the device stage run on the CPU in batches of 64, amortised per image
             (everything on the CPU).                                               -> goal (b) >= 1.5x
* decode:    ``Image.open(...).convert("RGB")`` alone (full-size decode).

The machine may be shared: each figure is the best of ``--repeats`` rounds, and each round runs
every measurement in turn.

    python benchmarks/data_pipeline.py [--images 256] [--repeats 5] [--output-json benchmarks/results/data_pipeline.json]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from typing import Callable

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from contrast import engine  # noqa: E402
from contrast.data.transforms import build_augmentation  # noqa: E402
from contrast.option import add_debug_flag, add_output_json_flag, add_seed_flag, new_parser  # noqa: E402


def data_pipeline_parser(doc: str = "", output_json: str = "") -> argparse.ArgumentParser:
    p = new_parser("data_pipeline.py", doc)
    p.add_argument("--images", type=int, default=256, help="images per timed run")
    p.add_argument("--repeats", type=int, default=5, help="runs per figure; the best is kept")
    add_seed_flag(p)
    add_output_json_flag(p, output_json, "--out")
    add_debug_flag(p)
    return p


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
RECIPES = {
    "SimCLR 2x224": dict(name="SimCLR", num_views=2, image_size=224),
    "MultiCrop 160+3x96": dict(name="MultiCrop", image_size=160, image_size2=96, num_crop2=3),
}
DEVICE_BATCH = 64


def make_jpegs(target=(500, 375), quality=90) -> list[bytes]:
    """skimage sample photographs scaled to ~``target`` area (aspect kept), as JPEG bytes."""
    import skimage.data

    out = []
    for name in PHOTOS:
        arr = getattr(skimage.data, name)()
        img = Image.fromarray(np.asarray(arr)).convert("RGB")
        s = (target[0] * target[1] / (img.width * img.height)) ** 0.5
        img = img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def best_rates(jobs: dict[str, Callable[[], int]], repeats: int) -> dict[str, float]:
    """Best items/s of each job over ``repeats`` rounds; rounds visit the jobs in turn, so load
    from other processes on a shared machine hits every job alike."""
    best = dict.fromkeys(jobs, 0.0)
    for _ in range(repeats):
        for key, fn in jobs.items():
            t = time.perf_counter()
            n = fn()
            best[key] = max(best[key], n / (time.perf_counter() - t))
    return best


def run(num_images: int, repeats: int, seed: int = 0) -> dict:
    jpegs = make_jpegs()
    items = [jpegs[i % len(jpegs)] for i in range(num_images)]

    def per_image(f: Callable) -> Callable[[], int]:
        def go() -> int:
            for b in items:
                f(Image.open(io.BytesIO(b)))
            return len(items)
        return go

    def device_batch(aug, batch) -> Callable[[], int]:
        def go() -> int:
            aug.device(batch)
            return DEVICE_BATCH
        return go

    jobs: dict[str, Callable[[], int]] = {"decode": per_image(lambda im: im.convert("RGB"))}
    for label, cfg in RECIPES.items():
        plain = build_augmentation(**cfg, fast=False)
        fast = build_augmentation(**cfg, fast=True)
        torch.manual_seed(seed)
        samples = [fast.cpu(Image.open(io.BytesIO(items[i % len(items)]))) for i in range(DEVICE_BATCH)]
        batch = [torch.stack(v) for v in zip(*samples)]
        fast.device(batch)  # warm-up
        jobs[f"{label}/plain"] = per_image(plain.cpu)
        jobs[f"{label}/fast_cpu"] = per_image(fast.cpu)
        jobs[f"{label}/device"] = device_batch(fast, batch)
    rates = best_rates(jobs, repeats)

    results: dict = {"decode": rates["decode"]}
    for label in RECIPES:
        r_plain, r_cpu, r_dev = (rates[f"{label}/{k}"] for k in ("plain", "fast_cpu", "device"))
        r_total = 1.0 / (1.0 / r_cpu + 1.0 / r_dev)
        results[label] = {"plain": r_plain, "fast_cpu": r_cpu, "device_stage_on_cpu": r_dev, "fast_total": r_total,
                          "ratio_a_cpu_stage": r_cpu / r_plain, "ratio_b_all_cpu": r_total / r_plain}
    return results


def main(argv=None) -> dict:
    parser = data_pipeline_parser(__doc__, "benchmarks/results/data_pipeline.json")
    args = parser.parse_args(argv)
    if args.images < 1 or args.repeats < 1:
        parser.error("--images and --repeats must be >= 1")
    torch.set_num_threads(1)

    res = run(args.images, args.repeats, args.seed)
    print(f"images/s per core (1 process, 1 thread), best of {args.repeats} runs of {args.images} images "
          f"(shared machine); device stage timed on the CPU in batches of {DEVICE_BATCH}")
    print(f"JPEG decode only (full size, ~500x375): {res['decode']:.0f}/s")
    head = f"{'recipe':<20}{'plain':>8}{'fast cpu':>10}{'(a) x':>7}{'dev@cpu':>9}{'fast all':>10}{'(b) x':>7}"
    print(head)
    print("-" * len(head))
    for label in RECIPES:
        r = res[label]
        print(f"{label:<20}{r['plain']:>8.0f}{r['fast_cpu']:>10.0f}{r['ratio_a_cpu_stage']:>7.2f}"
              f"{r['device_stage_on_cpu']:>9.0f}{r['fast_total']:>10.0f}{r['ratio_b_all_cpu']:>7.2f}")
    print("goals: (a) fast cpu >= 3x plain, (b) fast all (cpu + device stage on the CPU) >= 1.5x plain")

    res["meta"] = {"images": args.images, "repeats": args.repeats, "device_batch": DEVICE_BATCH,
                   "torch": torch.__version__, "python": platform.python_version(),
                   "pillow": Image.__version__, "machine": platform.machine(), "photos": list(PHOTOS),
                   "load_average_1min_at_end": os.getloadavg()[0]}
    os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
    with open(args.output_json, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {args.output_json}")
    return res


if __name__ == "__main__":
    engine.run_cli(main)
