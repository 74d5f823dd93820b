"""Unsupervised pretraining with any registered method (PIC, InstDisc, MoCo v1/v2, SimCLR, ...).

    python main_pretrain.py --model PIC --data-dir DATA ...   # one process, the method's published recipe
    torchrun --nproc_per_node=4 main_pretrain.py ...                                    # DDP

See ``python main_pretrain.py --help``; the loop is ``Trainer.fit`` in ``contrast/trainer.py``.
"""
from __future__ import annotations

from typing import List, Optional

from contrast import engine
from contrast.data import build_dataset, build_sampler, window_epochs
from contrast.data.transforms import build_augmentation
from contrast.eval.knn import KNNMonitor
from contrast.models import build_method
from contrast.optim import build_optimizer, build_scheduler
from contrast.placement import configure_backends
from contrast.option import method_config, parse_pretrain_args
from contrast.precision import resolve_precision


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_pretrain_args(argv)
    run = engine.setup_run("pretrain", args.output_dir, args.device, args.local_rank, args.seed, args.tensorboard,
                           lock=True)
    try:
        pretrain(args, run)
    finally:
        run.close()


def pretrain(args, run: engine.Run) -> None:
    env, logger = run.env, run.logger
    logger.info(configure_backends(env.device, args.deterministic))
    cfg = method_config(args, env.world_size)

    aug = build_augmentation(args.aug, cfg.num_crop, args.image_size, args.crop, args.image_size2, args.crop2,
                             args.num_crop2, fast=not args.plain_aug)
    dataset = build_dataset(args.data_dir, "train", args.zip, args.cache_mode, aug.cpu, env.rank, env.world_size,
                            strict=args.strict_data, index_dir=args.index_dir)
    sampler = build_sampler(dataset, args.use_sliding_window_sampler, args.window_size, args.window_stride,
                            args.seed, args.shuffle_per_epoch, env.world_size, env.rank, drop_last=True)
    loader = engine.build_loader(dataset, sampler, args.batch_size, args.num_workers, env.device, train=True,
                                 seed=args.seed)
    iters = engine.check_iters(loader, args.batch_size, env.world_size)

    # Sliding window: plain epochs -> window-epochs visiting as many images (ceil(e * N / W)).
    to_loop = (lambda e: window_epochs(e, len(dataset), args.window_size)) if args.use_sliding_window_sampler \
        else (lambda e: e)
    epochs, warmup = to_loop(args.epochs), to_loop(args.warmup_epoch)
    decay = [to_loop(e) for e in args.lr_decay_epochs]

    method = build_method(cfg, len(dataset))
    method = engine.prepare_model(method, env.device, method.recipe.sync_batchnorm, args.channels_last,
                                  args.compile)
    total_batch = args.batch_size * env.world_size
    lr = cfg.peak_lr
    optimizer = build_optimizer(method.param_groups(lr, args.weight_decay), args.optimizer, lr, args.momentum,
                                args.weight_decay, args.lars_form,
                                args.lars_trust_coefficient, args.lars_eps)
    scheduler = build_scheduler(optimizer, args.lr_scheduler, epochs, iters, warmup, args.warmup_multiplier,
                                decay, args.lr_decay_rate, cosine_form=args.cosine_form, samples_per_step=total_batch)
    precision, precision_note = resolve_precision(args.amp_opt_level, env.device)
    logger.info(f"precision: {precision_note}")

    config = engine.write_config(run, vars(args), effective_lr=lr, num_instances=len(dataset), loop_epochs=epochs,
                                 iters_per_epoch=iters, warmup_loop_epochs=warmup, decay_loop_epochs=decay,
                                 total_batch=total_batch)

    checkpointer = engine.Checkpointer(run, method, optimizer, scheduler, precision.scaler, sampler, config, lr,
                                       total_batch, policy=engine.CheckpointPolicy(args.save_freq, args.keep_last,
                                                                                   args.save_every_minutes))
    trainer = engine.Trainer(engine.wrap_ddp(method, env), method, optimizer, scheduler, precision, run,
                             engine.LoopOptions(args.print_freq, args.max_nonfinite, args.channels_last, args.seed,
                                                args.on_divergence, args.rollback_lr_factor),
                             aug.device, checkpointer=checkpointer)
    logger.info(f"{args.model}: {len(dataset)} images, {epochs} loop epochs x {iters} iterations, "
                f"effective lr {lr:.4g} (total batch {total_batch})")
    monitor = None
    if args.knn_monitor:
        monitor = KNNMonitor.from_data_dir(args.data_dir, env.device, args.zip, args.cache_mode, args.image_size,
                                           args.val_crop_fraction, index_dir=args.index_dir, k=args.knn_k,
                                           temperature=args.knn_t, batch_size=args.batch_size,
                                           num_workers=args.num_workers)

    def after_epoch(epoch: int, stats) -> None:
        if monitor is None or (epoch % args.knn_freq and epoch != epochs):
            return
        monitor.best = dict(checkpointer.extra.get("knn_best", monitor.best))   # restored by a resume
        acc = monitor(method.backbone)   # collective: every rank extracts its share
        logger.info(f"knn epoch {epoch}: top-1 {acc['top1']:.2f} top-5 {acc['top5']:.2f} "
                    f"(best top-1 {monitor.best['top1']:.2f})")
        run.tb.scalars(acc, epoch, prefix="knn/")
        checkpointer.extra["knn_best"] = dict(monitor.best)

    trainer.fit(loader, epochs, engine.ResumeOptions(args.resume, args.auto_resume, args.restart,
                                                     args.allow_batch_change), args.start_epoch, after_epoch)
    run.tb.close()
    logger.info(f"done: checkpoint {run.output_dir}/current.pth, log {run.output_dir}/log.txt")


if __name__ == "__main__":
    engine.run_cli(main)
