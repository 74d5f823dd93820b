"""One run per output directory: ``<output-dir>/run.lock``.

The lock file holds the host, pid, start time and (under SLURM) the job id and restart count of
the run that holds it; while the run lives, a thread refreshes its modification time every
:data:`HEARTBEAT_S` seconds. A second launch into the same directory

* refuses with one line naming the holder when the holder is alive: same host and its pid exists,
  or another host whose heartbeat is fresh (it waits up to :data:`STALE_AFTER_S` seconds for the
  heartbeat to stop first, so a requeued job on another node takes over a lock its predecessor
  could not release);
* takes the lock over (a warning says from whom) when the holder is gone: its pid no longer exists
  on this host, its heartbeat stopped, or it is an earlier incarnation of the same SLURM job.

A run that ends (normally, with an error, or after a signal) removes the lock.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any, Dict, Optional

LOCK_NAME = "run.lock"
#: Seconds between two refreshes of the lock's modification time by the holder.
HEARTBEAT_S = 30.0
#: A lock of another host whose heartbeat is older than this is stale.
STALE_AFTER_S = 120.0


class RunLockError(RuntimeError):
    """The output directory is in use by another live run."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _me() -> Dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0")}


def _read(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable (a half-written lock): treated as stale


def _describe(info: Dict[str, Any]) -> str:
    return f"pid {info.get('pid')} on host {info.get('host')} (since {info.get('started')})"


class RunLock:
    """``acquire()`` / ``release()`` the lock of ``output_dir`` (see the module docstring).

    ``acquire`` returns None, or a warning line when it took over a stale lock; it raises
    :class:`RunLockError` while another run holds the directory.
    """

    def __init__(self, output_dir: str, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S
                 ) -> None:
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.held = False

    def _stale_reason(self, info: Dict[str, Any]) -> Optional[str]:
        """Why the lock ``info`` is stale, or None when its holder may be alive."""
        me = _me()
        if not info:
            return "it is unreadable"
        if info.get("slurm_job") and info.get("slurm_job") == me["slurm_job"] and \
                info.get("slurm_restart") != me["slurm_restart"]:
            return f"it belongs to an earlier run of SLURM job {info['slurm_job']}"
        if info.get("host") == me["host"]:
            if info.get("pid") == me["pid"]:
                return "this process held it"
            return None if _pid_alive(int(info.get("pid", -1))) else "its process no longer exists"
        try:
            age = time.time() - os.path.getmtime(self.path)
        except FileNotFoundError:
            return "it was just released"
        return f"its heartbeat stopped {age:.0f} s ago" if age > self.stale_after_s else None

    def acquire(self) -> Optional[str]:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        deadline = time.time() + self.stale_after_s + self.heartbeat_s
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = _read(self.path)
                if info is None:
                    continue  # released in between
                reason = self._stale_reason(info)
                if reason is not None:
                    os.replace(self._write_tmp(), self.path)
                    now = _read(self.path) or {}
                    if (now.get("host"), now.get("pid")) != (socket.gethostname(), os.getpid()):
                        continue  # another launch took it over at the same moment
                    self._start()
                    return f"took over the stale lock {self.path} of {_describe(info)}: {reason}"
                if info.get("host") == _me()["host"] or time.time() > deadline:
                    raise RunLockError(f"{os.path.dirname(self.path)} is in use by another run: {_describe(info)} "
                                       f"holds {self.path}; wait for it to end or stop it, or use another "
                                       f"--output-dir")
                time.sleep(min(5.0, self.heartbeat_s))
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_me(), f)
            self._start()
            return None

    def _write_tmp(self) -> str:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(_me(), f)
        return tmp

    def _start(self) -> None:
        self.held = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Remove the lock if this process still holds it."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        info = _read(self.path)
        if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
