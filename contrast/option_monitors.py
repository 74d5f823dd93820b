"""The pretraining parser's flags of the training monitors and of the W&B logger (docs/monitoring.md)."""
from __future__ import annotations

import argparse


def add_monitor_flags(p: argparse.ArgumentParser) -> None:
    """``--online-probe``, ``--monitor-collapse`` and ``--wandb`` with their settings."""
    g = p.add_argument_group("training monitors (new; docs/monitoring.md)")
    g.add_argument("--online-probe", action=argparse.BooleanOptionalAction, default=None,
                   help="linear classifier on the detached backbone feature of the first view, trained every step "
                        "on the batch labels by its own SGD (pretraining unchanged); its accuracy on each batch "
                        "before its update on it is logged as probe/acc (default: on when the training set has "
                        ">= 2 classes)")
    g.add_argument("--online-probe-lr", type=float, default=0.1, help="the online probe's constant SGD lr "
                   "(momentum 0.9, no weight decay)")
    g.add_argument("--monitor-collapse", action=argparse.BooleanOptionalAction, default=True,
                   help="per-dimension std of the normalised embeddings, effective rank (RankMe), alignment and "
                        "uniformity of the embedding batch, logged as collapse/*; a warning when collapsed")
    g.add_argument("--monitor-collapse-freq", type=int, default=50, help="steps between collapse measurements")
    add_wandb_flags(g)


def add_wandb_flags(g) -> None:
    """``--wandb`` and ``--wandb-project`` (pretraining, linear evaluation and fine-tuning)."""
    g.add_argument("--wandb", action="store_true", help="also log the config and every TensorBoard scalar to "
                   "Weights & Biases (pip install 'contrast[wandb]'; WANDB_MODE=offline works)")
    g.add_argument("--wandb-project", type=str, default="contrast", help="W&B project of --wandb")
