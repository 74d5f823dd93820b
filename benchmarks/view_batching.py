"""How much ``--view-batching joint`` changes a training step compared with ``separate`` (the release).

``separate`` encodes every view in its own forward pass, so each view is its own batch-norm batch
(the release: the large crop and each small crop separately, or each of two views);
``joint`` concatenates views of equal shape into one forward pass (multi-crop: the 3 small crops
together; two views: both together), so their batch-norm statistics are shared. A lone large crop
is encoded alone in both modes.

Measured: every registered method whose recipe makes more than one view per image, at its recipe's
view sizes and crop scales (``contrast.option.resolve_pretrain``); a method that does not batch its
views (one encoder per view) shows a ratio of 1.

For each seed: one model (ResNet-50 by default), one batch of views cut from synthetic images
(smooth random fields, so crops of different scales have different statistics), then the loss and
the gradient of every backbone and head parameter in both modes from the same weights, in fp32 on
the CPU. Two initialisations: the release's (the last batch-norm gamma of every residual block is 0,
so at step 0 each residual branch adds nothing and batch-norm statistics matter least), and the
same with those gammas at 1, a stand-in for a network some way into training. Reported per method: the ratio of the gradient norms joint / separate,
the cosine between the two gradients, and the relative loss difference (mean, min and max over the
seeds). The measurement is single-process: per-GPU batch B on one GPU (with several GPUs a method
with ``sync_batchnorm`` in its recipe synchronises batch norm over all of them, so the batch-norm
batch is B x GPUs per view).

    OMP_NUM_THREADS=2 python benchmarks/view_batching.py      # --batch 8 --seeds 3 --arch resnet50
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import time
from typing import Dict, List

import torch
import torchvision.transforms.v2.functional as TF

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.results_io import write_json  # noqa: E402
from contrast.data.transforms import view_specs  # noqa: E402
from contrast.models import ARCHS, METHODS, build_method  # noqa: E402
from contrast.option import new_parser, resolve_pretrain  # noqa: E402


def view_batching_parser(doc: str = "") -> argparse.ArgumentParser:
    """``benchmarks/view_batching.py``."""
    p = new_parser("view_batching.py", doc)
    p.add_argument("--arch", default="resnet50", choices=ARCHS, help="backbone")
    p.add_argument("--batch-size", "--batch", dest="batch", type=int, default=8,
                   help="images per view (the per-GPU batch; --batch: alias)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per setting")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")), help="torch threads")
    p.add_argument("--output-json", "--out", dest="out", default="benchmarks/results/view_batching.json",
                   help="results (--out: alias)")
    return p


def recipe_views(name: str, arch: str) -> List:
    """The ``ViewSpec`` (size, crop scale) of every view of method ``name``'s recipe."""
    run, cfg = resolve_pretrain(name, "--arch", arch)
    return view_specs(run.aug, cfg.num_crop, run.image_size, run.crop, run.image_size2, run.crop2, run.num_crop2)


def settings(arch: str) -> Dict[str, tuple]:
    """``"<method> <sizes>"`` -> (method, view specs) for every method with more than one view per image."""
    out = {}
    for name in METHODS:
        views = recipe_views(name, arch)
        if len(views) > 1:
            out[f"{name} {'+'.join(str(v.size) for v in views)}"] = (name, views)
    return out


def synthetic_images(batch: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """(B, 3, size, size) smooth random fields (sums of upsampled noise at 4 scales), normalised
    per channel like ImageNet inputs."""
    img = torch.zeros(batch, 3, size, size)
    for cells, weight in ((4, 1.0), (16, 0.5), (64, 0.25), (size, 0.1)):
        noise = torch.randn(batch, 3, cells, cells, generator=gen)
        img += weight * torch.nn.functional.interpolate(noise, size=(size, size), mode="bilinear",
                                                        align_corners=False)
    return (img - img.mean((0, 2, 3), keepdim=True)) / img.std((0, 2, 3), keepdim=True)


def random_resized_crops(images: torch.Tensor, size: int, scale, gen: torch.Generator) -> torch.Tensor:
    """One RandomResizedCrop (aspect 3/4..4/3, area fraction in ``scale``) per image, resized to ``size``."""
    out = []
    side = images.shape[-1]
    for img in images:
        area = side * side * (scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=gen).item())
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand((), generator=gen).item())
        w = min(side, max(1, round(math.sqrt(area * ratio))))
        h = min(side, max(1, round(math.sqrt(area / ratio))))
        top = int(torch.randint(0, side - h + 1, (), generator=gen))
        left = int(torch.randint(0, side - w + 1, (), generator=gen))
        out.append(TF.resized_crop(img, top, left, h, w, [size, size], antialias=True))
    return torch.stack(out)


def gradients(method, views: List[torch.Tensor], index: torch.Tensor):
    """(loss, flat gradient of backbone + head) of one step from ``method``'s current weights."""
    method.zero_grad(set_to_none=True)
    loss = method(views, index)["loss"]
    loss.backward()
    params = list(method.backbone.parameters()) + list(method.head.parameters())
    return loss.item(), torch.cat([p.grad.flatten() for p in params if p.grad is not None])


INITS = {"release init (residual gamma 0)": True, "residual gamma 1": False}


def measure(model: str, specs: List, arch: str, batch: int, seed: int, zero_init_residual: bool) -> Dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    images = synthetic_images(batch, 256, gen)
    views = [random_resized_crops(images, v.size, v.scale, gen) for v in specs]
    index = torch.randint(0, 1000, (batch,), generator=gen)
    torch.manual_seed(seed)
    results = {}
    base = None
    for batching in ("separate", "joint"):
        _, cfg = resolve_pretrain(model, "--arch", arch, "--view-batching", batching,
                                  "--zero-init-residual" if zero_init_residual else "--no-zero-init-residual")
        if base is None:
            base = build_method(cfg, num_instances=1000).train()
            method = base
            state = copy.deepcopy(base.state_dict())
        else:
            method = build_method(cfg, num_instances=1000).train()
            method.load_state_dict(state)
        t = time.perf_counter()
        results[batching] = (*gradients(method, views, index), time.perf_counter() - t)
    (loss_s, g_s, t_s), (loss_j, g_j, t_j) = results["separate"], results["joint"]
    return {"grad_norm_separate": g_s.norm().item(), "grad_norm_joint": g_j.norm().item(),
            "grad_norm_ratio_joint_over_separate": (g_j.norm() / g_s.norm()).item(),
            "grad_cosine": torch.nn.functional.cosine_similarity(g_j, g_s, dim=0).item(),
            "loss_separate": loss_s, "loss_joint": loss_j, "loss_rel_diff": abs(loss_j - loss_s) / abs(loss_s),
            "seconds_separate": t_s, "seconds_joint": t_j}


def main() -> None:
    args = view_batching_parser(__doc__).parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    for init, zero in INITS.items():
        for name, (model, specs) in settings(args.arch).items():
            runs = [measure(model, specs, args.arch, args.batch, seed, zero) for seed in range(args.seeds)]
            summary = {}
            for key in ("grad_norm_ratio_joint_over_separate", "grad_cosine", "loss_rel_diff"):
                values = [r[key] for r in runs]
                summary[key] = {"mean": statistics.mean(values), "min": min(values), "max": max(values)}
            rows[f"{name}, {init}"] = {"summary": summary, "runs": runs}
            s, r = summary, summary["grad_norm_ratio_joint_over_separate"]
            print(f"{name}, {init}, batch {args.batch}: grad-norm ratio joint/separate {r['mean']:.3f} "
                  f"[{r['min']:.3f}, {r['max']:.3f}], gradient cosine {s['grad_cosine']['mean']:.3f} "
                  f"[{s['grad_cosine']['min']:.3f}, {s['grad_cosine']['max']:.3f}], loss rel. diff "
                  f"{s['loss_rel_diff']['mean']:.2e}", flush=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = {"arch": args.arch, "batch": args.batch, "seeds": args.seeds, "precision": "fp32", "device": "cpu",
           "threads": args.threads, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
           "load_avg": load, "command": "python benchmarks/view_batching.py " + " ".join(sys.argv[1:]), "results": rows}
    write_json(args.out, out, note=f" (load average {load})")


if __name__ == "__main__":
    main()
