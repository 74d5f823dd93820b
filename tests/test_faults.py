"""The fault drill: real training processes on tiny data, interrupted the ways clusters interrupt them.

Every run is ``tests/fault_runner.py`` (``main_pretrain.py`` with a 2-conv backbone; MoCo v2: global
RNG through the shuffled batch norm, a queue, an EMA encoder), 16 images, batch 4, 3 epochs of 4
steps, ``--amp-opt-level O0`` and ``--save-every-minutes 1e-9`` (a checkpoint after every step,
so "the work since the last save" is at most one step). Each scenario asserts what was lost and,
where resume is exact, that the final weights equal those of an uninterrupted run.

* kill -9 at a random step, kill -9 inside a save (a test hook pauses the save there), then SIGTERM
  or SIGINT, each followed by ``--auto-resume``: MoCo with 0 DataLoader workers (a random point of
  the save), and PIC with sampled negatives (per-rank files) with 2 workers, killed while its main
  file is written after the per-rank files of the new step are;
* a second signal exits at once; a second launch into a live run's folder is refused;
* a damaged ``current.pth`` falls back to the newest epoch checkpoint; a folder with checkpoints
  is not restarted silently;
* a full disk (a small tmpfs where mounting is allowed, else an injected ENOSPC): saves are retried
  once, the second failed save in a row stops the run with exit code 74;
* under torchrun: one rank killed, torchrun itself killed (the orphaned ranks save and exit);
* requeue on other hardware: 1 -> 2 processes with the same total batch continues the schedule,
  2 -> 1 with the same per-process batch is refused, or continues with ``--allow-batch-change``.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from contrast.checkpoint import load_file, read_checkpoint
from tests.dist_utils import free_port
from tests.synthetic import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "tests", "fault_runner.py")
STEPS = 12  # 3 epochs x 4 steps
EXIT_PREEMPTED = 75


METHODS = {"MoCo": ["--model", "MoCov2", "--contrast-num-negative", "16", "--bn-splits", "2"],
           "PIC_sampled": ["--model", "PIC", "--aug", "SimCLR", "--pic-num-negative", "4"]}


def flags(data, out, *extra, workers=0, batch=4, epochs=3, method="MoCo"):
    return ["--data-dir", str(data), "--output-dir", str(out), *METHODS[method], "--mlp-head", "--mlp-hidden-dim",
            "32", "--feature-dim", "16", "--image-size", "32", "--batch-size", str(batch), "--epochs", str(epochs),
            "--num-workers", str(workers), "--print-freq", "1", "--warmup-epoch", "1", "--no-tensorboard",
            "--base-learning-rate", "0.5", "--amp-opt-level", "O0", "--save-every-minutes", "1e-9", *extra]


class Proc:
    """A training process (or torchrun) started in the background; stderr kept in a file."""

    def __init__(self, argv, out, nproc=1, env=None, runner=RUNNER):
        """Its own session, so that a signal can go to its whole process group (as Ctrl-C does)."""
        self.out = str(out)
        os.makedirs(self.out, exist_ok=True)
        self.err_path = os.path.join(self.out, f"stderr-{time.monotonic_ns()}.txt")
        cmd = [sys.executable, runner, *argv] if nproc == 1 else \
            [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
             f"--master_port={free_port()}", runner, *argv]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **(env or {})}
        self.lines_before = len(train_lines(self.out))
        with open(self.err_path, "w") as err:
            self.p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, env=full_env,
                                      start_new_session=True)

    def wait_steps(self, n, timeout=120):
        """Wait until this launch has logged ``n`` training steps (rank 0)."""
        deadline = time.time() + timeout
        while len(train_lines(self.out)) - self.lines_before < n:
            assert self.p.poll() is None, f"the run ended early: {self.stderr()}"
            assert time.time() < deadline, "timed out waiting for training steps"
            time.sleep(0.02)
        return len(train_lines(self.out)) - self.lines_before

    def wait_file(self, path, timeout=120):
        deadline = time.time() + timeout
        while not os.path.exists(path):
            assert self.p.poll() is None, f"the run ended early: {self.stderr()}"
            assert time.time() < deadline, f"timed out waiting for {path}"
            time.sleep(0.02)

    def wait(self, timeout=180):
        return self.p.wait(timeout=timeout)

    def stderr(self):
        with open(self.err_path) as f:
            return f.read()


def run(argv, out, nproc=1, env=None, timeout=180):
    proc = Proc(argv, out, nproc, env)
    return proc.wait(timeout), proc.stderr()


def train_lines(out):
    try:
        with open(os.path.join(out, "log.txt")) as f:
            return [line for line in f if "train epoch" in line]
    except FileNotFoundError:
        return []


def resumed_step(out):
    """The step the latest launch resumed from (from its log line)."""
    with open(os.path.join(out, "log.txt")) as f:
        found = re.findall(r"resumed from \S+ \(epoch \d+, step (\d+)", f.read())
    return int(found[-1]) if found else 0


def committed_step(out):
    """The step a resume must find after a crash, computed here from the files: the manifest's, or
    the pending manifest's when the main file already matches it (a crash between the renames)."""
    def step_of(manifest_file):
        with open(manifest_file) as f:
            manifest = json.load(f)
        main = os.path.join(out, manifest["files"][0]["name"])
        with open(main, "rb") as f:
            ok = hashlib.sha256(f.read()).hexdigest() == manifest["files"][0]["sha256"]
        return manifest["step"] if ok else None
    done = os.path.join(out, "current.manifest.json")
    pending = step_of(done + ".tmp") if os.path.exists(done + ".tmp") else None
    if pending is not None:
        return pending
    return step_of(done) if os.path.exists(done) else 0


def weights(out):
    return load_file(os.path.join(out, "current.pth"))["model"]


def one_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip() and "FutureWarning" not in line
             and "warnings.warn" not in line]
    return "Traceback" not in stderr and len(lines) == 1, lines


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")), num_classes=2, per_class=8, size=(36, 36))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Uninterrupted runs, by number of DataLoader workers (and torchrun processes)."""
    cache = {}

    def get(workers=0, nproc=1, method="MoCo"):
        if (workers, nproc, method) not in cache:
            out = tmp_path_factory.mktemp(f"ref{workers}w{nproc}p{method}")
            rc, err = run(flags(data, out, workers=workers, batch=4 // nproc, method=method), out, nproc=nproc)
            assert rc == 0, err
            cache[workers, nproc, method] = out
        return cache[workers, nproc, method]
    return get


# ----------------------------------------------------------------------------------- kill -9 and signals
DRILL_METHOD = {0: "MoCo", 2: "PIC_sampled"}


@pytest.fixture(scope="module")
def drill(data, tmp_path_factory):
    """kill -9 at a random step, kill -9 inside a save, then SIGTERM (0 workers) or SIGINT (2 workers),
    each followed by --auto-resume, then the run finishes. Returns the folder and what each fault cost."""
    cache = {}

    def get(workers):
        if workers in cache:
            return cache[workers]
        rng = random.Random(1000 + workers)
        out = tmp_path_factory.mktemp(f"drill{workers}w")
        argv = flags(data, out, workers=workers, method=DRILL_METHOD[workers])
        report, done = [], 0
        # 1. kill -9 after a random number of steps
        proc = Proc(argv, out)
        logged = proc.wait_steps(rng.randint(2, 4))
        proc.p.kill()
        proc.wait()
        expected = committed_step(out)
        report.append(("kill -9", done + logged, expected))
        done = expected
        # 2. kill -9 inside a save, at a random point of it (the hook pauses there)
        marker = os.path.join(str(out), "paused")
        point = rng.choice(["shards", "main", "commit"]) if workers == 0 else "main"
        nth = rng.randint(1, 3)
        proc = Proc(argv + ["--auto-resume", "--test-pause-in-save", marker, "--test-pause-at", f"{point}:{nth}"], out)
        proc.wait_file(marker)
        logged = len(train_lines(out)) - proc.lines_before
        proc.p.kill()
        proc.wait()
        os.remove(marker)
        assert resumed_step_of_launch(out, proc) == done
        expected = committed_step(out)
        report.append((f"kill -9 in save ({point})", done + logged, expected))
        done = expected
        # 3. a scheduler's signal: saves after the current step, exit code 75, one line, nothing lost
        # (with workers: SIGINT to the whole process group, as Ctrl-C in a terminal, workers included)
        sig = signal.SIGTERM if workers == 0 else signal.SIGINT
        proc = Proc(argv + ["--auto-resume"], out)
        logged = proc.wait_steps(rng.randint(1, 2))
        if workers:
            os.killpg(proc.p.pid, sig)
        else:
            proc.p.send_signal(sig)
        rc = proc.wait()
        assert resumed_step_of_launch(out, proc) == done
        err = proc.stderr()
        ok, lines = one_line(err)
        assert rc == EXIT_PREEMPTED and ok, err
        assert re.search(rf"stopped by {sig.name} at epoch \d+ iteration \d+: checkpoint \S+ \(step \d+\) saved; "
                         rf"resume with --auto-resume \(exit code 75\)", lines[0]), lines
        saved = int(re.search(r"\(step (\d+)\) saved", lines[0]).group(1))
        report.append((sig.name, done + logged, saved))
        done = saved
        # 4. to the end
        proc = Proc(argv + ["--auto-resume"], out)
        assert proc.wait() == 0, proc.stderr()
        assert resumed_step_of_launch(out, proc) == done
        cache[workers] = (out, report)
        return cache[workers]
    return get


def resumed_step_of_launch(out, proc):
    with open(os.path.join(out, "log.txt")) as f:
        text = f.read()
    found = re.findall(r"resumed from \S+ \(epoch \d+, step (\d+)", text)
    return int(found[-1]) if found else 0


@pytest.mark.parametrize("workers", [0, 2])
def test_kill9_and_signals_resume_and_lose_at_most_the_step_being_saved(workers, drill):
    out, report = drill(workers)
    for fault, reached, resumed in report:
        assert reached - resumed <= 1, (fault, reached, resumed)   # a save after every step
        if fault in ("SIGTERM", "SIGINT"):
            assert resumed >= reached, (fault, reached, resumed)     # a signal loses nothing
    ckpt = read_checkpoint(os.path.join(out, "current.pth"))
    assert ckpt.verified and ckpt.step == STEPS and ckpt.samples_seen == 4 * STEPS
    assert not glob.glob(os.path.join(out, "*.tmp"))  # stale temporary files were removed
    if DRILL_METHOD[workers] == "PIC_sampled":  # the killed save's per-rank file of the new step was removed
        assert sorted(f for f in os.listdir(out) if ".rank" in f) == ["ckpt_epoch_3.step12.rank0-of-1.pth",
                                                                       "current.step12.rank0-of-1.pth"]
        assert "a per-rank file of a save that never completed" in open(os.path.join(out, "log.txt")).read()
    log = open(os.path.join(out, "log.txt")).read()
    assert "took over the stale lock" in log


@pytest.mark.parametrize("workers", [0, 2])
def test_kill9_drill_final_weights_are_bit_exact(workers, drill, reference):
    out, _ = drill(workers)
    ref = reference(workers, method=DRILL_METHOD[workers])
    a, b = weights(ref), weights(out)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ from the uninterrupted run"
    shards = [[load_file(f) for f in read_checkpoint(str(d / "current.pth")).shard_files] for d in (ref, out)]
    assert all(torch.equal(x["state"]["weight"], y["state"]["weight"]) for x, y in zip(*shards))


def test_second_signal_exits_at_once_and_the_folder_is_locked(data, tmp_path):
    out = tmp_path / "o"
    marker = str(tmp_path / "paused")
    argv = flags(data, out)
    argv[argv.index("--save-every-minutes") + 1] = "0"  # the first save is the one the signal asks for
    proc = Proc(argv + ["--test-pause-in-save", marker], out)
    proc.wait_steps(1)
    proc.p.send_signal(signal.SIGTERM)
    proc.wait_file(marker)
    # while it lives, a second launch into its folder is refused in one line
    rc, err = run(flags(data, out, "--auto-resume"), tmp_path / "other")
    ok, lines = one_line(err)
    assert rc == 1 and ok and re.search(rf"{out} is in use by another run: pid {proc.p.pid} on host \S+", lines[0])
    proc.p.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    assert "second SIGTERM: exiting at once without saving" in proc.stderr()
    assert not os.path.exists(out / "current.pth")  # the interrupted first save left no checkpoint


# ----------------------------------------------------------------------------------- damaged files
def test_damaged_current_falls_back_and_existing_folders_are_not_restarted(data, drill, tmp_path):
    import shutil
    src, _ = drill(0)
    out = tmp_path / "o"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("run.lock"))
    with open(out / "current.pth", "r+b") as f:  # 4 KB overwritten in the middle
        f.seek(os.path.getsize(out / "current.pth") // 2)
        f.write(os.urandom(4096))
    rc, err = run(flags(data, out), out)  # no --auto-resume: refused, nothing overwritten
    ok, lines = one_line(err)
    assert rc == 1 and ok and "already holds checkpoints" in lines[0] and "--restart" in lines[0]
    rc, err = run(flags(data, out, "--auto-resume", "--save-freq", "1", epochs=4), out)
    assert rc == 0, err
    log = open(out / "log.txt").read().split("pretrain: single process")[-1]
    assert re.search(r"current\.pth: checksum mismatch: SHA-256 .* refusing to use this checkpoint; resuming from "
                     r"\S+ckpt_epoch_3\.pth \(epoch 3, step 12\) instead", log)
    assert read_checkpoint(str(out / "current.pth")).step == 16


# ----------------------------------------------------------------------------------- full disk
def _mount_tmpfs(path, size):
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    os.makedirs(path, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_full_disk_keeps_the_last_checkpoint_and_reports_one_line(data, tmp_path):
    """Real tmpfs: the first save fits, every later one fails: each is retried once, the second failed
    save in a row stops the run (exit 74, one line naming the last good checkpoint) instead of
    training on unsaved. Injected ENOSPC (no mount allowed): only the third save fails, its retry
    succeeds, the run finishes."""
    out = tmp_path / "disk"
    real = _mount_tmpfs(out, "120k")  # room for one checkpoint (~64 KB), not for a second one next to it
    try:
        proc = Proc(flags(data, out) + ([] if real else ["--test-enospc-at", "3"]), out)
        rc = proc.wait()
        err = proc.stderr()
        log = open(out / "log.txt").read()
        retries = re.findall(r"WARNING checkpoint not saved: \S+current\.pth: \[Errno 28\] No space left on device; "
                             r"retrying once", log)
        assert retries, log[-2000:]
        assert not glob.glob(str(out / "*.tmp"))   # every partial file was removed
        kept = read_checkpoint(str(out / "current.pth"))
        assert kept.verified
        if real:  # the second failed save in a row stops the run, in one line naming the last good checkpoint
            ok, lines = one_line(err)
            assert rc == 74 and ok and lines[0].endswith(
                f"checkpoint not saved: {out}/current.pth: [Errno 28] No space left on device; 2 saves in a row "
                f"failed (each retried once): stopping instead of training on without checkpoints; the last good "
                f"checkpoint is {out}/current.pth (epoch 0, step {kept.step}), resume it with --auto-resume"), err
            assert len(retries) == 2 and kept.step == 1
            assert "the previous checkpoint is kept and training continues (the run stops if 1 more save(s) fail " \
                   "in a row)" in log
            subprocess.run(["mount", "-o", "remount,size=4m", str(out)], check=True)
            rc, err = run(flags(data, out, "--auto-resume"), out)
            assert rc == 0 and resumed_step(out) == kept.step, err
        else:  # only the third save failed: its retry succeeded, the run went on and finished
            assert rc == 0 and len(retries) == 1 and kept.step == STEPS
        assert read_checkpoint(str(out / "current.pth")).step == STEPS
    finally:
        if real:
            subprocess.run(["umount", str(out)], capture_output=True)


# ----------------------------------------------------------------------------------- torchrun
def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []


def _rank_pid(torchrun_pid, rank, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for c in _children(torchrun_pid):
            try:
                with open(f"/proc/{c}/environ", "rb") as f:
                    env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            except OSError:
                continue
            if env.get(b"RANK") == str(rank).encode():
                return c
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} under torchrun {torchrun_pid}")


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_torchrun_rank_killed_then_torchrun_killed(data, reference, tmp_path):
    """PIC with sampled negatives (per-rank files) on 2 processes: rank 1 killed -9, resumed; torchrun
    itself killed -9: the orphaned ranks save and exit; resumed to the end: bit-exact."""
    out = tmp_path / "tr"
    argv = flags(data, out, batch=2, method="PIC_sampled")
    proc = Proc(argv, out, nproc=2)
    proc.wait_steps(random.Random(5).randint(2, 5))
    os.kill(_rank_pid(proc.p.pid, 1), signal.SIGKILL)
    assert proc.wait(60) != 0
    err = proc.stderr()
    assert "lost contact with another process of the run" in err or "exitcode" in err
    ckpt = read_checkpoint(str(out / "current.pth"))  # the committed set verifies
    done = ckpt.step

    proc = Proc(argv + ["--auto-resume"], out, nproc=2)
    proc.wait_steps(2)
    ranks = [_rank_pid(proc.p.pid, r) for r in (0, 1)]
    proc.p.kill()  # torchrun itself
    proc.wait()
    deadline = time.time() + 60
    while any(_alive(p) for p in ranks):
        assert time.time() < deadline, "orphaned ranks kept training"
        time.sleep(0.1)
    log = open(out / "log.txt").read()
    assert resumed_step(out) == done and "the launcher (pid" in log and "died: saving a checkpoint" in log
    stopped = read_checkpoint(str(out / "current.pth"))
    assert stopped.mid_epoch or stopped.step % 4 == 0
    assert not os.path.exists(out / "run.lock")  # released on the way out

    rc, err = run(argv + ["--auto-resume"], out, nproc=2)
    assert rc == 0, err[-3000:]
    assert resumed_step(out) == stopped.step
    ref = reference(0, nproc=2, method="PIC_sampled")
    a, b = weights(ref), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a), "2-process run differs from the uninterrupted one"
    shards = [[load_file(f) for f in read_checkpoint(str(d / "current.pth")).shard_files] for d in (ref, out)]
    assert len(shards[0]) == 2 and all(torch.equal(x["state"]["weight"], y["state"]["weight"])
                                       for x, y in zip(*shards))  # the per-rank classifier tables too


# ----------------------------------------------------------------------------------- requeue
def _lrs(out):
    return [float(re.search(r" lr (\S+) ", line).group(1)) for line in train_lines(out)]


def test_requeue_one_to_two_processes_same_total_batch(data, reference, tmp_path):
    """Stopped (SIGTERM) on 1 process x batch 4, resumed on 2 processes x batch 2: the same schedule
    continues and ends where the uninterrupted run's ends."""
    out = tmp_path / "q"
    proc = Proc(flags(data, out), out)
    proc.wait_steps(6)
    proc.p.send_signal(signal.SIGTERM)
    assert proc.wait() == EXIT_PREEMPTED
    stopped = read_checkpoint(str(out / "current.pth"))
    rc, err = run(flags(data, out, "--auto-resume", batch=2), out, nproc=2)
    assert rc == 0, err[-3000:]
    log = open(out / "log.txt").read()
    assert re.search(r"on 2 process\(es\) instead of 1: same total batch 4", log)
    ref = reference(0)
    a, b = read_checkpoint(str(ref / "current.pth")), read_checkpoint(str(out / "current.pth"))
    assert (b.step, b.samples_seen, b.world_size) == (STEPS, 4 * STEPS, 2)
    sa, sb = load_file(str(ref / "current.pth"))["scheduler"], load_file(str(out / "current.pth"))["scheduler"]
    assert sb["_last_lr"] == sa["_last_lr"]  # same samples seen, same peak: the same lr, exactly
    assert _lrs(out)[-(STEPS - stopped.step):] == _lrs(ref)[-(STEPS - stopped.step):]


def test_requeue_two_to_one_process_same_per_process_batch(data, tmp_path):
    """2 processes x batch 4 (total 8) stopped mid-epoch; on 1 process x batch 4 (total 4) the resume is
    refused in one line; with --allow-batch-change the lr is rescaled and the schedule (reach-min
    form) continues over the remaining samples to the floor at the last step."""
    out = tmp_path / "q"
    argv = flags(data, out, "--cosine-form", "reach-min")
    proc = Proc(argv, out, nproc=2)
    proc.wait_steps(3)
    proc.p.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    proc.wait()
    stopped = read_checkpoint(str(out / "current.pth"))
    assert stopped.world_size == 2 and stopped.total_batch == 8 and stopped.mid_epoch
    rc, err = run(argv + ["--auto-resume"], out)
    ok, lines = one_line(err)
    assert rc == 1 and ok and re.search(r"was trained with a total batch of 8 \(2 process\(es\)\); this run has 4 "
                                        r"\(1 process\(es\)\).*--allow-batch-change", lines[0]), err
    rc, err = run(argv + ["--auto-resume", "--allow-batch-change"], out)
    assert rc == 0, err
    log = open(out / "log.txt").read()
    assert "peak lr rescaled from 0.01562 to 0.007812" in log
    end = read_checkpoint(str(out / "current.pth"))
    assert end.samples_seen == 48 and end.step == stopped.step + (48 - stopped.samples_seen) // 4
    assert _lrs(out)[-1] == pytest.approx(1e-6)


# ----------------------------------------------------------------------------------- run lock
def test_run_lock_refuses_live_holders_and_takes_over_stale_ones(tmp_path, monkeypatch):
    import socket
    import threading

    from contrast.runlock import RunLock, RunLockError
    path = tmp_path / "run.lock"
    mine = RunLock(str(tmp_path))
    assert mine.acquire() is None and json.load(open(path))["pid"] == os.getpid()
    mine.release()
    assert not path.exists()

    def holder(**info):
        path.write_text(json.dumps({"host": socket.gethostname(), "pid": 0, "started": "then", **info}))

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder(pid=child.pid)  # this host, a live process: refused at once
        with pytest.raises(RunLockError, match=rf"in use by another run: pid {child.pid} on host "):
            RunLock(str(tmp_path)).acquire()
    finally:
        child.kill()
        child.wait()
    lock = RunLock(str(tmp_path))  # ... and taken over once that process is gone
    assert "its process no longer exists" in lock.acquire()
    assert json.load(open(path))["pid"] == os.getpid()
    lock.release()

    # another host: a fresh heartbeat is waited for, then refused; a stopped one is taken over
    holder(host="elsewhere", pid=1)
    stop = threading.Event()

    def beat():
        while not stop.wait(0.05):
            os.utime(path)
    thread = threading.Thread(target=beat)
    thread.start()
    try:
        with pytest.raises(RunLockError, match="pid 1 on host elsewhere"):
            RunLock(str(tmp_path), stale_after_s=0.5, heartbeat_s=0.1).acquire()
    finally:
        stop.set()
        thread.join()
    os.utime(path, (time.time() - 3600, time.time() - 3600))
    lock = RunLock(str(tmp_path), stale_after_s=60)
    assert "its heartbeat stopped" in lock.acquire()
    lock.release()

    # a requeued SLURM job (same job id, later restart count) takes over its predecessor's lock at once
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    holder(host="elsewhere", pid=1, slurm_job="42", slurm_restart="0")
    lock = RunLock(str(tmp_path), stale_after_s=600)
    assert "an earlier run of SLURM job 42" in lock.acquire()
    lock.release()
