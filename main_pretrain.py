"""Unsupervised pretraining with any registered method (PIC, InstDisc, MoCo v1/v2, SimCLR, ...).

    python main_pretrain.py --model PIC --data-dir DATA ...   # one process, the method's published recipe
    torchrun --nproc_per_node=4 main_pretrain.py ...                                    # DDP

See ``python main_pretrain.py --help``; the loop is ``Trainer.fit`` in ``contrast/trainer.py``.
"""
from __future__ import annotations

import os
from typing import List, Optional

from contrast import engine
from contrast.data import build_dataset, build_sampler, window_epochs
from contrast.data.transforms import build_augmentation
from contrast.eval.knn import KNNMonitor
from contrast.models import build_method
from contrast.optim import build_optimizer, build_scheduler
from contrast.placement import configure_backends
from contrast.models.recipe import peak_lr
from contrast.monitors import MonitorOptions, Monitors
from contrast.option import parse_pretrain_args, run_config
from contrast.precision import resolve_precision
from contrast.runconfig import RunConfig, dump_run_config
from contrast.wandb_logger import WandbSink


def main(argv: Optional[List[str]] = None) -> None:
    cfg = run_config(parse_pretrain_args(argv))
    rt = cfg.runtime
    run = engine.setup_run("pretrain", rt.output_dir, rt.device, rt.local_rank, rt.seed, rt.tensorboard, lock=True)
    try:
        pretrain(cfg, run)
    finally:
        run.close()


def pretrain(cfg: RunConfig, run: engine.Run) -> None:
    env, logger = run.env, run.logger
    data, optim, loop, rt = cfg.data, cfg.optim, cfg.loop, cfg.runtime
    logger.info(configure_backends(env.device, rt.deterministic))
    total_batch = data.batch_size * env.world_size
    lr = peak_lr(optim.base_learning_rate, total_batch, optim.lr_scaling)
    cfg = cfg.for_world_size(env.world_size, lr)

    aug = build_augmentation(data.aug, cfg.method.num_crop, data.image_size, data.crop, data.image_size2, data.crop2,
                             data.num_crop2, fast=not data.plain_aug)
    dataset = build_dataset(data.data_dir, "train", data.zip, data.cache_mode, aug.cpu, env.rank, env.world_size,
                            strict=data.strict_data, index_dir=data.index_dir)
    sampler = build_sampler(dataset, data.use_sliding_window_sampler, data.window_size, data.window_stride,
                            rt.seed, data.shuffle_per_epoch, env.world_size, env.rank, drop_last=True)
    loader = engine.build_loader(dataset, sampler, data.batch_size, data.num_workers, env.device, train=True,
                                 seed=rt.seed)
    iters = engine.check_iters(loader, data.batch_size, env.world_size)

    # Sliding window: plain epochs -> window-epochs visiting as many images (ceil(e * N / W)).
    to_loop = (lambda e: window_epochs(e, len(dataset), data.window_size)) if data.use_sliding_window_sampler \
        else (lambda e: e)
    epochs, warmup = to_loop(loop.epochs), to_loop(optim.warmup_epoch)
    decay = [to_loop(e) for e in optim.lr_decay_epochs]

    method = build_method(cfg.method, len(dataset))
    method = engine.prepare_model(method, env.device, method.recipe.sync_batchnorm, rt.channels_last, rt.compile)
    optimizer = build_optimizer(method.param_groups(lr, optim.weight_decay), optim.optimizer, lr, optim.momentum,
                                optim.weight_decay, optim.lars_form, optim.lars_trust_coefficient, optim.lars_eps,
                                no_decay=method.no_weight_decay_params())
    scheduler = build_scheduler(optimizer, optim.lr_scheduler, epochs, iters, warmup, optim.warmup_multiplier,
                                decay, optim.lr_decay_rate, cosine_form=optim.cosine_form, samples_per_step=total_batch,
                                weight_decay_end=optim.weight_decay_end)
    precision, precision_note = resolve_precision(optim.amp_opt_level, env.device,
                                                  prefer_bf16=method.backbone.prefers_bf16)
    logger.info(f"precision: {precision_note}")

    config = engine.write_config(run, dump_run_config(cfg), effective_lr=lr, num_instances=len(dataset),
                                 loop_epochs=epochs, iters_per_epoch=iters, warmup_loop_epochs=warmup,
                                 decay_loop_epochs=decay, total_batch=total_batch)

    if rt.wandb and env.is_main:
        run.tb.add_sink(WandbSink.start(rt.wandb_project, os.path.basename(os.path.abspath(rt.output_dir)), config,
                                        rt.output_dir))
    ev = cfg.eval
    probe = ev.online_probe if ev.online_probe is not None else dataset.num_classes >= 2
    monitors = Monitors(method, MonitorOptions(probe, dataset.num_classes, ev.online_probe_lr, ev.monitor_collapse,
                                               ev.monitor_collapse_freq))
    logger.info(f"monitors: online probe {'on' if probe else 'off'} ({dataset.num_classes} classes), collapse "
                f"{'every ' + str(ev.monitor_collapse_freq) + ' steps' if ev.monitor_collapse else 'off'}")
    checkpointer = engine.Checkpointer(run, method, optimizer, scheduler, precision.scaler, sampler, config, lr,
                                       total_batch, policy=engine.CheckpointPolicy(loop.save_freq, loop.keep_last,
                                                                                   loop.save_every_minutes))
    trainer = engine.Trainer(engine.wrap_ddp(method, env), method, optimizer, scheduler, precision, run,
                             engine.LoopOptions(loop.print_freq, loop.max_nonfinite, rt.channels_last, rt.seed,
                                                loop.on_divergence, loop.rollback_lr_factor, optim.clip_grad),
                             aug.device, checkpointer=checkpointer, monitors=monitors)
    logger.info(f"{cfg.model}: {len(dataset)} images, {epochs} loop epochs x {iters} iterations, "
                f"effective lr {lr:.4g} (total batch {total_batch})")
    monitor, knn = None, cfg.eval
    if knn.knn_monitor:
        monitor = KNNMonitor.from_data_dir(data.data_dir, env.device, data.zip, data.cache_mode, data.image_size,
                                           data.val_crop_fraction, index_dir=data.index_dir, k=knn.knn_k,
                                           temperature=knn.knn_t, batch_size=data.batch_size,
                                           num_workers=data.num_workers)

    def after_epoch(epoch: int, stats) -> None:
        if monitor is None or (epoch % knn.knn_freq and epoch != epochs):
            return
        monitor.best = dict(checkpointer.extra.get("knn_best", monitor.best))   # restored by a resume
        acc = monitor(method.backbone)   # collective: every rank extracts its share
        logger.info(f"knn epoch {epoch}: top-1 {acc['top1']:.2f} top-5 {acc['top5']:.2f} "
                    f"(best top-1 {monitor.best['top1']:.2f})")
        run.tb.scalars(acc, epoch, prefix="knn/")
        checkpointer.extra["knn_best"] = dict(monitor.best)

    trainer.fit(loader, epochs, engine.ResumeOptions(loop.resume, loop.auto_resume, loop.restart,
                                                     loop.allow_batch_change), loop.start_epoch, after_epoch)
    run.tb.close()
    logger.info(f"done: checkpoint {run.output_dir}/current.pth, log {run.output_dir}/log.txt")


if __name__ == "__main__":
    engine.run_cli(main)
