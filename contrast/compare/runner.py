"""Run a comparison's jobs as subprocesses of the entry scripts, resumably.

Files of a job's folder ``OUT/runs/<name>/`` besides the run's own (``config.json``, ``log.txt``,
``current.pth``): ``pretrain.out`` / ``eval/<kind>.out`` (each process's console, appended),
``clock.json`` (pretraining seconds so far, refreshed every few seconds: a time budget survives a
kill), ``pretrain.json`` (pretraining is over: seconds, why it stopped), ``eval/<kind>.json`` (that
evaluation's metrics) and ``result.json``: the job is finished once it exists, and is never run
again. Every file is written atomically. ``OUT/compare_log.jsonl`` has one line per process started
and ended.

A job's pretraining always passes ``--auto-resume``: after an interruption it continues from its
last checkpoint. With ``--budget-minutes`` the process gets SIGTERM when its pretraining seconds
(over all sittings) reach the budget; it saves ``current.pth`` and exits with 75, and that
checkpoint is evaluated. A stop signal to the comparison's process group (Ctrl-C) stops the run in
progress the same way; the comparison then exits with 75 and its rerun continues.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

from contrast.checkpoint import read_checkpoint
from contrast.compare.evaluations import Evaluation, Target
from contrast.compare.plan import Budget, Job
from contrast.runtime import EXIT_PREEMPTED, Preempted

#: Seconds between two writes of ``clock.json`` while a pretraining process runs.
CLOCK_EVERY_S = 2.0


class ComparisonError(ValueError):
    """Some jobs failed (each with its exit code and console file); the others are done."""


class JobFailed(RuntimeError):
    pass


def write_json(path: str, obj) -> None:
    """``obj`` as JSON at ``path``, atomically (tmp file, fsync, rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str, default=None):
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        return json.load(f)


class Runner:
    """Runs ``jobs`` with ``evaluations`` (``popen``, ``clock``: injectable for tests)."""

    def __init__(self, out: str, python: str, root: str, budget: Budget, evaluations: Sequence[Evaluation],
                 popen: Callable = subprocess.Popen, clock: Callable[[], float] = time.monotonic,
                 poll_s: float = 0.2) -> None:
        self.out, self.python, self.root, self.budget = out, python, root, budget
        self.evaluations = list(evaluations)
        self.popen, self.clock, self.poll_s = popen, clock, poll_s
        self.stop_requested = False

    # ------------------------------------------------------------------ the whole comparison
    def run(self, jobs: Sequence[Job]) -> List[str]:
        """Run every unfinished job; returns the names of the failed ones. Raises ``Preempted`` on a stop."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        failed = []
        try:
            for job in jobs:
                if os.path.isfile(os.path.join(job.folder, "result.json")):
                    continue
                try:
                    self.run_job(job)
                except JobFailed as e:
                    print(f"[compare] {e}", file=sys.stderr, flush=True)
                    failed.append(job.name)
                if self.stop_requested:
                    raise Preempted("comparison stopped by a signal; rerun the same command to continue")
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return failed

    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = True

    def log(self, **event) -> None:
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, "compare_log.jsonl"), "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **event}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # ------------------------------------------------------------------ one job
    def run_job(self, job: Job) -> None:
        os.makedirs(os.path.join(job.folder, "eval"), exist_ok=True)
        pretrain = None
        if job.kind == "pretrain":
            pretrain = read_json(os.path.join(job.folder, "pretrain.json")) or self.pretrain(job)
        checkpoint = os.path.join(job.folder, "current.pth") if job.kind == "pretrain" else None
        metrics: Dict[str, float] = {}
        eval_seconds = 0.0
        for ev in self.evaluations:
            if job.kind == "baseline" and not ev.baselines:
                continue
            path = os.path.join(job.folder, "eval", f"{ev.name}.json")
            done = read_json(path) or self.evaluate(job, ev, checkpoint)
            metrics.update(done["metrics"])
            eval_seconds += done["seconds"]
        result = {"name": job.name, "row": job.row, "seed": job.seed, "kind": job.kind, "metrics": metrics,
                  "eval_seconds": round(eval_seconds, 2)}
        if pretrain is not None:
            ckpt = read_checkpoint(checkpoint)
            result.update(pretrain_seconds=pretrain["seconds"], stopped_by=pretrain["stopped_by"],
                          images_seen=ckpt.images_seen, epoch=ckpt.epoch, loop_epochs=job.loop_epochs,
                          plain_epochs=job.plain_epochs)
        write_json(os.path.join(job.folder, "result.json"), result)
        self.log(run=job.name, stage="result", event="written")

    def pretrain(self, job: Job) -> dict:
        clock_path = os.path.join(job.folder, "clock.json")
        used = float(read_json(clock_path, {"seconds": 0.0})["seconds"])
        remaining = None if self.budget.minutes is None else self.budget.minutes * 60 - used
        if remaining is not None and remaining <= 0 and os.path.isfile(os.path.join(job.folder, "current.pth")):
            rc, timed_out, seconds = EXIT_PREEMPTED, True, 0.0
        else:
            argv = [self.python, os.path.join(self.root, "main_pretrain.py"), *job.pretrain_argv]
            rc, timed_out, seconds = self.call(job, "pretrain", argv, os.path.join(job.folder, "pretrain.out"),
                                               deadline=None if remaining is None else max(remaining, 1.0),
                                               clock_path=clock_path, used=used)
        if rc == 0 or (rc == EXIT_PREEMPTED and timed_out):
            done = {"seconds": round(used + seconds, 2), "stopped_by": "schedule" if rc == 0 else "time",
                    "exit_code": rc}
            write_json(os.path.join(job.folder, "pretrain.json"), done)
            return done
        self._raise(job, "main_pretrain.py", rc, os.path.join(job.folder, "pretrain.out"))

    def evaluate(self, job: Job, ev: Evaluation, checkpoint: Optional[str]) -> dict:
        target = Target(job.encoder_flags, checkpoint, job.seed, os.path.join(job.folder, "eval", ev.name))
        os.makedirs(target.work, exist_ok=True)
        out = os.path.join(job.folder, "eval", f"{ev.name}.out")
        rc, _, seconds = self.call(job, f"eval:{ev.name}", [self.python, *ev.command(target)], out)
        if rc != 0:
            self._raise(job, f"--eval {ev.name}", rc, out)
        done = {"metrics": ev.metrics(target), "seconds": round(seconds, 2)}
        write_json(os.path.join(job.folder, "eval", f"{ev.name}.json"), done)
        return done

    def _raise(self, job: Job, what: str, rc: int, out: str) -> None:
        if rc == EXIT_PREEMPTED or self.stop_requested:
            raise Preempted(f"{job.name}: {what} stopped (exit code {rc}); rerun the same command to continue")
        raise JobFailed(f"{job.name}: {what} failed with exit code {rc}; see {out}")

    # ------------------------------------------------------------------ one process
    def call(self, job: Job, stage: str, argv: List[str], console: str, deadline: Optional[float] = None,
             clock_path: Optional[str] = None, used: float = 0.0):
        """Run ``argv`` (console appended to ``console``) until it exits; SIGTERM once after ``deadline``
        seconds. Returns ``(exit code, whether the deadline stopped it, seconds)``."""
        self.log(run=job.name, stage=stage, event="start")
        with open(console, "a") as f:
            f.write(f"$ {' '.join(argv)}\n")
            f.flush()
            proc = self.popen(argv, stdout=f, stderr=subprocess.STDOUT)
            start = last = self.clock()
            timed_out = False
            while True:
                try:
                    rc = proc.wait(timeout=self.poll_s)
                    break
                except subprocess.TimeoutExpired:
                    pass
                now = self.clock()
                if clock_path and now - last >= CLOCK_EVERY_S:
                    write_json(clock_path, {"seconds": round(used + now - start, 2)})
                    last = now
                if deadline is not None and not timed_out and now - start >= deadline:
                    proc.send_signal(signal.SIGTERM)
                    timed_out = True
        seconds = self.clock() - start
        if clock_path:
            write_json(clock_path, {"seconds": round(used + seconds, 2)})
        self.log(run=job.name, stage=stage, event="end", exit_code=rc, seconds=round(seconds, 2))
        return rc, timed_out, seconds
