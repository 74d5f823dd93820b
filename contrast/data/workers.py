"""DataLoader worker processes: how they start, how they end, how their errors reach the user.

* :class:`Loader` is a ``DataLoader`` whose multi-process iterators are registered, so that
  :func:`shutdown_workers` (called by ``contrast.runtime.run_cli`` on every way out, and at interpreter exit)
  ends their workers: politely first (torch's own shutdown), then with SIGKILL for any left.
  :func:`kill_workers` SIGKILLs them at once (the "second signal" path, which exits with
  ``os._exit``).
* :func:`init_worker` (the ``worker_init_fn``) seeds numpy and ``random``, makes the worker ignore
  the stop signals while its loader is open (a scheduler signals every process of a job and the
  main process still needs its workers for the step before it saves) but exit on them once the
  main process released it or died, asks the kernel to SIGKILL it when the main process dies
  (Linux), and installs :class:`WorkerError` as the worker's exception wrapper.
* :class:`WorkerError`: an exception raised by the dataset in a worker is re-raised in the main
  process as the same type with the same message (torch's wrapper would put its traceback into the
  message); the worker's traceback is attached as a note (shown with ``--debug``, written to
  ``log.txt``).
"""
from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import random
import signal
import sys
import weakref
from typing import Any, Iterable, List

import numpy as np
import torch
from torch._utils import ExceptionWrapper
from torch.utils.data import DataLoader
from torch.utils.data._utils import worker as _torch_worker

#: The signals a run's main process handles (``contrast.runtime.StopSignals``); workers ignore them while open.
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
_PR_SET_PDEATHSIG = 1
_ITERATORS: "weakref.WeakSet" = weakref.WeakSet()


class WorkerError(ExceptionWrapper):
    """torch's ``ExceptionWrapper`` that also keeps the exception's own message, so that
    :meth:`reraise` (in the main process) raises the original type with the original message."""

    def __init__(self, exc_info=None, where: str = "in background") -> None:
        super().__init__(exc_info, where)
        exc = (exc_info or sys.exc_info())[1]
        self.message = str(exc) if exc is not None else ""
        self.args0 = exc.args[0] if exc is not None and len(exc.args) == 1 and isinstance(exc.args[0], str) else None

    def rebuild(self) -> BaseException:
        """The exception to raise in the main process: its type and message, the worker's traceback as a note."""
        try:
            exc = self.exc_type(self.args0 if self.args0 is not None else self.message)
        except Exception:  # a type that cannot be built from one string
            exc = RuntimeError(f"{self.exc_type.__name__}: {self.message}")
        exc.add_note(f"(raised {self.where}; its traceback:)\n{self.exc_msg.rstrip()}")
        return exc

    def reraise(self):
        raise self.rebuild()


def _set_parent_death_signal() -> None:
    """Linux: the kernel SIGKILLs this process when its parent dies (whatever way it dies)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _on_stop_signal(release, parent: int, signum: int, frame) -> None:
    """In a worker: exit when the main process released the workers or is gone, else ignore."""
    if (release is not None and release.is_set()) or os.getppid() != parent:
        os._exit(0)


def init_worker(worker_id: int, release=None) -> None:
    """DataLoader ``worker_init_fn``: numpy and random follow the worker's torch seed
    (``base_seed + worker_id``, the base drawn from the loader's own generator); the stop signals,
    the parent-death signal and the error wrapper as described in the module docstring."""
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)
    parent = os.getppid()
    _set_parent_death_signal()
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(0)
    handler = functools.partial(_on_stop_signal, release, parent)
    for name in STOP_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), handler)
    _torch_worker.ExceptionWrapper = WorkerError


def _ignore_inherited_stop_handlers() -> None:
    """In a forked child: a stop-signal handler of the parent's Python code is ignored instead, so a
    signal arriving before :func:`init_worker` installs the worker's own cannot run the main process's
    handler in a worker."""
    for name in STOP_SIGNALS:
        handler = signal.getsignal(getattr(signal, name)) if hasattr(signal, name) else None
        if callable(handler) and handler is not signal.default_int_handler:
            signal.signal(getattr(signal, name), signal.SIG_IGN)


os.register_at_fork(after_in_child=_ignore_inherited_stop_handlers)


class Loader(DataLoader):
    """``DataLoader`` whose worker processes end on every exit path (see the module docstring).

    ``worker_init_fn`` defaults to :func:`init_worker`; a given one runs after it."""

    def __init__(self, *args: Any, worker_init_fn=None, **kwargs: Any) -> None:
        self._release = None
        self._user_init = worker_init_fn
        super().__init__(*args, worker_init_fn=None, **kwargs)
        if self.num_workers > 0:
            self._release = (self.multiprocessing_context or multiprocessing.get_context()).Event()
        self.worker_init_fn = functools.partial(_init, self._release, self._user_init)

    def _get_iterator(self):
        iterator = super()._get_iterator()
        if self.num_workers > 0:
            iterator._contrast_release = self._release
            _ITERATORS.add(iterator)
        return iterator

    def close(self) -> None:
        """End this loader's persistent workers (the next iteration starts new ones)."""
        iterator = getattr(self, "_iterator", None)
        if iterator is not None:
            stop_iterator(iterator)
            self._iterator = None


def _init(release, user_init, worker_id: int) -> None:
    init_worker(worker_id, release)
    if user_init is not None:
        user_init(worker_id)


def _workers_of(iterator) -> List:
    return list(getattr(iterator, "_workers", ()))


def stop_iterator(iterator, grace_s: float = 2.0) -> None:
    """End the workers of one multi-process iterator: torch's shutdown (the workers leave their
    loop), then SIGKILL for those still alive after ``grace_s``."""
    release = getattr(iterator, "_contrast_release", None)
    if release is not None:
        release.set()
    workers = _workers_of(iterator)
    try:
        iterator._shutdown_workers()
    except Exception:  # noqa: BLE001 - torch's shutdown can fail half-way (queues of dead workers)
        pass
    for w in workers:
        if w.is_alive():
            w.join(timeout=grace_s)
        if w.is_alive():
            w.kill()
            w.join(timeout=grace_s)
    _ITERATORS.discard(iterator)


def live_iterators() -> Iterable:
    return list(_ITERATORS)


def shutdown_workers() -> None:
    """End the workers of every open :class:`Loader` iterator (idempotent)."""
    for iterator in live_iterators():
        stop_iterator(iterator)


def kill_workers() -> None:
    """SIGKILL the workers of every open :class:`Loader` iterator, without waiting (before ``os._exit``)."""
    for iterator in live_iterators():
        for w in _workers_of(iterator):
            try:
                if w.pid is not None:
                    os.kill(w.pid, signal.SIGKILL)
            except OSError:
                pass


# runs before torch's and multiprocessing's exit handlers (registered earlier: atexit runs in reverse)
atexit.register(shutdown_workers)
