"""kNN and cached-feature linear evaluation of a pretrained backbone (any method's checkpoint).

Weighted kNN as in InstDisc (Wu et al. 2018): cosine similarity of L2-normalised
backbone features, the ``k`` nearest training images vote with ``exp(s / T)``.
Features of both splits (``val`` transform) are extracted once, sharded over the
processes when launched with ``torchrun --nproc_per_node=N``; each process keeps
only its block, and the kNN runs sharded (``contrast.eval.knn.knn_neighbours``:
queries all-gathered in chunks, top-k candidates merged); several ``--knn-k``
values reuse one extraction. ``--linear-cached`` also trains a linear classifier on
cached features (:mod:`contrast.eval.linear_cached`; ``--label-fraction`` / ``--label-subset``: on a
subset of the training images, the kNN still uses them all): only then (or with
``--save-features``) are the features gathered, to rank 0's CPU, and the probe
is trained on rank 0's device.

Baselines without a checkpoint: ``--random-init`` (the ``--arch`` backbone at its
random initialisation, seeded by ``--seed``) and ``--raw-pixels`` (the
normalised ``val``-transformed image itself as the feature).

Examples::

    python main_knn.py --data-dir data/fmnist --zip --pretrained-model out/PIC/current.pth \\
        --knn-k 20 200 --linear-cached --output-dir out/PIC/knn
    python main_knn.py --data-dir data/fmnist --zip --raw-pixels --image-size 28
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from types import SimpleNamespace
from typing import Dict, List, Optional

import torch
from torch import nn

from contrast import distributed as cd
from contrast import engine
from contrast.data import build_dataset
from contrast.data.subsets import item_paths, label_subset, subset_names, write_subset_file
from contrast.data.transforms import build_augmentation
from contrast.eval.features import backbone_from_checkpoint, build_eval_loader, extract_features
from contrast.eval.knn import knn_evaluate, l2_normalize_
from contrast.eval.linear_cached import train_linear_cached
from contrast.config import BackboneConfig
from contrast.evalconfig import EncoderConfig, FeatureDataConfig, knn_groups_from_flags
from contrast.models import FeatureExtractor, make_backbone
from contrast.option import (add_backbone_flags, add_data_flags, add_knn_flags, add_output_json_flag,
                             add_pretrained_flag, add_runtime_flags, check_values, new_parser, resolve_from_config)
from contrast.option_backbone import add_eval_feature_flag
from contrast.option_eval import add_label_subset_flags, check_label_subset
from contrast.placement import place


def knn_parser() -> argparse.ArgumentParser:
    p = new_parser("main_knn.py", "kNN and cached-feature linear evaluation of a pretrained backbone (any method), "
                   "or of the raw-pixel / random-init baselines.")
    g = p.add_argument_group("what to evaluate (exactly one)")
    add_pretrained_flag(g, required=False)
    g.add_argument("--random-init", action="store_true", help="baseline: randomly initialised --arch backbone")
    g.add_argument("--raw-pixels", action="store_true", help="baseline: the normalised pixels as features")
    add_data_flags(p, train=False, image_size=None, cache_modes=("no", "full"), eval_batch=True)
    add_backbone_flags(p, from_checkpoint=True)
    p.add_argument("--patch-size", type=int, default=16, help="(new) --random-init ViT: patch side in pixels")
    add_eval_feature_flag(p, "--feature")
    add_knn_flags(p, monitor=False)
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
    add_label_subset_flags(p)
    add_runtime_flags(p, output_dir=None, checkpoints=False)
    g = p.add_argument_group("results")
    add_output_json_flag(g, "", "--output", note=" (default: <output-dir>/knn.json when --output-dir is given)")
    g.add_argument("--save-features", type=str, default="", help="also torch.save the features and labels "
                   "of both splits (dataset order) to this file")
    g.add_argument("--name", type=str, default="", help="run name recorded in the JSON (default: derived)")
    return p


def parse_knn_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = knn_parser()
    args = p.parse_args(argv)
    chosen = [bool(args.pretrained_model), args.random_init, args.raw_pixels]
    if sum(chosen) != 1:
        p.error("give exactly one of --pretrained-model PATH, --random-init, --raw-pixels")
    if args.random_init and not args.arch:
        p.error("--random-init needs --arch")
    if args.pretrained_model and not os.path.isfile(args.pretrained_model):
        p.error(f"--pretrained-model {args.pretrained_model}: file does not exist")
    check_values(p, args, ["image_size", "batch_size", "chunk_size", "linear_epochs", "linear_batch_size"])
    if min(args.knn_k) < 1 or args.knn_t <= 0:
        p.error(f"--knn-k must be >= 1 and --knn-t > 0, got {args.knn_k} and {args.knn_t}")
    if args.linear_aug_copies < 0:
        p.error("--linear-aug-copies must be >= 0")
    check_label_subset(p, args)
    if (args.label_fraction is not None or args.label_subset) and not args.linear_cached:
        p.error("--label-fraction / --label-subset choose the training images of --linear-cached")
    if not args.output_json and args.output_dir:
        args.output_json = os.path.join(args.output_dir, "knn.json")
    return args


def build_encoder(spec: EncoderConfig, seed: int, image_size: Optional[int]):
    """The feature extractor, what it is (``encoder`` description, checkpoint ``epoch``/``model``, the
    ``feature``) and the checkpoint's config (empty for the baselines)."""
    if spec.raw_pixels:
        return nn.Flatten(1), {"encoder": "raw pixels"}, {}
    if spec.random_init:
        torch.manual_seed(seed)
        stem = spec.stem or "imagenet"
        backbone = make_backbone(BackboneConfig(spec.arch, stem, zero_init_residual=False,   # the library's own init
                                                image_size=image_size or 224, patch_size=spec.patch_size))
        feature = spec.feature or backbone.eval_feature
        return FeatureExtractor(backbone, feature), {"encoder": f"random-init {spec.arch} {stem} stem (seed {seed})",
                                                     "feature": feature}, {}
    backbone, _, ckpt = backbone_from_checkpoint(spec.pretrained_model, spec.arch, spec.stem)
    info = {"model": ckpt.config.get("model"), "epoch": ckpt.epoch, "loop_epochs": ckpt.config.get("loop_epochs"),
            "arch": spec.arch or ckpt.config.get("arch")}
    if ckpt.images_seen is not None:
        info["images_seen"] = ckpt.images_seen
    info["encoder"] = f"{spec.pretrained_model} ({info['model']}, epoch {info['epoch']}, {info['arch']})"
    info["feature"] = spec.feature or backbone.eval_feature
    return FeatureExtractor(backbone, info["feature"]), info, ckpt.config


def resolve_image(data: FeatureDataConfig, config: dict) -> FeatureDataConfig:
    """``data`` with the image size and val crop of the checkpoint's ``config`` where not given."""
    values = SimpleNamespace(image_size=data.image_size, val_crop_fraction=data.val_crop_fraction)
    resolve_from_config(values, config, ("image_size", "val_crop_fraction"))
    return replace(data, **vars(values))


def datasets(data: FeatureDataConfig, transform) -> Dict[str, object]:
    """Both splits, built before any feature is extracted: a missing split stops at once, naming it."""
    return {split: build_dataset(data.data_dir, split, data.zip, data.cache_mode, transform.cpu, 0, 1,
                                 strict=data.strict_data, index_dir=data.index_dir)
            for split in ("train", "val")}


def extract(encoder: nn.Module, dataset, transform, data: FeatureDataConfig, device: torch.device, progress: str):
    """``(features, labels)`` of this rank's contiguous block of one split (nothing is gathered)."""
    loader = build_eval_loader(dataset, data.batch_size, data.num_workers)
    return extract_features(encoder, loader, device, device_transform=transform.device, progress=progress,
                            gather=False)


def main(argv: Optional[List[str]] = None) -> Dict:
    cfg = knn_groups_from_flags(vars(parse_knn_args(argv)))
    rt, knn, probe = cfg.runtime, cfg.knn, cfg.probe
    env = cd.init_distributed(rt.device, rt.local_rank)
    device = env.device
    encoder, info, config = build_encoder(cfg.encoder, rt.seed, cfg.data.image_size)
    data = resolve_image(cfg.data, config)
    what = info["encoder"]
    place(encoder, device)
    val_aug = build_augmentation("val", num_views=1, image_size=data.image_size,
                                 val_crop_fraction=data.val_crop_fraction)
    place(val_aug.device, device)

    splits = datasets(data, val_aug)
    num_classes = splits["train"].num_classes
    start = time.time()
    train_feats, train_labels = extract(encoder, splits["train"], val_aug, data, device, "train features")
    val_feats, val_labels = extract(encoder, splits["val"], val_aug, data, device, "val features")
    extract_s = time.time() - start
    num_train, num_val = len(splits["train"]), len(splits["val"])
    result: Dict = {"name": rt.name or what, **info, "num_train": num_train,
                    "num_val": num_val, "feat_dim": int(train_feats.shape[1]), "world_size": env.world_size,
                    "extract_seconds": round(extract_s, 2), "knn_t": knn.knn_t}
    # The whole sets exist only on rank 0's CPU, and only for the options that read them.
    full = {}
    if rt.save_features or probe.linear_cached:
        full = {name: cd.gather_rows_to_cpu(t) for name, t in (("train_feats", train_feats),
                ("train_labels", train_labels), ("val_feats", val_feats), ("val_labels", val_labels))}
    if env.is_main and rt.save_features:
        os.makedirs(os.path.dirname(os.path.abspath(rt.save_features)), exist_ok=True)
        torch.save({**full, **info}, rt.save_features)
    if env.is_main:
        print(f"[knn] {what}: {num_train} train / {num_val} val features of dim "
              f"{train_feats.shape[1]} in {extract_s:.1f}s on {env.world_size} process(es)", flush=True)
    accs = knn_evaluate(l2_normalize_(train_feats), train_labels, l2_normalize_(val_feats), val_labels,
                        list(knn.knn_k), knn.knn_t, num_classes, knn.chunk_size,
                        progress="kNN" if env.is_main else "", sharded=True, normalized=True)
    del train_feats, val_feats
    if env.is_main:
        result["knn"] = {str(k): v for k, v in accs.items()}
        for k, acc in accs.items():
            print(f"[knn] k={k} T={knn.knn_t}: top1 {acc['top1']:.2f}  top5 {acc['top5']:.2f}", flush=True)

    if probe.linear_cached:
        if probe.linear_aug_copies > 0:
            null_aug = build_augmentation("NULL", num_views=1, image_size=data.image_size, crop=probe.linear_crop)
            place(null_aug.device, device)
            null_train = build_dataset(data.data_dir, "train", data.zip, data.cache_mode, null_aug.cpu, 0, 1,
                                       strict=data.strict_data, index_dir=data.index_dir)
            copies = []
            for c in range(probe.linear_aug_copies):
                torch.manual_seed(rt.seed + 1000 * (c + 1) + env.rank)
                copies.append(cd.gather_rows_to_cpu(extract(encoder, null_train, null_aug, data, device,
                                                            f"augmented copy {c + 1}/{probe.linear_aug_copies}")[0]))
            linear_train = torch.stack(copies) if env.is_main else None
        else:
            linear_train = full["train_feats"]
        subset = label_subset(splits["train"], data.label_fraction, data.label_subset, rt.seed)
        if env.is_main:
            train_labels = full["train_labels"]
            if subset is not None:   # the same draw as main_linear.py's for the same seed
                rows = torch.from_numpy(subset)
                linear_train, train_labels = linear_train[..., rows, :], train_labels[rows]
                result["label_subset"] = {"images": len(subset), "fraction": data.label_fraction,
                                          "file": data.label_subset}
                if rt.output_dir:
                    write_subset_file(os.path.join(rt.output_dir, "label_subset.txt"),
                                      subset_names(item_paths(splits["train"]), subset))
            start = time.time()
            _, acc = train_linear_cached(linear_train.to(device), train_labels, full["val_feats"].to(device),
                                         full["val_labels"], num_classes,
                                         epochs=probe.linear_epochs, lr=probe.linear_lr,
                                         batch_size=probe.linear_batch_size, weight_decay=probe.linear_wd,
                                         seed=rt.seed, progress="linear-cached")
            acc["seconds"] = round(time.time() - start, 2)
            acc["aug_copies"] = probe.linear_aug_copies
            acc["epochs"] = probe.linear_epochs
            result["linear"] = acc
            print(f"[linear-cached] {probe.linear_epochs} epochs, {max(1, probe.linear_aug_copies)} cop(y/ies): "
                  f"top1 {acc['top1']:.2f}  top5 {acc['top5']:.2f}  (train loss {acc['train_loss']:.4f}, "
                  f"{acc['seconds']:.1f}s)", flush=True)

    if env.is_main and rt.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(rt.output_json)), exist_ok=True)
        with open(rt.output_json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"[knn] results: {rt.output_json}", flush=True)
    return result


if __name__ == "__main__":
    engine.run_cli(main)
