"""Logging: coloured console on rank 0, one log file per rank, meters, TensorBoard.

Files in ``--output-dir``: ``log.txt`` (rank 0) and ``log_rank<r>.txt`` for ranks r > 0, so a
rank-specific warning (a corrupt image, a non-finite loss) is never lost; TensorBoard event files
(rank 0, ``--tensorboard``).
"""
from __future__ import annotations

import logging
import os
import resource
import sys
from typing import Dict, Optional

import torch
from termcolor import colored


class _ColorFormatter(logging.Formatter):
    COLORS = {logging.WARNING: "yellow", logging.ERROR: "red", logging.CRITICAL: "red"}

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = colored(f"[{self.formatTime(record, '%m-%d %H:%M:%S')} {record.name}]", "green")
        color = self.COLORS.get(record.levelno)
        return f"{prefix} {colored(text, color) if color else text}"


def setup_logger(output_dir: str, rank: int, name: str = "contrast") -> logging.Logger:
    """Logger writing to the console (rank 0 only) and to this rank's log file (all ranks)."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    if rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(_ColorFormatter("%(message)s"))
        logger.addHandler(console)
    os.makedirs(output_dir, exist_ok=True)
    filename = "log.txt" if rank == 0 else f"log_rank{rank}.txt"
    fh = logging.FileHandler(os.path.join(output_dir, filename), mode="a")
    fh.setFormatter(logging.Formatter(f"[%(asctime)s rank{rank}] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger.addHandler(fh)
    return logger


class AverageMeter:
    """Running value, sum, count and average of a scalar."""

    def __init__(self) -> None:
        self.val = self.sum = 0.0
        self.count = 0

    def update(self, val: float, n: int = 1) -> None:
        self.val = float(val)
        self.sum += float(val) * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / max(self.count, 1)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or the process's peak RSS on the CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class TensorBoard:
    """``SummaryWriter`` on rank 0 when enabled; a no-op elsewhere."""

    def __init__(self, output_dir: str, enabled: bool, logger: Optional[logging.Logger] = None) -> None:
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is an install requirement, but keep training without it
                if logger is not None:
                    logger.warning(f"TensorBoard disabled, cannot import it: {e}")
                return
            self.writer = SummaryWriter(log_dir=output_dir)

    def scalars(self, values: Dict[str, float], step: int, prefix: str = "") -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(prefix + k, float(v), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
