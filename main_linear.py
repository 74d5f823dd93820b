"""Linear evaluation: a linear classifier on the frozen pretrained backbone of any method.

    python main_linear.py --pretrained-model OUT/current.pth --data-dir DATA --output-dir OUT/eval
    python main_linear.py -e --resume OUT/eval/current.pth --data-dir DATA     # evaluate only

Arch, stem, image size and the evaluation crop are those the checkpoint was pretrained with unless
given. The backbone stays in eval mode (BatchNorm statistics frozen) and is checked to be unchanged
after training. The lr is ``--learning-rate x --total-batch-size / 256``.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from contrast import distributed as cd
from contrast import engine
from contrast.checkpoint import LINEAR, choose_resume, list_state_differences, load_model_state, read_checkpoint
from contrast.data import build_dataset, build_sampler
from contrast.data.transforms import build_augmentation
from contrast.eval.features import ShardSampler
from contrast.models import TrainModule, backbone_config_of, make_backbone
from contrast.optim import build_scheduler
from contrast.placement import configure_backends, place
from contrast.precision import Precision, resolve_precision
from contrast.option import parse_linear_args, resolve_from_config


class LinearClassifier(TrainModule):
    """Frozen backbone (eval mode, no grad) + ``fc``: Linear(feat_dim, num_classes), N(0, 0.01) init.
    ``feature`` is the backbone feature classified (``--linear-feature``; None: the backbone's ``eval_feature``).

    ``forward(views, label)`` takes a one-view list of (B, 3, H, W) images and (B,) labels and
    returns ``{"loss", "acc1"}`` (fp32 cross-entropy). Under DDP only ``fc`` has gradients to reduce.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, feature: Optional[str] = None) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.feature = backbone.check_feature(feature or backbone.eval_feature)
        self.fc = nn.Linear(backbone.feature_dim(self.feature), num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def target(self, index: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return label

    def train(self, mode: bool = True) -> "LinearClassifier":
        super().train(mode)
        self.backbone.eval()
        return self

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.backbone.features(x, self.feature)
        return self.fc(feats).float()

    def forward(self, views: List[torch.Tensor], label: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = self.logits(views[0])
        return {"loss": F.cross_entropy(logits, label),
                "acc1": (logits.argmax(1) == label).float().mean() * 100}


@torch.no_grad()
def evaluate(model: LinearClassifier, loader, device_aug: nn.Module, run: engine.Run,
             precision: Precision, channels_last: bool) -> Dict[str, float]:
    """Top-1 / top-5 (%) and mean loss over the whole val split (summed over ranks)."""
    model.eval()
    device = run.env.device
    device_aug = place(device_aug, device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss sum, count
    for views, _, label in loader:
        x = device_aug([views[0].to(device, non_blocking=True)])[0]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        label = label.to(device, non_blocking=True)
        with precision.autocast(device):
            logits = model.logits(x)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == label[:, None]
        sums[:3] += torch.stack([hit[:, 0].sum(), hit.any(1).sum(),
                                 F.cross_entropy(logits, label, reduction="sum")]).double()
        sums[3] += len(label)
    cd.all_reduce_sum(sums)
    correct1, correct5, loss, n = sums.tolist()
    n = max(n, 1)
    return {"acc1": 100 * correct1 / n, "acc5": 100 * correct5 / n, "loss": loss / n}


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    args = parse_linear_args(argv)
    run = engine.setup_run("linear", args.output_dir, args.device, args.local_rank, args.seed, args.tensorboard,
                           lock=not args.eval)
    try:
        return linear(args, run)
    finally:
        run.close()


def linear(args, run: engine.Run) -> Dict[str, float]:
    env, logger = run.env, run.logger
    logger.info(configure_backends(env.device, args.deterministic))
    if args.total_batch_size % env.world_size:
        raise ValueError(f"--total-batch-size {args.total_batch_size} is not divisible by {env.world_size} processes")
    batch = args.total_batch_size // env.world_size

    if args.eval:
        evaluated = args.resume or choose_resume(args.output_dir, auto_resume=True).checkpoint
        if evaluated is None:
            raise FileNotFoundError(f"-e: no linear checkpoint in {args.output_dir} (current.pth)")
        source = read_checkpoint(evaluated) if isinstance(evaluated, str) else evaluated
    else:
        source = read_checkpoint(args.pretrained_model)
    taken = resolve_from_config(args, source.config)
    logger.info(f"backbone {args.arch} ({args.stem} stem), image size {args.image_size}, val crop fraction "
                f"{args.val_crop_fraction}" + (f"; from {source.path}: {', '.join(taken)}" if taken else ""))

    train_aug = build_augmentation(args.aug, 1, args.image_size, args.crop, fast=not args.plain_aug)
    val_aug = build_augmentation("val", 1, args.image_size, fast=not args.plain_aug,
                                 val_crop_fraction=args.val_crop_fraction)
    val_cache = "no" if args.cache_mode == "part" else args.cache_mode
    val_set = build_dataset(args.data_dir, "val", args.zip, val_cache, val_aug.cpu, env.rank, env.world_size,
                            strict=args.strict_data, index_dir=args.index_dir)
    val_loader = engine.build_loader(val_set, ShardSampler(len(val_set), env.rank, env.world_size), batch,
                                     args.num_workers, env.device, train=False, seed=args.seed)
    backbone_cfg = backbone_config_of(source.config, arch=args.arch, stem=args.stem, image_size=args.image_size)
    vars(args).update(vars(backbone_cfg))   # config.json records the whole backbone (-e rebuilds it)
    backbone = make_backbone(backbone_cfg)
    model = LinearClassifier(backbone, val_set.num_classes, args.linear_feature)
    logger.info(f"linear evaluation of the backbone feature {model.feature!r} ({model.fc.in_features} dims)")
    precision, precision_note = resolve_precision(args.amp_opt_level, env.device,
                                                  prefer_bf16=backbone.prefers_bf16)
    logger.info(f"precision: {precision_note}")

    if args.eval:
        load_model_state(model, source.model, source.path, source.config)
        model = engine.prepare_model(model, env.device, channels_last=args.channels_last)
        result = evaluate(model, val_loader, val_aug.device, run, precision, args.channels_last)
        logger.info(f"eval {source.path}: top-1 {result['acc1']:.2f} top-5 {result['acc5']:.2f}")
        return result

    load_model_state(model.backbone, source.backbone_state(), source.path, source.config)
    logger.info(f"loaded {len(source.backbone_state())} backbone tensors from {source.path}")
    model = engine.prepare_model(model, env.device, channels_last=args.channels_last)
    frozen = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}

    train_set = build_dataset(args.data_dir, "train", args.zip, args.cache_mode, train_aug.cpu, env.rank,
                              env.world_size, strict=args.strict_data, index_dir=args.index_dir)
    sampler = build_sampler(train_set, False, 0, 0, args.seed, False, env.world_size, env.rank, drop_last=True)
    loader = engine.build_loader(train_set, sampler, batch, args.num_workers, env.device, train=True, seed=args.seed)
    iters = engine.check_iters(loader, batch, env.world_size, flag="--total-batch-size / world size")
    lr = args.learning_rate * args.total_batch_size / 256
    optimizer = torch.optim.SGD(model.fc.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = build_scheduler(optimizer, args.lr_scheduler, args.epochs, iters, args.warmup_epoch,
                                args.warmup_multiplier, args.lr_decay_epochs, args.lr_decay_rate,
                                cosine_form=args.cosine_form, samples_per_step=args.total_batch_size)

    config = engine.write_config(run, vars(args), effective_lr=lr, per_process_batch=batch,
                                 backbone_tensors=len(frozen), total_batch=args.total_batch_size)
    checkpointer = engine.Checkpointer(run, model, optimizer, scheduler, precision.scaler, sampler, config, lr,
                                       args.total_batch_size, kind=LINEAR,
                                       policy=engine.CheckpointPolicy(args.save_freq, args.keep_last,
                                                                      args.save_every_minutes),
                                       extra={"best": {"acc1": 0.0, "acc5": 0.0, "epoch": 0}})
    trainer = engine.Trainer(engine.wrap_ddp(model, env), model, optimizer, scheduler, precision, run,
                             engine.LoopOptions(args.print_freq, args.max_nonfinite, args.channels_last, args.seed,
                                                args.on_divergence, args.rollback_lr_factor),
                             train_aug.device, checkpointer=checkpointer)
    last: Dict[str, float] = {}

    def after_epoch(epoch: int, stats) -> None:
        result = evaluate(model, val_loader, val_aug.device, run, precision, args.channels_last)
        best = checkpointer.extra["best"]
        if result["acc1"] >= best["acc1"]:
            best = checkpointer.extra["best"] = {**result, "epoch": epoch}
        logger.info(f"val epoch {epoch}: top-1 {result['acc1']:.2f} top-5 {result['acc5']:.2f} "
                    f"(best top-1 {best['acc1']:.2f} at epoch {best['epoch']})")
        run.tb.scalars(result, epoch, prefix="val/")
        last.update(result)

    trainer.fit(loader, args.epochs, engine.ResumeOptions(args.resume, args.auto_resume, args.restart,
                                                          args.allow_batch_change), args.start_epoch, after_epoch)
    best = checkpointer.extra["best"]
    result = last or best

    changed = list_state_differences(frozen, model.backbone.state_dict())
    if changed:
        raise RuntimeError(f"the frozen backbone changed during linear training: {changed[:5]}")
    run.tb.close()
    logger.info(f"linear evaluation done: last top-1 {result['acc1']:.2f} top-5 {result['acc5']:.2f}, best top-1 "
                f"{best['acc1']:.2f} (epoch {best['epoch']}); checkpoint {run.output_dir}/current.pth")
    return {"last_acc1": result["acc1"], "last_acc5": result["acc5"], "best_acc1": best["acc1"],
            "best_acc5": best["acc5"]}


if __name__ == "__main__":
    engine.run_cli(main)
