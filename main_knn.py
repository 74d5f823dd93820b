"""kNN and cached-feature linear evaluation of a pretrained backbone (any method's checkpoint).

Weighted kNN as in InstDisc (Wu et al. 2018): cosine similarity of L2-normalised
backbone features, the ``k`` nearest training images vote with ``exp(s / T)``.
Features of both splits (``val`` transform) are extracted once, sharded over the
processes when launched with ``torchrun --nproc_per_node=N``; several ``--knn-k``
values reuse one extraction. ``--linear-cached`` also trains a linear classifier on
cached features (:mod:`contrast.eval.linear_cached`).

Baselines without a checkpoint: ``--random-init`` (the ``--arch`` backbone at its
random initialisation, seeded by ``--seed``) and ``--raw-pixels`` (the
normalised ``val``-transformed image itself as the feature).

Examples::

    python main_knn.py --data-dir data/fmnist --zip --checkpoint out/PIC/current.pth \\
        --image-size 32 --knn-k 20 200 --linear-cached --output out/PIC/knn.json
    python main_knn.py --data-dir data/fmnist --zip --raw-pixels --image-size 28
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, List, Optional

import torch
from torch import nn

from contrast import distributed as dist
from contrast.data import build_dataset
from contrast.data.transforms import build_augmentation
from contrast.eval.features import build_eval_loader, extract_features, load_pretrained_backbone
from contrast.eval.knn import knn_evaluate
from contrast.eval.linear_cached import train_linear_cached
from contrast.models import STEMS, build_backbone


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser("main_knn.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to evaluate (exactly one)")
    g.add_argument("--checkpoint", type=str, default="", help="pretraining checkpoint of any method "
                   "(its 'backbone.' tensors; arch and stem from its config unless given)")
    g.add_argument("--random-init", action="store_true", help="baseline: randomly initialised --arch backbone")
    g.add_argument("--raw-pixels", action="store_true", help="baseline: the normalised pixels as features")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", type=str, required=True, help="dataset root (folder or, with --zip, ImageNet-Zip)")
    g.add_argument("--zip", action="store_true", help="read the ImageNet-Zip layout")
    g.add_argument("--cache-mode", type=str, default="no", choices=["no", "full"],
                   help="keep the encoded images in RAM")
    g.add_argument("--image-size", type=int, default=224, help="centre-crop size (resized to "
                   "size / --val-crop-fraction first)")
    g.add_argument("--val-crop-fraction", type=float, default=0.875, help="resize to image-size / fraction, "
                   "then centre-crop image-size; 1.0 keeps whole small images")
    g.add_argument("--batch-size", type=int, default=256, help="images per forward pass and process")
    g.add_argument("--num-workers", type=int, default=4, help="DataLoader workers per process")
    g = p.add_argument_group("backbone")
    g.add_argument("--arch", type=str, default=None, help="override the checkpoint's arch "
                   "(required with --random-init)")
    g.add_argument("--stem", type=str, default=None, choices=STEMS, help="override the checkpoint's stem "
                   "(default with --random-init: imagenet)")
    g.add_argument("--small-stem", action="store_const", dest="stem", const="small",
                   help="deprecated alias of --stem small")
    g.add_argument("--no-small-stem", action="store_const", dest="stem", const="imagenet",
                   help="deprecated alias of --stem imagenet")
    g = p.add_argument_group("kNN")
    g.add_argument("--knn-k", type=int, nargs="+", default=[200], help="neighbours; several values share "
                   "one feature extraction (InstDisc: 200)")
    g.add_argument("--knn-t", type=float, default=0.07, help="temperature T of the exp(s / T) weights")
    g.add_argument("--chunk-size", type=int, default=1024, help="queries per similarity block (memory bound)")
    g = p.add_argument_group("cached-feature linear evaluation")
    g.add_argument("--linear-cached", action="store_true", help="also train a linear classifier on cached features")
    g.add_argument("--linear-aug-copies", type=int, default=0, help="training features: 0 = one un-augmented "
                   "(val transform) copy, K > 0 = K copies under the NULL augmentation (crop + flip)")
    g.add_argument("--linear-crop", type=float, default=0.08, help="NULL augmentation: minimum crop scale")
    g.add_argument("--linear-epochs", type=int, default=100, help="epochs over the cached features")
    g.add_argument("--linear-lr", type=float, default=0.1, help="initial lr (cosine to 0); features are "
                   "standardised, so one value suits every method")
    g.add_argument("--linear-batch-size", type=int, default=256, help="batch size")
    g.add_argument("--linear-wd", type=float, default=0.0, help="weight decay")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:<i>")
    g.add_argument("--seed", type=int, default=0, help="random init, augmented copies and linear training")
    g.add_argument("--output", type=str, default="", help="write the results as JSON to this file")
    g.add_argument("--save-features", type=str, default="", help="also torch.save the features and labels "
                   "of both splits (dataset order) to this file")
    g.add_argument("--name", type=str, default="", help="run name recorded in the JSON (default: derived)")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=-1,
                   help="set by torch.distributed.launch; torchrun uses LOCAL_RANK")
    args = p.parse_args(argv)
    chosen = [bool(args.checkpoint), args.random_init, args.raw_pixels]
    if sum(chosen) != 1:
        p.error("give exactly one of --checkpoint PATH, --random-init, --raw-pixels")
    if args.random_init and not args.arch:
        p.error("--random-init needs --arch")
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint}: file does not exist")
    for name in ("image_size", "batch_size", "chunk_size", "linear_epochs", "linear_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.knn_k) < 1 or args.knn_t <= 0:
        p.error(f"--knn-k must be >= 1 and --knn-t > 0, got {args.knn_k} and {args.knn_t}")
    if args.num_workers < 0 or args.linear_aug_copies < 0:
        p.error("--num-workers and --linear-aug-copies must be >= 0")
    return args


def build_encoder(args: argparse.Namespace) -> tuple[nn.Module, dict]:
    """The feature extractor and what it is (``encoder`` description, checkpoint ``epoch``/``model``)."""
    if args.raw_pixels:
        return nn.Flatten(1), {"encoder": "raw pixels"}
    if args.random_init:
        torch.manual_seed(args.seed)
        stem = args.stem or "imagenet"
        backbone, _ = build_backbone(args.arch, stem=stem)
        return backbone, {"encoder": f"random-init {args.arch} {stem} stem (seed {args.seed})"}
    backbone, _, ckpt = load_pretrained_backbone(args.checkpoint, args.arch, args.stem)
    config = ckpt.get("config") or {}
    info = {"model": config.get("model"), "epoch": ckpt.get("epoch"), "loop_epochs": config.get("loop_epochs"),
            "arch": args.arch or config.get("arch")}
    if ckpt.get("step") is not None and config.get("batch_size"):
        info["images_seen"] = int(ckpt["step"]) * int(config["batch_size"]) * int(ckpt.get("world_size") or 1)
    info["encoder"] = f"{args.checkpoint} ({info['model']}, epoch {info['epoch']}, {info['arch']})"
    return backbone, info


def extract(encoder: nn.Module, data_dir: str, split: str, transform, args, device: torch.device):
    """``(features (N, D), labels (N,), num_classes)`` of one split, sharded over the ranks."""
    dataset = build_dataset(data_dir, split, args.zip, args.cache_mode, transform.cpu, 0, 1)
    loader = build_eval_loader(dataset, args.batch_size, args.num_workers)
    feats, labels = extract_features(encoder, loader, device, device_transform=transform.device)
    return feats, labels, dataset.num_classes


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    env = dist.init_distributed(args.device, args.local_rank)
    device = env.device
    encoder, info = build_encoder(args)
    what = info["encoder"]
    encoder.to(device)
    val_aug = build_augmentation("val", num_views=1, image_size=args.image_size,
                                 val_crop_fraction=args.val_crop_fraction)
    val_aug.device.to(device)

    start = time.time()
    train_feats, train_labels, num_classes = extract(encoder, args.data_dir, "train", val_aug, args, device)
    val_feats, val_labels, _ = extract(encoder, args.data_dir, "val", val_aug, args, device)
    extract_s = time.time() - start
    result: Dict = {"name": args.name or what, **info, "num_train": len(train_labels),
                    "num_val": len(val_labels), "feat_dim": int(train_feats.shape[1]), "world_size": env.world_size,
                    "extract_seconds": round(extract_s, 2), "knn_t": args.knn_t}
    if env.is_main and args.save_features:
        os.makedirs(os.path.dirname(os.path.abspath(args.save_features)), exist_ok=True)
        torch.save({"train_feats": train_feats.cpu(), "train_labels": train_labels.cpu(), "val_feats": val_feats.cpu(),
                    "val_labels": val_labels.cpu(), **info}, args.save_features)
    if env.is_main:
        print(f"[knn] {what}: {len(train_labels)} train / {len(val_labels)} val features of dim "
              f"{train_feats.shape[1]} in {extract_s:.1f}s on {env.world_size} process(es)", flush=True)
        knn = knn_evaluate(train_feats, train_labels, val_feats, val_labels, args.knn_k, args.knn_t,
                           num_classes, args.chunk_size)
        result["knn"] = {str(k): v for k, v in knn.items()}
        for k, acc in knn.items():
            print(f"[knn] k={k} T={args.knn_t}: top1 {acc['top1']:.2f}  top5 {acc['top5']:.2f}", flush=True)

    if args.linear_cached:
        if args.linear_aug_copies > 0:
            null_aug = build_augmentation("NULL", num_views=1, image_size=args.image_size, crop=args.linear_crop)
            null_aug.device.to(device)
            copies = []
            for c in range(args.linear_aug_copies):
                torch.manual_seed(args.seed + 1000 * (c + 1) + env.rank)
                copies.append(extract(encoder, args.data_dir, "train", null_aug, args, device)[0])
            linear_train = torch.stack(copies)
        else:
            linear_train = train_feats
        if env.is_main:
            start = time.time()
            _, acc = train_linear_cached(linear_train, train_labels, val_feats, val_labels, num_classes,
                                         epochs=args.linear_epochs, lr=args.linear_lr,
                                         batch_size=args.linear_batch_size, weight_decay=args.linear_wd,
                                         seed=args.seed)
            acc["seconds"] = round(time.time() - start, 2)
            acc["aug_copies"] = args.linear_aug_copies
            acc["epochs"] = args.linear_epochs
            result["linear"] = acc
            print(f"[linear-cached] {args.linear_epochs} epochs, {max(1, args.linear_aug_copies)} cop(y/ies): "
                  f"top1 {acc['top1']:.2f}  top5 {acc['top5']:.2f}  (train loss {acc['train_loss']:.4f}, "
                  f"{acc['seconds']:.1f}s)", flush=True)

    if env.is_main and args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    dist.cleanup()
    return result


if __name__ == "__main__":
    main()
