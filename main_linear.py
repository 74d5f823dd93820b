"""Linear evaluation and fine-tuning of the pretrained backbone of any method.

    python main_linear.py --pretrained-model OUT/current.pth --data-dir DATA --output-dir OUT/eval
    python main_linear.py -e --resume OUT/eval/current.pth --data-dir DATA     # evaluate only
    python main_linear.py --finetune --label-fraction 0.01 --pretrained-model OUT/current.pth ...

Linear evaluation (the default): a linear classifier on the frozen backbone, which stays in eval
mode (BatchNorm statistics frozen) and is checked to be unchanged after training. ``--finetune``
trains the whole network, batch norm in train mode (SimCLR's semi-supervised fine-tuning protocol,
docs/evaluation.md). Both run the pretraining loop (``Trainer.fit``: mixed precision, torchrun,
resume, preemption, checkpoints). ``--label-fraction`` / ``--label-subset`` train on a subset of
the labels. Arch, stem, image size and the evaluation crop are those the checkpoint was pretrained
with unless given. The lr is ``--learning-rate x --total-batch-size / 256`` (``--lr-scaling``).
"""
from __future__ import annotations

import os
from dataclasses import asdict
from types import SimpleNamespace
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from contrast import distributed as cd
from contrast import engine
from contrast.checkpoint import FINETUNE, LINEAR, Checkpoint, choose_resume, list_state_differences, load_model_state, \
    read_checkpoint
from contrast.config_file import resolve_from_config
from contrast.data import build_dataset, build_sampler
from contrast.data.subsets import item_paths, label_subset, subset_names, write_subset_file
from contrast.data.transforms import build_augmentation
from contrast.eval.features import ShardSampler
from contrast.evalconfig import EvalDataConfig, EvalModelConfig, EvalRunConfig, dump_eval_config
from contrast.models import TrainModule, backbone_config_of, make_backbone
from contrast.models.recipe import peak_lr
from contrast.optim import build_optimizer, build_scheduler, layer_decay_groups
from contrast.option_eval import eval_config, parse_linear_args, resolve_protocol
from contrast.runconfig import flat_config
from contrast.placement import configure_backends, place
from contrast.precision import Precision, resolve_precision
from contrast.wandb_logger import WandbSink

SUBSET_FILE = "label_subset.txt"


class LinearClassifier(TrainModule):
    """Backbone + ``fc``: Linear(feat_dim, num_classes), N(0, 0.01) init. ``feature`` is the backbone
    feature classified (``--linear-feature``; None: the backbone's ``eval_feature``).

    Linear evaluation (``finetune=False``): the backbone is frozen (eval mode, no grad), so under DDP
    only ``fc`` has gradients to reduce. Fine-tuning: the whole network trains, batch norm in train mode.
    ``forward(views, label)`` takes a one-view list of (B, 3, H, W) images and (B,) labels and
    returns ``{"loss", "acc1"}`` (fp32 cross-entropy, ``label_smoothing`` as ``F.cross_entropy``'s).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, feature: Optional[str] = None,
                 finetune: bool = False, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.finetune, self.label_smoothing = finetune, label_smoothing
        self.backbone = backbone.requires_grad_(finetune)
        self.feature = backbone.check_feature(feature or backbone.eval_feature)
        self.fc = nn.Linear(backbone.feature_dim(self.feature), num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def target(self, index: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return label

    def train(self, mode: bool = True) -> "LinearClassifier":
        super().train(mode)
        if not self.finetune:
            self.backbone.eval()
        return self

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()):
            feats = self.backbone.features(x, self.feature)
        return self.fc(feats).float()

    def forward(self, views: List[torch.Tensor], label: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = self.logits(views[0])
        return {"loss": F.cross_entropy(logits, label, label_smoothing=self.label_smoothing),
                "acc1": (logits.argmax(1) == label).float().mean() * 100}

    def layer_id(self, name: str) -> int:
        """Layer of parameter ``name`` for layer-wise lr decay: the backbone's, ``fc`` on top."""
        prefix = "backbone."
        return self.backbone.layer_id(name[len(prefix):]) if name.startswith(prefix) else self.backbone.num_layers + 1

    def finetune_groups(self, lr: float, layer_decay: float) -> Tuple[List[dict], Set[nn.Parameter]]:
        """Optimiser groups of fine-tuning (lr ``lr`` x the layer's scale, :func:`layer_decay_groups`) and
        the parameters AdamW leaves undecayed: the backbone's ``no_weight_decay()`` and ``fc.bias``."""
        groups = layer_decay_groups(self.named_parameters(), self.layer_id, self.backbone.num_layers, layer_decay)
        skip = self.backbone.no_weight_decay()
        no_decay = {p for n, p in self.backbone.named_parameters() if n in skip} | {self.fc.bias}
        return [{"params": g["params"], "lr": lr * g["lr_scale"]} for g in groups], no_decay


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
    cfg = eval_config(parse_linear_args(argv))
    rt = cfg.runtime
    run = engine.setup_run(cfg.model.mode, rt.output_dir, rt.device, rt.local_rank, rt.seed, rt.tensorboard,
                           lock=not cfg.model.eval)
    try:
        return linear(cfg, run)
    finally:
        run.close()


def linear(cfg: EvalRunConfig, run: engine.Run) -> Dict[str, float]:
    """Train (linear probe or fine-tuning) and evaluate on the val split, or with ``-e`` only evaluate."""
    env, logger = run.env, run.logger
    rt, loop, optim = cfg.runtime, cfg.loop, cfg.optim
    logger.info(configure_backends(env.device, rt.deterministic))
    total_batch = cfg.data.total_batch_size
    if total_batch % env.world_size:
        raise ValueError(f"--total-batch-size {total_batch} is not divisible by {env.world_size} processes")
    batch = total_batch // env.world_size

    source = evaluated_checkpoint(cfg.model, loop, run.output_dir)
    cfg, taken = resolve_backbone(cfg, source)
    data, spec, loop, optim = cfg.data, cfg.model, cfg.loop, cfg.optim
    logger.info(f"backbone {spec.arch} ({spec.stem} stem), image size {data.image_size}, val crop fraction "
                f"{data.val_crop_fraction}" + (f"; from {source.path}: {', '.join(taken)}" if taken else ""))

    train_aug = build_augmentation(data.aug, 1, data.image_size, data.crop, fast=not data.plain_aug)
    val_aug = build_augmentation("val", 1, data.image_size, fast=not data.plain_aug,
                                 val_crop_fraction=data.val_crop_fraction)
    val_cache = "no" if data.cache_mode == "part" else data.cache_mode
    val_set = build_dataset(data.data_dir, "val", data.zip, val_cache, val_aug.cpu, env.rank, env.world_size,
                            strict=data.strict_data, index_dir=data.index_dir)
    val_loader = engine.build_loader(val_set, ShardSampler(len(val_set), env.rank, env.world_size), batch,
                                     data.num_workers, env.device, train=False, seed=rt.seed)
    backbone_cfg = backbone_config_of(flat_config(source.config) if source is not None else {}, arch=spec.arch,
                                      stem=spec.stem, image_size=data.image_size,
                                      zero_init_residual=False if spec.random_init else None,
                                      drop_path=spec.drop_path)
    model = LinearClassifier(new_backbone(backbone_cfg, rt.seed), val_set.num_classes, spec.linear_feature,
                             finetune=spec.finetune, label_smoothing=optim.label_smoothing)
    logger.info(f"{spec.mode} on the backbone feature {model.feature!r} ({model.fc.in_features} dims)")
    precision, precision_note = resolve_precision(optim.amp_opt_level, env.device,
                                                  prefer_bf16=model.backbone.prefers_bf16)
    logger.info(f"precision: {precision_note}")

    if spec.eval:
        load_model_state(model, source.model, source.path, source.config)
        model = engine.prepare_model(model, env.device, channels_last=rt.channels_last)
        result = evaluate(model, val_loader, val_aug.device, run, precision, rt.channels_last)
        logger.info(f"eval {source.path}: top-1 {result['acc1']:.2f} top-5 {result['acc5']:.2f}")
        return result

    if source is not None:
        load_model_state(model.backbone, source.backbone_state(), source.path, source.config)
        logger.info(f"loaded {len(source.backbone_state())} backbone tensors from {source.path}")
    model = engine.prepare_model(model, env.device, sync_batchnorm=spec.finetune and spec.sync_bn,
                                 channels_last=rt.channels_last, compile_backbone=rt.compile)
    frozen = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}

    train_set = build_dataset(data.data_dir, "train", data.zip, data.cache_mode, train_aug.cpu, env.rank,
                              env.world_size, strict=data.strict_data, index_dir=data.index_dir)
    subset = training_subset(train_set, data, rt.seed, run)
    sampler = build_sampler(train_set, False, 0, 0, rt.seed, False, env.world_size, env.rank, drop_last=True,
                            subset=subset)
    loader = engine.build_loader(train_set, sampler, batch, data.num_workers, env.device, train=True, seed=rt.seed)
    iters = engine.check_iters(loader, batch, env.world_size, flag="--total-batch-size / world size")
    lr = peak_lr(optim.learning_rate, total_batch, optim.lr_scaling)
    params, no_decay = model.finetune_groups(lr, optim.layer_decay) if spec.finetune else (model.fc, set())
    optimizer = build_optimizer(params, optim.optimizer, lr, optim.momentum, optim.weight_decay,
                                nesterov=optim.nesterov, no_decay=no_decay)
    scheduler = build_scheduler(optimizer, optim.lr_scheduler, loop.epochs, iters, optim.warmup_epoch,
                                optim.warmup_multiplier, optim.lr_decay_epochs, optim.lr_decay_rate,
                                cosine_form=optim.cosine_form, samples_per_step=total_batch)

    config = engine.write_config(run, dump_eval_config(cfg), effective_lr=lr, per_process_batch=batch,
                                 backbone_tensors=len(frozen), total_batch=total_batch,
                                 train_images=len(train_set) if subset is None else len(subset),
                                 **{k: v for k, v in asdict(backbone_cfg).items() if k not in ("arch", "stem")})
    if rt.wandb and env.is_main:
        run.tb.add_sink(WandbSink.start(rt.wandb_project, os.path.basename(os.path.abspath(rt.output_dir)), config,
                                        rt.output_dir))
    checkpointer = engine.Checkpointer(run, model, optimizer, scheduler, precision.scaler, sampler, config, lr,
                                       total_batch, kind=FINETUNE if spec.finetune else LINEAR,
                                       policy=engine.CheckpointPolicy(loop.save_freq, loop.keep_last,
                                                                      loop.save_every_minutes),
                                       extra={"best": {"acc1": 0.0, "acc5": 0.0, "epoch": 0}})
    trainer = engine.Trainer(engine.wrap_ddp(model, env), model, optimizer, scheduler, precision, run,
                             engine.LoopOptions(loop.print_freq, loop.max_nonfinite, rt.channels_last, rt.seed,
                                                loop.on_divergence, loop.rollback_lr_factor),
                             train_aug.device, checkpointer=checkpointer)
    last: Dict[str, float] = {}

    def after_epoch(epoch: int, stats) -> None:
        result = evaluate(model, val_loader, val_aug.device, run, precision, rt.channels_last)
        best = checkpointer.extra["best"]
        if result["acc1"] >= best["acc1"]:
            best = checkpointer.extra["best"] = {**result, "epoch": epoch}
        logger.info(f"val epoch {epoch}: top-1 {result['acc1']:.2f} top-5 {result['acc5']:.2f} "
                    f"(best top-1 {best['acc1']:.2f} at epoch {best['epoch']})")
        run.tb.scalars(result, epoch, prefix="val/")
        last.update(result)

    trainer.fit(loader, loop.epochs, engine.ResumeOptions(loop.resume, loop.auto_resume, loop.restart,
                                                          loop.allow_batch_change), loop.start_epoch, after_epoch)
    best = checkpointer.extra["best"]
    result = last or best

    changed = list_state_differences(frozen, model.backbone.state_dict())
    if changed and not spec.finetune:
        raise RuntimeError(f"the frozen backbone changed during linear training: {changed[:5]}")
    run.tb.close()
    logger.info(f"{spec.mode} evaluation done: last top-1 {result['acc1']:.2f} top-5 {result['acc5']:.2f}, best "
                f"top-1 {best['acc1']:.2f} (epoch {best['epoch']}); checkpoint {run.output_dir}/current.pth")
    return {"last_acc1": result["acc1"], "last_acc5": result["acc5"], "best_acc1": best["acc1"],
            "best_acc5": best["acc5"]}


def evaluated_checkpoint(spec: EvalModelConfig, loop, output_dir: str) -> Optional[Checkpoint]:
    """The checkpoint whose backbone is evaluated (-e: the linear run's own); None with --random-init."""
    if spec.eval:
        evaluated = loop.resume or choose_resume(output_dir, auto_resume=True).checkpoint
        if evaluated is None:
            raise FileNotFoundError(f"-e: no linear checkpoint in {output_dir} (current.pth)")
        return read_checkpoint(evaluated) if isinstance(evaluated, str) else evaluated
    return None if spec.random_init else read_checkpoint(spec.pretrained_model)


def resolve_backbone(cfg: EvalRunConfig, source: Optional[Checkpoint]):
    """``cfg`` with arch, stem, image size and val crop taken from ``source``'s config where not given
    (defaults without a checkpoint), the protocol flags not given from the defaults of the protocol and
    backbone family (:func:`~contrast.option_eval.resolve_protocol`), and the names taken."""
    values = SimpleNamespace(arch=cfg.model.arch, stem=cfg.model.stem, image_size=cfg.data.image_size,
                             val_crop_fraction=cfg.data.val_crop_fraction)
    taken = resolve_from_config(values, source.config if source is not None else {})
    return resolve_protocol(cfg.with_backbone(**vars(values))), taken


def new_backbone(cfg, seed: int):
    """The backbone of ``cfg``, its initialisation drawn from ``seed`` (the same on every rank; the
    global generators are left as they were)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make_backbone(cfg)


def training_subset(train_set, data: EvalDataConfig, seed: int, run: engine.Run):
    """The indices of --label-fraction / --label-subset (None: all images); rank 0 writes their
    names to <output-dir>/label_subset.txt."""
    subset = label_subset(train_set, data.label_fraction, data.label_subset, seed)
    if subset is None:
        return None
    path = os.path.join(run.output_dir, SUBSET_FILE)
    if run.env.is_main:
        write_subset_file(path, subset_names(item_paths(train_set), subset))
    run.logger.info(f"label subset: {len(subset)} of {len(train_set)} training images "
                    f"({data.label_subset or f'fraction {data.label_fraction}, seed {seed}'}), listed in {path}")
    return subset


if __name__ == "__main__":
    engine.run_cli(main)
