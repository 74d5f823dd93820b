"""A 2-D map of a checkpoint's backbone features on a dataset, one colour per class (PNG).

The features are those the kNN and linear evaluations read (``backbone.`` tensors of any method's
checkpoint, the ``val`` transform), L2-normalised, on up to ``--max-points`` images of ``--split``
(a seeded random subset). ``--method tsne`` (default): scikit-learn's t-SNE (van der Maaten &
Hinton 2008; PCA initialisation, ``--perplexity``); ``--method umap``: UMAP (McInnes et al. 2018,
``pip install umap-learn``). A well-trained backbone shows one cluster per class; a collapsed one a
single blob. Exit 1 with one line when a package, the checkpoint or the data is missing.

Usage::

    python tools/embed_plot.py --pretrained-model output/PIC/current.pth --data-dir DATA --output pic_tsne.png
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from contrast import engine  # noqa: E402
from contrast.data import build_dataset  # noqa: E402
from contrast.data.transforms import build_augmentation  # noqa: E402
from contrast.distributed import resolve_device  # noqa: E402
from contrast.eval.features import backbone_from_checkpoint, build_eval_loader, extract_features  # noqa: E402
from contrast.option import (add_backbone_flags, add_data_flags, add_debug_flag, add_device_flag,  # noqa: E402
                             add_pretrained_flag, add_seed_flag, new_parser, resolve_from_config)
from contrast.placement import place  # noqa: E402

METHODS = ("tsne", "umap")


def embed_plot_parser() -> argparse.ArgumentParser:
    p = new_parser("embed_plot.py", __doc__.split("\n\n")[0])
    add_pretrained_flag(p, required=True)
    add_data_flags(p, train=False, image_size=None, cache_modes=("no", "full"), eval_batch=True)
    add_backbone_flags(p, from_checkpoint=True)
    g = p.add_argument_group("map")
    g.add_argument("--split", default="val", choices=("train", "val"), help="images to map")
    g.add_argument("--max-points", type=int, default=2000, help="at most this many images (seeded random subset)")
    g.add_argument("--method", default="tsne", choices=METHODS, help="tsne (scikit-learn) or umap (umap-learn)")
    g.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity (capped at (N - 1) / 3)")
    g.add_argument("--output", default="embedding.png", help="PNG file to write")
    g.add_argument("--title", default="", help="figure title (default: the checkpoint)")
    add_device_flag(g)
    add_seed_flag(g)
    add_debug_flag(g)
    return p


def reduce_2d(features: np.ndarray, method: str, seed: int, perplexity: float = 30.0) -> np.ndarray:
    """(N, 2) coordinates of the (N, D) ``features``; ``ImportError`` in one line for a missing package."""
    if method == "umap":
        try:   # optional, not in the tools extra (pip install 'contrast[umap]')
            umap = importlib.import_module("umap")
        except ImportError:
            raise ImportError("--method umap needs umap-learn: pip install umap-learn") from None
        return umap.UMAP(n_components=2, random_state=seed).fit_transform(features)
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise ImportError("--method tsne needs scikit-learn: pip install scikit-learn") from None
    perplexity = max(1.0, min(perplexity, (features.shape[0] - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


def draw(coords: np.ndarray, labels: np.ndarray, class_names: List[str], output: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 7))
    classes = np.unique(labels)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "turbo")
    for i, c in enumerate(classes):
        mask = labels == c
        colour = cmap(i if len(classes) <= 20 else i / max(len(classes) - 1, 1))
        name = class_names[c] if c < len(class_names) else str(c)
        ax.scatter(coords[mask, 0], coords[mask, 1], s=6, color=colour, label=name if len(classes) <= 20 else None)
    if len(classes) <= 20:
        ax.legend(markerscale=3, fontsize=7, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    p = embed_plot_parser()
    args = p.parse_args(argv)
    if args.max_points < 2:
        p.error(f"--max-points must be >= 2, got {args.max_points}")
    device = resolve_device(args.device)
    backbone, _, ckpt = backbone_from_checkpoint(args.pretrained_model, args.arch, args.stem)
    resolve_from_config(args, ckpt.config, ("image_size", "val_crop_fraction"))
    place(backbone, device)
    aug = build_augmentation("val", num_views=1, image_size=args.image_size, val_crop_fraction=args.val_crop_fraction)
    place(aug.device, device)
    dataset = build_dataset(args.data_dir, args.split, args.zip, args.cache_mode, aug.cpu, 0, 1,
                            index_dir=args.index_dir)
    n = min(args.max_points, len(dataset))
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))[:n].sort().values
    subset = torch.utils.data.Subset(dataset, chosen.tolist())
    loader = build_eval_loader(subset, args.batch_size, args.num_workers)
    feats, labels = extract_features(backbone, loader, device, num_samples=n, device_transform=aug.device,
                                     normalize=True, gather=False)
    coords = reduce_2d(feats.cpu().numpy(), args.method, args.seed, args.perplexity)
    title = args.title or (f"{ckpt.config.get('model')} epoch {ckpt.epoch}: {args.method} of the backbone features "
                           f"({n} {args.split} images)")
    draw(coords, labels.cpu().numpy(), list(dataset.classes), args.output, title)
    print(f"[embed_plot] {args.output}: {n} images, {len(np.unique(labels.numpy()))} classes, {args.method}",
          flush=True)
    return {"output": args.output, "points": n, "coords": coords, "labels": labels.numpy()}


if __name__ == "__main__":
    engine.run_cli(main)
