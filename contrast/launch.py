"""``python -m contrast.launch``: torchrun whose failures end in one line.

It takes exactly ``torchrun``'s flags (it is ``torch.distributed.run``: same parser, same elastic agent,
same environment for the processes) and differs only in what a failure prints. Plain torchrun answers
a process that exits with an error by its agent's log lines and a ~40-line ``ChildFailedError`` report
around the script's own one-line error. Here the agent's logging is silenced and the report replaced
by one line: the error line of the first process that failed (handed over through torchrun's error
file by :func:`contrast.runtime.run_cli`), or, for a crash, which rank exited with which code. The exit
code is that process's. A stop signal (SIGTERM, SIGINT, SIGUSR1) is forwarded to the processes and
the agent waits for them (torchrun would stop them itself 30 s later): they save and exit with 75
(rank 0 prints the line, the launcher none); so does a second one (they exit at once with
128 + N). ``--debug`` among the script's arguments keeps torchrun's own output::

    python -m contrast.launch --nproc_per_node=4 main_pretrain.py --data-dir DATA ...
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from typing import List, Optional, Tuple

from contrast.data.workers import STOP_SIGNALS
from contrast.runtime import EXIT_PREEMPTED, LAUNCHER_ENV, LOST_CONTACT

PROG = "contrast.launch"


def _silence_agent_logging() -> None:
    """The elastic agent's loggers (created when ``torch.distributed.run`` is imported) only above CRITICAL."""
    for name, item in list(logging.root.manager.loggerDict.items()):
        if name.startswith("torch.distributed") and isinstance(item, logging.Logger):
            item.setLevel(logging.CRITICAL + 1)


def first_failure(failures) -> Tuple[int, object]:
    """``(rank, ProcessFailure)`` to report: a process that left an error line (the lowest rank: an error
    all ranks meet is rank 0's; "lost contact with another process" only when no rank left another
    line), else one that exited by itself before one stopped by a signal (torchrun stops the others
    when one fails), the earliest first, then the lowest rank that stopped on a stop signal (75, 128 + N)."""
    stops = _stop_codes()

    def key(item):
        rank, failure = item
        if _has_message(failure):
            return (0, int(LOST_CONTACT in _text(failure)), rank, 0)
        if failure.exitcode > 0 and failure.exitcode not in stops:
            return (1, 0, failure.timestamp, rank)
        if failure.exitcode in stops:
            return (2, 0, rank, 0)
        return (3, 0, failure.timestamp, rank)
    return min(failures.items(), key=key)


def _text(failure) -> str:
    message = failure.message   # a str, or ErrorHandler's {"message": ..., "extraInfo": ...}
    return message.get("message", "") if isinstance(message, dict) else str(message)


def _has_message(failure) -> bool:
    """Whether the process left an error file (torch makes a message up for those that did not, and
    marks their ``error_file_data`` with ``"<NONE>"``)."""
    data = failure.error_file_data or {}
    return bool(failure.message) and data.get("message", "<NONE>") != "<NONE>"


def _stop_codes() -> Tuple[int, ...]:
    return (EXIT_PREEMPTED,) + tuple(128 + getattr(signal, n) for n in STOP_SIGNALS if hasattr(signal, n))


def failure_line(script: str, rank: int, failure) -> Optional[str]:
    """The one line that reports ``failure`` of global ``rank`` (None: rank 0 stopped on a signal and
    printed its line itself)."""
    if not _has_message(failure) and failure.exitcode in _stop_codes():
        if rank == 0:
            return None
        return f"{PROG}: {script}: rank {rank} stopped on a signal with exit code {failure.exitcode}"
    if _has_message(failure):
        text = _text(failure)
        return text if text.startswith(f"{script}: error") else f"{script}: error (rank {rank}): {text}"
    code = failure.exitcode
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"{PROG}: {script}: rank {rank} was killed by {name} (out of memory? see its log file)"
    return f"{PROG}: {script}: rank {rank} exited with code {code} (its traceback is above)"


def _children() -> List[int]:
    """This process's child processes (Linux ``/proc``; the ranks torchrun started)."""
    pids: List[int] = []
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return pids


def _forward_stop_signals(args) -> None:
    """Stop signals reach the agent's handler as a forward to the ranks (which save and exit by
    themselves) instead of torchrun's abort; other signals keep torchrun's handling."""
    from torch.distributed.elastic.multiprocessing import api

    abort = api._terminate_process_handler
    stop = {getattr(signal, n) for n in STOP_SIGNALS if hasattr(signal, n)}

    def handler(signum, frame):
        if signum not in stop:
            abort(signum, frame)
        for pid in _children():
            try:
                os.kill(pid, signum)
            except OSError:
                pass
    api._terminate_process_handler = handler
    handled = [n.strip() for n in args.signals_to_handle.split(",") if n.strip()]
    args.signals_to_handle = ",".join(dict.fromkeys([*handled, *STOP_SIGNALS]))


def main(argv: Optional[List[str]] = None) -> None:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(argv)
    debug = "--debug" in args.training_script_args
    if not debug:
        _silence_agent_logging()
    os.environ[LAUNCHER_ENV] = "1"
    _forward_stop_signals(args)
    script = os.path.basename(args.training_script)
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        if debug:
            raise
        rank, failure = first_failure(e.failures)
        line = failure_line(script, rank, failure)
        if line is not None:
            print(line, file=sys.stderr, flush=True)
        sys.exit(failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode)
    except Exception as e:  # the launch itself failed (rendezvous, port in use, ...)
        if debug:
            raise
        print(f"{PROG}: error: {type(e).__name__}: {e} (--debug for the traceback)", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
