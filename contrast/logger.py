"""Logging: coloured console on rank 0, one log file per rank, meters, progress, TensorBoard.

Files in ``--output-dir``: ``log.txt`` (rank 0) and ``log_rank<r>.txt`` for ranks r > 0, so a
rank-specific warning (a corrupt image, a non-finite loss) is never lost; TensorBoard event files
(rank 0, ``--tensorboard``).
"""
from __future__ import annotations

import logging
import os
import resource
import sys
import time
from typing import Any, Dict, List, Optional, TextIO, Tuple

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


class DeviceMeters:
    """Last value and running mean of named scalars, kept as tensors where they were computed.

    :meth:`update` queues device arithmetic only (no host read); :meth:`read` copies everything to
    the host with one synchronisation per device, so the loop reads its logged values on print
    steps only. Python numbers are kept on the host.
    """

    def __init__(self) -> None:
        self._last: Dict[str, torch.Tensor] = {}
        self._sum: Dict[str, torch.Tensor] = {}
        self._count: Dict[str, int] = {}

    def update(self, values: Dict[str, object], n: int = 1) -> None:
        for k, v in values.items():
            t = v.detach().float().reshape(()) if torch.is_tensor(v) else torch.tensor(float(v))
            self._last[k] = t
            self._sum[k] = t * n if k not in self._sum else self._sum[k].add(t, alpha=n)
            self._count[k] = self._count.get(k, 0) + n

    def read(self) -> Tuple[Dict[str, float], Dict[str, float]]:
        """``(last values, means)`` as Python floats."""
        by_device: Dict[torch.device, List[str]] = {}
        for k, t in self._last.items():
            by_device.setdefault(t.device, []).append(k)
        last, mean = {}, {}
        for keys in by_device.values():
            values = torch.stack([self._last[k] for k in keys] + [self._sum[k] for k in keys]).tolist()
            for i, k in enumerate(keys):
                last[k], mean[k] = values[i], values[len(keys) + i] / max(self._count[k], 1)
        return last, mean


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


class Progress:
    """Progress of a long loop: a bar redrawn in place on a terminal, else one line every ``every`` seconds.

    ``update(n)`` after each chunk of work. Off a terminal (a log file, a pipe, CI) nothing is printed
    for a loop that ends within ``every`` seconds; a longer one prints
    ``[desc] 1200/5000 (24%) 312.4 img/s, eta 0:00:12`` every ``every`` seconds and a last line with its
    total time. ``enabled=False`` (ranks other than 0) prints nothing. Used as a context manager::

        with Progress("extract train", total=len(dataset), unit="img") as bar:
            for batch in loader:
                ...
                bar.update(len(batch))
    """

    def __init__(self, desc: str, total: Optional[int] = None, unit: str = "it", every: float = 10.0,
                 stream: Optional[TextIO] = None, enabled: bool = True, tty: Optional[bool] = None) -> None:
        self.desc, self.total, self.unit, self.every = desc, total, unit, every
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = tty if tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.count = 0
        self.start = self._last = time.perf_counter()
        self.lines = 0
        self._closed = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.count += n
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last >= (0.2 if self.tty else self.every):
            self._last = now
            self._write(self.format(now - self.start))

    def format(self, elapsed: float) -> str:
        """``[desc] count/total (pct%) rate unit/s, eta h:mm:ss`` (no total: count and rate only)."""
        rate = self.count / elapsed if elapsed > 0 else 0.0
        if self.total:
            done = min(self.count / self.total, 1.0)
            eta = (self.total - self.count) / rate if rate > 0 else 0.0
            where = f"{self.count}/{self.total} ({100 * done:.0f}%)"
            if self.tty:
                where = "|" + "#" * int(20 * done) + " " * (20 - int(20 * done)) + "| " + where
            return f"[{self.desc}] {where} {rate:.1f} {self.unit}/s, eta {format_eta(eta)}"
        return f"[{self.desc}] {self.count} {self.unit} {rate:.1f} {self.unit}/s"

    def _write(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + colored(text, "cyan") + "\033[K")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self.lines += 1

    def close(self) -> None:
        """Finish the bar (terminal) or, when progress lines were printed, print the total time."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled or not self.lines:
            return
        elapsed = time.perf_counter() - self.start
        if self.tty:
            self._write(self.format(elapsed))
            self.stream.write("\n")
        else:
            self._write(f"[{self.desc}] {self.count}" + (f"/{self.total}" if self.total else "")
                        + f" {self.unit} in {format_eta(elapsed)}")
        self.stream.flush()


class TensorBoard:
    """``SummaryWriter`` on rank 0 when enabled; a no-op elsewhere. Sinks added with :meth:`add_sink`
    (objects with ``log(values, step, prefix)`` and ``close()``: the W&B logger) get every scalar too."""

    def __init__(self, output_dir: str, enabled: bool, logger: Optional[logging.Logger] = None) -> None:
        self.writer = None
        self.sinks: List[Any] = []
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is an install requirement, but keep training without it
                if logger is not None:
                    logger.warning(f"TensorBoard disabled, cannot import it: {e}")
                return
            self.writer = SummaryWriter(log_dir=output_dir)

    def add_sink(self, sink: Any) -> None:
        self.sinks.append(sink)

    def scalars(self, values: Dict[str, float], step: int, prefix: str = "") -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(prefix + k, float(v), step)
        for sink in self.sinks:
            sink.log(values, step, prefix)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        for sink in self.sinks:
            sink.close()
        self.sinks = []
