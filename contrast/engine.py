"""The names the entry scripts, tools, benchmarks and tests use, from the modules that define them.

:mod:`contrast.runtime` (run setup, stop signals, exit codes, :func:`run_cli`),
:mod:`contrast.checkpointer` (checkpoint policy, resume), :mod:`contrast.build` (loader, model
placement, DDP) and :mod:`contrast.trainer` (the loop, :meth:`Trainer.fit`).
"""
from __future__ import annotations

from contrast.build import build_loader, check_iters, prepare_model, wrap_ddp
from contrast.checkpointer import (CheckpointPolicy, Checkpointer, ResumeOptions, check_total_batch,
                                   resume_checkpoint, write_config)
from contrast.runtime import (EXIT_PREEMPTED, EXIT_SAVE_FAILED, LAUNCHER_ENV, LOST_CONTACT, USER_ERRORS,
                              NonFiniteLossError, Preempted, Run, SavesFailing, StopSignals, run_cli, setup_run)
from contrast.seeding import mix_seed, seed_everything
from contrast.trainer import LoopOptions, Trainer, TrainState

__all__ = ["build_loader", "check_iters", "prepare_model", "wrap_ddp", "CheckpointPolicy", "Checkpointer",
           "ResumeOptions", "check_total_batch", "resume_checkpoint", "write_config", "EXIT_PREEMPTED",
           "EXIT_SAVE_FAILED", "LAUNCHER_ENV", "LOST_CONTACT", "USER_ERRORS", "NonFiniteLossError", "Preempted",
           "Run", "SavesFailing", "StopSignals", "run_cli", "setup_run", "mix_seed", "seed_everything",
           "LoopOptions", "Trainer", "TrainState"]
