"""The process runtime of an entry script: run setup, stop signals, exit codes and error reporting.

:func:`setup_run` takes the output directory's run lock, cleans up after a crash and installs the
signal handlers (:class:`StopSignals`); a stop saves ``current.pth`` (the loop,
:mod:`contrast.trainer`) and raises :class:`Preempted`, which :func:`run_cli` turns into exit code
:data:`EXIT_PREEMPTED`; a user error ends in one line and exit code 1 (``docs/resilience.md``).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from contrast import distributed as cd
from contrast.checkpoint import CheckpointError, CheckpointSaveError, recover_output_dir
from contrast.data import DatasetError
from contrast.data.workers import STOP_SIGNALS, kill_workers, shutdown_workers
from contrast.logger import TensorBoard, setup_logger
from contrast.runlock import RunLock, RunLockError
from contrast.seeding import seed_everything
from contrast.watchdog import SignalWatchdog

#: Exit code of a run stopped by a signal (or by its launcher's death) after saving a checkpoint:
#: ``EX_TEMPFAIL`` of sysexits.h, "try again": resume it with ``--auto-resume``.
EXIT_PREEMPTED = 75
#: Exit code of a run stopped because its checkpoints cannot be written (two consecutive saves
#: failed, each retried once: ``CheckpointPolicy.max_failed_saves``): ``EX_IOERR`` of sysexits.h.
#: The error line names the last good checkpoint; free space and resume it with ``--auto-resume``.
EXIT_SAVE_FAILED = 74
_DIST_ERRORS = tuple(getattr(torch.distributed, n) for n in ("DistBackendError", "DistNetworkError")
                     if hasattr(torch.distributed, n))



class NonFiniteLossError(RuntimeError):
    """Too many consecutive iterations with a NaN/inf loss."""


class SavesFailing(CheckpointSaveError):
    """Saves keep failing (see :class:`~contrast.checkpointer.Checkpointer`): :func:`run_cli` exits with
    :data:`EXIT_SAVE_FAILED`."""

    exit_code = EXIT_SAVE_FAILED


class Preempted(RuntimeError):
    """The run stopped on a signal or on its launcher's death (after saving a checkpoint when it had
    started training); :func:`run_cli` exits with :data:`EXIT_PREEMPTED`."""

    exit_code = EXIT_PREEMPTED



class StopSignals:
    """SIGTERM, SIGUSR1 and SIGINT handlers of a run (main thread only).

    Before :meth:`arm` (nothing to save yet) a signal raises :class:`Preempted` at once. Armed, the
    first signal only records a request that the loop turns into "save, then exit" at the next
    step (every rank agrees first); a second signal exits at once with code ``128 + signum`` (rank 0
    prints the line), its DataLoader workers killed. A signal within :attr:`DUPLICATE_S` seconds of
    the first is the same request (a process group's signal that its launcher forwards again). A
    :class:`~contrast.watchdog.SignalWatchdog` enforces both exits while the main thread is blocked in
    C code (a CUDA synchronisation on a dead peer's collective), where this handler cannot run.
    """

    DUPLICATE_S = 2.0

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        self.armed = False
        self.where = ""
        self.first_at = 0.0
        self._previous: Dict[int, Any] = {}
        self.watchdog = SignalWatchdog([getattr(signal, n) for n in STOP_SIGNALS if hasattr(signal, n)],
                                       where=lambda: self.where, duplicate_s=self.DUPLICATE_S,
                                       before_exit=_leave_quietly, quiet=lambda: int(os.environ.get("RANK", "0")) > 0)

    def install(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)
        self.watchdog.start()
        return self

    def uninstall(self) -> None:
        self.watchdog.stop()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def arm(self, where: str) -> None:
        """From now on a first signal asks for a checkpoint (``where``: its path, for messages)."""
        self.armed, self.where = True, where

    def request(self, reason: str) -> None:
        if self.requested is None:
            self.requested = reason

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        self.watchdog.acknowledge()
        if self.requested is not None:
            if time.monotonic() - self.first_at < self.DUPLICATE_S:
                return
            self.watchdog.leave(self.watchdog.second_signal_line(signum), signum)
        self.requested, self.first_at = name, time.monotonic()
        if not self.armed:
            raise Preempted(f"stopped by {name} before training started (nothing to save)")
        logging.getLogger("contrast").warning(f"{name} received: saving a checkpoint after the current step, "
                                              f"then exiting (send it again to exit at once)")


@dataclass
class Run:
    """Per-process context: distributed environment, logger, TensorBoard, output directory,
    run lock and signal handlers (:meth:`close` releases both)."""

    env: cd.DistEnv
    logger: logging.Logger
    tb: TensorBoard
    output_dir: str
    signals: StopSignals = field(default_factory=StopSignals)
    lock: Optional[RunLock] = None

    def close(self) -> None:
        """Release the run lock and restore the signal handlers (idempotent)."""
        if self.lock is not None:
            self.lock.release()
        self.signals.uninstall()



def setup_run(name: str, output_dir: str, device: str = "auto", local_rank: int = -1, seed: int = 0,
              tensorboard: bool = True, lock: bool = False) -> Run:
    """Initialise distributed, seeds (``seed`` + rank), output dir, logger and TensorBoard, and
    install the stop-signal handlers. ``lock`` (a training run): rank 0 takes the output
    directory's run lock (:class:`~contrast.runlock.RunLock`; an error on every rank when another
    run holds it) and cleans up after a crash (:func:`~contrast.checkpoint.recover_output_dir`)."""
    signals, run_lock = StopSignals().install(), None
    try:
        env = cd.init_distributed(device, local_rank)
        seed_everything(seed + env.rank)
        os.makedirs(output_dir, exist_ok=True)
        notes, error = [], None
        if lock and env.is_main:
            run_lock = RunLock(output_dir)
            try:
                taken = run_lock.acquire()
                notes = ([taken] if taken else []) + recover_output_dir(output_dir)
            except RunLockError as e:
                error = str(e)
        if lock:
            error = cd.broadcast_object(error, src=0)
            if error:
                raise RunLockError(error)
    except BaseException:
        if run_lock is not None:
            run_lock.release()
        signals.uninstall()
        raise
    logger = setup_logger(output_dir, env.rank)
    tb = TensorBoard(output_dir, tensorboard and env.is_main, logger)
    where = f"rank {env.rank} of {env.world_size} ({env.backend})" if env.world_size > 1 else "single process"
    logger.info(f"{name}: {where}, device {env.device}")
    for note in notes:
        logger.warning(note)
    return Run(env, logger, tb, output_dir, signals, run_lock)



#: Set by ``python -m contrast.launch`` for the processes it starts: it reports their errors itself.
LAUNCHER_ENV = "CONTRAST_LAUNCHER"
#: How a rank reports the loss of a peer (a consequence: the launcher prefers another rank's line).
LOST_CONTACT = "lost contact with another process of the run"
#: User errors :func:`run_cli` reports in one line, exit code 1 (bad flags, data, checkpoints, files,
#: non-finite losses, a locked output dir, a lost peer process).
USER_ERRORS = (CheckpointError, NonFiniteLossError, DatasetError, ValueError, OSError, RunLockError) + _DIST_ERRORS


#: What gloo / NCCL raise (as a plain RuntimeError) when a peer process is gone.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def _peer_lost(e: BaseException) -> bool:
    return cd.is_dist() and isinstance(e, RuntimeError) and any(s in str(e) for s in _PEER_LOST)


def _leave_quietly() -> None:
    """Before an immediate exit: later stop signals change nothing, DataLoader workers are killed."""
    _ignore_stop_signals()
    kill_workers()


def _ignore_stop_signals() -> None:
    """On the way out (the cause and its exit code are known) a stop signal changes nothing: torchrun
    sends SIGTERM to the ranks still running when one exits, and would otherwise replace the exit
    code by -15."""
    if threading.current_thread() is threading.main_thread():
        for name in STOP_SIGNALS:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_IGN)


def _write_error_file(line: str) -> bool:
    """Hand ``line`` to the torchrun agent through its error file (``TORCHELASTIC_ERROR_FILE``, in the
    format of ``torch.distributed.elastic``'s ``ErrorHandler``), so its failure report quotes the line
    where it would put a traceback (the traceback is in the log file)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        return False
    return True


def run_cli(main: Callable[[Optional[List[str]]], Any], argv: Optional[List[str]] = None) -> None:
    """Run an entry point; a user error (bad input, bad checkpoint, non-finite loss, a missing file, a
    locked output dir, a lost peer, ...) ends with one clear line and exit code 1, its traceback only in
    the log file (and on the console with ``--debug``). A run stopped by a signal ends with one line and
    :data:`EXIT_PREEMPTED`; one whose saves keep failing with :data:`EXIT_SAVE_FAILED`. The DataLoader
    workers are ended on every way out (:func:`~contrast.data.workers.shutdown_workers`).

    Under torchrun the line also goes to the agent's error file; rank 0 prints it at once, another rank
    after a 1 s pause (an error every rank meets is then reported by rank 0, whose exit makes torchrun
    stop the others). Under ``python -m contrast.launch`` the launcher prints the line instead.
    """
    args = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except Preempted as e:
        _ignore_stop_signals()
        logging.getLogger("contrast").warning(str(e))
        if (cd.get_rank() if cd.is_dist() else int(os.environ.get("RANK", "0"))) == 0:
            print(f"{os.path.basename(sys.argv[0])}: {e} (exit code {e.exit_code})", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # before the signal handlers were installed
        print(f"{os.path.basename(sys.argv[0])}: interrupted", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)
    except (*USER_ERRORS, RuntimeError) as e:
        lost = isinstance(e, _DIST_ERRORS) or _peer_lost(e)
        if "--debug" in args or not (lost or isinstance(e, USER_ERRORS)):
            raise
        _ignore_stop_signals()
        if lost:
            e = RuntimeError(f"{LOST_CONTACT} (it died or was killed): "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; the last checkpoint is "
                             f"kept, resume with --auto-resume")
        record = logging.makeLogRecord({"name": "contrast", "levelno": logging.ERROR, "levelname": "ERROR",
                                        "msg": traceback.format_exc()})
        for h in logging.getLogger("contrast").handlers:
            if isinstance(h, logging.FileHandler):
                h.handle(record)
        rank = cd.get_rank() if cd.is_dist() else int(os.environ.get("RANK", "0"))
        where = f" (rank {rank})" if rank > 0 else ""
        line = f"{os.path.basename(sys.argv[0])}: error{where}: {e}"
        if rank > 0:
            time.sleep(1.0)
        reported = _write_error_file(line) and os.environ.get(LAUNCHER_ENV) == "1"
        if not reported:
            print(line, file=sys.stderr, flush=True)
        sys.exit(EXIT_SAVE_FAILED if isinstance(e, SavesFailing) else 1)
    finally:
        shutdown_workers()
        cd.cleanup()
