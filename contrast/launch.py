"""``python -m contrast.launch``: torchrun whose failures end in one line.

It takes exactly ``torchrun``'s flags (it is ``torch.distributed.run``: same parser, same elastic agent,
same environment for the processes) and differs only in what a failure prints. Plain torchrun answers
a process that exits with an error by its agent's log lines and a ~40-line ``ChildFailedError`` report
around the script's own one-line error. Here the agent's logging is silenced and the report replaced
by one line: the error line of the first process that failed (handed over through torchrun's error
file by :func:`contrast.engine.run_cli`), or, for a crash, which rank exited with which code. The exit
code is that process's. ``--debug`` among the script's arguments keeps torchrun's own output::

    python -m contrast.launch --nproc_per_node=4 main_pretrain.py --data-dir DATA ...
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from typing import List, Optional, Tuple

from contrast.engine import LAUNCHER_ENV

PROG = "contrast.launch"


def _silence_agent_logging() -> None:
    """The elastic agent's loggers (created when ``torch.distributed.run`` is imported) only above CRITICAL."""
    for name, item in list(logging.root.manager.loggerDict.items()):
        if name.startswith("torch.distributed") and isinstance(item, logging.Logger):
            item.setLevel(logging.CRITICAL + 1)


def first_failure(failures) -> Tuple[int, object]:
    """``(rank, ProcessFailure)`` to report: a process that left an error line (the lowest rank: an error
    all ranks meet is rank 0's), else one that exited by itself before one stopped by a signal (torchrun
    stops the others when one fails), the earliest first."""
    def key(item):
        rank, failure = item
        if _has_message(failure):
            return (0, rank, 0)
        return (1 if failure.exitcode > 0 else 2, failure.timestamp, rank)
    return min(failures.items(), key=key)


def _has_message(failure) -> bool:
    return bool(failure.error_file_data) and bool(failure.message)


def failure_line(script: str, rank: int, failure) -> str:
    """The one line that reports ``failure`` of global ``rank``."""
    if _has_message(failure):
        message = failure.message   # a str, or ErrorHandler's {"message": ..., "extraInfo": ...}
        text = message.get("message", "") if isinstance(message, dict) else message
        return text if text.startswith(f"{script}: error") else f"{script}: error (rank {rank}): {text}"
    code = failure.exitcode
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"{PROG}: {script}: rank {rank} was killed by {name} (out of memory? see its log file)"
    return f"{PROG}: {script}: rank {rank} exited with code {code} (its traceback is above)"


def main(argv: Optional[List[str]] = None) -> None:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(argv)
    debug = "--debug" in args.training_script_args
    if not debug:
        _silence_agent_logging()
    os.environ[LAUNCHER_ENV] = "1"
    script = os.path.basename(args.training_script)
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        if debug:
            raise
        rank, failure = first_failure(e.failures)
        print(failure_line(script, rank, failure), file=sys.stderr, flush=True)
        sys.exit(failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode)
    except Exception as e:  # the launch itself failed (rendezvous, port in use, ...)
        if debug:
            raise
        print(f"{PROG}: error: {type(e).__name__}: {e} (--debug for the traceback)", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
