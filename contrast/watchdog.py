"""A stop-signal watchdog that works while the main thread is blocked in C code.

Python runs signal handlers on the main thread between bytecodes. A rank blocked in C (a CUDA
synchronisation waiting for an NCCL collective whose peer died, a gloo wait) never gets there:
neither the first signal's "save, then exit" nor the second signal's immediate exit happens, and
the process lives until torchrun's SIGKILL or the collective's timeout.

The C-level handler still writes each signal's number to the wakeup file descriptor
(``signal.set_wakeup_fd``). :class:`SignalWatchdog` reads it on a thread of its own: on the
second stop signal it exits at once (``os._exit(128 + signum)``), and when the main thread has not
run the first signal's handler within ``grace_s`` seconds it exits with one line saying so.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from typing import Callable, Collection, Optional


#: Wakeup fds of running watchdogs. A forked child (a DataLoader worker) inherits the wakeup fd: its
#: signals would reach the parent's watchdog as the parent's own (a job-wide SIGTERM counted twice,
#: or a first signal "not handled" by the parent's main thread), so the child drops it.
_watched_fds: set = set()


def _drop_inherited_wakeup_fd() -> None:
    if _watched_fds:
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:   # forked from another thread than the main one: nothing to drop there
            pass
        _watched_fds.clear()


os.register_at_fork(after_in_child=_drop_inherited_wakeup_fd)


class SignalWatchdog:
    """Enforces the stop-signal exits from a thread (see the module docstring).

    ``signums``: the stop signals counted; ``where``: a callable giving the last checkpoint's path
    for the exit line; ``acknowledge()`` is called by the main thread's handler when it runs.
    """

    def __init__(self, signums: Collection[int], where: Callable[[], str] = lambda: "",
                 grace_s: Optional[float] = 60.0, exit: Callable[[int], None] = os._exit,
                 duplicate_s: float = 0.0, before_exit: Callable[[], None] = lambda: None,
                 quiet: Callable[[], bool] = lambda: False) -> None:
        self.signums, self.where, self.grace_s, self._exit = set(signums), where, grace_s, exit
        self.duplicate_s, self._before_exit, self._quiet = duplicate_s, before_exit, quiet
        self.received = 0
        self._first_at = 0.0
        self._handled = 0
        self._cond = threading.Condition()
        self._leaving = threading.Lock()
        self._sockets: Optional[tuple] = None
        self._previous_fd = -1

    def start(self) -> "SignalWatchdog":
        """Install the wakeup fd and start the thread (main thread only; a no-op elsewhere)."""
        if threading.current_thread() is not threading.main_thread() or self._sockets is not None:
            return self
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self._sockets = (reader, writer)
        _watched_fds.add(writer.fileno())
        threading.Thread(target=self._watch, args=(reader,), name="contrast-signal-watchdog", daemon=True).start()
        return self

    def stop(self) -> None:
        """Restore the previous wakeup fd (the thread ends with its socket)."""
        if self._sockets is None:
            return
        _watched_fds.discard(self._sockets[1].fileno())
        signal.set_wakeup_fd(self._previous_fd)
        for s in self._sockets:
            s.close()
        self._sockets = None

    def acknowledge(self) -> None:
        """The main thread ran a stop signal's handler: it is not blocked."""
        with self._cond:
            self._handled += 1
            self._cond.notify_all()

    def _watch(self, reader: socket.socket) -> None:
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in self.signums:
                    self._on_signal(signum)

    def second_signal_line(self, signum: int) -> str:
        prog = os.path.basename(sys.argv[0]) or "contrast"
        return (f"{prog}: second {signal.Signals(signum).name}: exiting at once without saving (last checkpoint: "
                f"{self.where() or 'none'})")

    def _on_signal(self, signum: int) -> None:
        now = time.monotonic()
        if self.received and now - self._first_at < self.duplicate_s:
            return   # the same request (a group's signal forwarded again by the launcher)
        if not self.received:
            self._first_at = now
        self.received += 1
        if self.received >= 2:
            self.leave(self.second_signal_line(signum), signum)
        elif self.grace_s is not None:
            threading.Thread(target=self._await_handler, args=(signum, self.received), daemon=True).start()

    def _await_handler(self, signum: int, ordinal: int) -> None:
        with self._cond:
            handled = self._cond.wait_for(lambda: self._handled >= ordinal, timeout=self.grace_s)
        if not handled:
            prog = os.path.basename(sys.argv[0]) or "contrast"
            self.leave(f"{prog}: {signal.Signals(signum).name}: the main thread did not respond within "
                       f"{self.grace_s:g} s (blocked in a device synchronisation or a collective, e.g. a peer "
                       f"process died); exiting without saving (last checkpoint: {self.where() or 'none'})", signum)

    def leave(self, line: str, signum: int) -> None:
        """Print ``line`` and exit with ``128 + signum`` (once, from whichever thread comes first)."""
        with self._leaving:
            self._before_exit()
            if not self._quiet():
                print(line, file=sys.stderr, flush=True)
            self._exit(128 + signum)
