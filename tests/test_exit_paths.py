"""Every way a run ends, it ends (issue 23): real processes, {exit path} x {0, 2 DataLoader workers} x
{one process, ``python -m contrast.launch`` with 2 gloo processes}.

Each cell runs ``tests/fault_runner.py`` (MoCo v2 on a 2-conv backbone, 16 images of 32 px, 2 epochs
of 4 steps, a save after every step) with one fault, in its own session, and asserts

* the whole process tree (launcher, ranks, DataLoader workers) is gone at most ``BOUND_S`` seconds
  after the cause (the signal sent, the launcher killed, or the first line on stderr / "done" in
  the log);
* the exit code and the number of lines on stderr (0 for a normal end, else 1, no traceback);
* the last good checkpoint, where there is one, verifies, and (in the cells with workers: the
  checkpoint does not depend on them) a relaunch with ``--auto-resume`` resumes it and finishes.

The cells run a few at a time (``PARALLEL``); a module fixture runs them all once. The two commands
of the issue's first finding are reproduced by the last two tests.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from benchmarks.gpu_check import children
from contrast.checkpoint import read_checkpoint
from tests.dist_utils import free_port
from tests.synthetic import make_image_folder
from tests.test_faults import _mount_tmpfs, flags, resumed_step, train_lines

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "tests", "fault_runner.py")
BOUND_S = 20.0
PARALLEL = 3
STEPS = 8   # 2 epochs x 4 steps
EPOCHS = 2


# ----------------------------------------------------------------------------------- processes
def _stat(pid):
    """(state, start time) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return rest[0], rest[19]


class Tree:
    """A process and every descendant seen so far (torchrun starts each rank in a session of its own,
    and orphans are re-parented, so the tree is recorded while it is whole: call :meth:`refresh` often)."""

    def __init__(self, root):
        self.known = {}
        self._add(root)

    def _add(self, pid):
        stat = _stat(pid)
        if stat is not None and stat[0] != "Z":
            self.known.setdefault(pid, stat[1])

    def refresh(self):
        for pid in list(self.known):
            if self._is_alive(pid):
                for kid in children(pid):
                    self._add(kid)

    def _is_alive(self, pid):
        stat = _stat(pid)
        return stat is not None and stat[0] != "Z" and stat[1] == self.known[pid]

    def alive(self):
        self.refresh()
        return [pid for pid in self.known if self._is_alive(pid)]

    def signal(self, sig):
        """``sig`` to every live process of the tree, as a scheduler signals every process of a job."""
        for pid in self.alive():
            try:
                os.kill(pid, sig)
            except OSError:
                pass


def stderr_lines(text):
    return [line for line in text.splitlines() if line.strip() and "FutureWarning" not in line
            and "warnings.warn" not in line]


class Launch:
    """One launch of the runner (1 process) or of ``contrast.launch`` (2 processes) in its own session."""

    def __init__(self, argv, out, nproc):
        self.out = str(out)
        os.makedirs(self.out, exist_ok=True)
        self.err_path = os.path.join(self.out, f"stderr-{time.monotonic_ns()}.txt")
        cmd = [sys.executable, RUNNER, *argv] if nproc == 1 else \
            [sys.executable, "-m", "contrast.launch", "--nproc_per_node=2", f"--master_port={free_port()}",
             RUNNER, *argv]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
        self.started = time.monotonic()
        with open(self.err_path, "w") as err:
            self.p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, env=env,
                                      start_new_session=True)
        self.cause = None
        self.tree = Tree(self.p.pid)

    def stderr(self):
        with open(self.err_path) as f:
            return f.read()

    def log(self):
        text = ""
        for name in ("log.txt", "log_rank1.txt"):
            try:
                with open(os.path.join(self.out, name)) as f:
                    text += f.read()
            except FileNotFoundError:
                pass
        return text

    def wait_for(self, predicate, timeout=120):
        deadline = time.monotonic() + timeout
        while not predicate():
            self.tree.refresh()
            assert self.p.poll() is None, f"the run ended early: {self.stderr()}"
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.02)

    def wait_steps(self, n):
        self.wait_for(lambda: len(train_lines(self.out)) >= n)

    def signal_all(self, sig):
        self.tree.signal(sig)
        if self.cause is None:
            self.cause = time.monotonic()

    def finish(self, timeout=150):
        """Wait until every process of the session is gone; returns (exit code, seconds from the cause)."""
        deadline = time.monotonic() + timeout
        while True:
            self.p.poll()
            if self.cause is None and (os.path.getsize(self.err_path) > 0 or "done: checkpoint" in self.log()
                                       or " ERROR " in self.log()):
                self.cause = time.monotonic()
            if self.p.returncode is not None and not self.tree.alive():
                break
            if time.monotonic() > deadline:
                left = self.tree.alive()
                for pid in left:
                    os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"processes {left} still alive {timeout} s after the start: {self.stderr()}")
            time.sleep(0.05)
        gone = time.monotonic()
        return self.p.returncode, gone - (self.cause if self.cause is not None else self.started)


# ----------------------------------------------------------------------------------- exit paths
def _normal(ctx):
    return Launch(ctx.argv(), ctx.out, ctx.nproc)


def _user_error(ctx):
    return Launch(ctx.argv("--resume", os.path.join(ctx.out, "missing.pth")), ctx.out, ctx.nproc)


def _data_error(ctx):
    return Launch(ctx.argv("--strict-data", data=ctx.dirty), ctx.out, ctx.nproc)


def _nonfinite(ctx):
    return Launch(ctx.argv("--test-poison", "2:0,2:1", "--max-nonfinite", "2"), ctx.out, ctx.nproc)


def _saves_fail(ctx):
    return Launch(ctx.argv("--test-enospc-from", "3"), ctx.out, ctx.nproc)


def _final_save_fails(ctx):
    return Launch(ctx.argv("--test-enospc-from", str(STEPS)), ctx.out, ctx.nproc)


def _stop_signal(ctx):
    launch = Launch(ctx.argv(), ctx.out, ctx.nproc)
    launch.wait_steps(2)
    launch.signal_all(signal.SIGTERM)   # as a scheduler does: every process, workers included
    return launch


def _second_signal(ctx):
    marker = os.path.join(ctx.out, "paused")
    launch = Launch(ctx.argv("--test-pause-in-save", marker, "--save-every-minutes", "0"), ctx.out, ctx.nproc)
    launch.wait_steps(1)
    launch.signal_all(signal.SIGTERM)
    launch.wait_for(lambda: os.path.exists(marker))   # the stop's save hangs half-way
    time.sleep(2.5)   # later than a duplicate of the first signal (StopSignals.DUPLICATE_S)
    launch.cause = None
    launch.signal_all(signal.SIGTERM)
    return launch


def _launcher_death(ctx):
    launch = Launch(ctx.argv(), ctx.out, ctx.nproc)
    launch.wait_steps(2)
    launch.tree.refresh()
    launch.p.kill()
    launch.cause = time.monotonic()
    return launch


# path: (start, expected exit code of the launched process, stderr line pattern or None for no line)
PATHS = {
    "normal": (_normal, 0, None),
    "user_error": (_user_error, 1, r"error: .*missing\.pth"),
    "data_error": (_data_error, 1, r"error( \(rank 1\))?: \S+img_0\.png: cannot read or decode image "
                                   r"\(UnidentifiedImageError: cannot identify image file .*\)$"),
    "nonfinite": (_nonfinite, 1, r"error( \(rank 1\))?: stopping: 2 consecutive non-finite losses "
                                 r"\(--max-nonfinite 2\) at epoch 2 iteration 2"),
    "saves_fail": (_saves_fail, 74, r"No space left on device; 2 saves in a row failed \(each retried once\): "
                                    r"stopping .* the last good checkpoint is \S+current\.pth \(epoch 0, step 2\)"),
    "final_save_fails": (_final_save_fails, 1, r"checkpoint not saved: \S+current\.pth: \[Errno 28\] No space left "
                                               r"on device; the last good checkpoint is \S+current\.pth \(epoch 1, "
                                               r"step 7\)$"),
    "stop_signal": (_stop_signal, 75, r"stopped by SIGTERM at epoch \d iteration \d: checkpoint \S+ \(step \d\) "
                                      r"saved; resume with --auto-resume \(exit code 75\)$"),
    "second_signal": (_second_signal, 128 + signal.SIGTERM, r"second SIGTERM: exiting at once without saving"),
    "launcher_death": (_launcher_death, -signal.SIGKILL, r"stopped by the death of its launcher at epoch \d "
                                                         r"iteration \d: checkpoint \S+ \(step \d\) saved"),
}
# what the last good checkpoint holds after each path (None: no checkpoint)
CHECKPOINT_STEP = {"normal": STEPS, "user_error": None, "nonfinite": 4, "saves_fail": 2, "final_save_fails": 7,
                   "second_signal": None}
CELLS = [(path, workers, nproc) for path in PATHS for nproc in (1, 2) for workers in (0, 2)
         if not (path == "launcher_death" and nproc == 1)]


class Cell:
    def __init__(self, path, workers, nproc, root, data, dirty):
        self.path, self.workers, self.nproc = path, workers, nproc
        self.out = os.path.join(root, f"{path}-{workers}w-{nproc}p")
        self.data, self.dirty = data, dirty

    def argv(self, *extra, data=None):
        return flags(data or self.data, self.out, *extra, workers=self.workers, batch=4 // self.nproc, epochs=EPOCHS)

    def run(self):
        start, _, _ = PATHS[self.path]
        launch = start(self)
        self.rc, self.seconds = launch.finish()
        self.stderr = launch.stderr()
        self.log = launch.log()
        self.checkpoint = None
        self.resume = None
        path = os.path.join(self.out, "current.pth")
        if os.path.exists(path):
            self.checkpoint = read_checkpoint(path)   # raises when it does not verify
        if self.checkpoint is not None and self.workers:
            again = Launch(self.argv("--auto-resume"), self.out, self.nproc)
            rc, _ = again.finish()
            self.resume = (rc, again.stderr(), resumed_step(self.out), read_checkpoint(path).step)
        return self


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, request):
    """The cells of the collected tests (all of them, or those ``-k`` selected), run a few at a time."""
    wanted = []
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.module is sys.modules[__name__] and "path" in params:
            wanted.append((params["path"], params["workers"], params["nproc"]))
    root = str(tmp_path_factory.mktemp("exits"))
    data = make_image_folder(os.path.join(root, "data"), num_classes=2, per_class=8, size=(36, 36))
    dirty = make_image_folder(os.path.join(root, "dirty"), num_classes=2, per_class=8, size=(36, 36))
    with open(os.path.join(dirty, "train", "class_1", "img_0.png"), "w") as f:
        f.write("not an image")
    started = time.monotonic()
    cells = [Cell(p, w, n, root, data, dirty) for p, w, n in wanted]
    with ThreadPoolExecutor(PARALLEL) as pool:
        done = list(pool.map(lambda c: c.run(), cells))
    print(f"\nexit-path matrix: {len(done)} cells in {time.monotonic() - started:.0f} s")
    return {(c.path, c.workers, c.nproc): c for c in done}


@pytest.mark.parametrize("path,workers,nproc", CELLS, ids=[f"{p}-{w}w-{n}p" for p, w, n in CELLS])
def test_exit_path(matrix, path, workers, nproc):
    cell = matrix[path, workers, nproc]
    _, code, pattern = PATHS[path]
    where = f"{path} {workers} workers {nproc} process(es): rc {cell.rc}, stderr:\n{cell.stderr}\nlog tail:\n" \
            f"{cell.log[-3000:]}"
    assert cell.seconds <= BOUND_S, f"process tree alive {cell.seconds:.1f} s after the cause; {where}"
    assert cell.rc == code, where
    lines = stderr_lines(cell.stderr)
    assert "Traceback" not in cell.stderr, where
    if pattern is None:
        assert lines == [], where
    else:
        assert len(lines) == 1 and re.search(pattern, lines[0]), where
    step = CHECKPOINT_STEP.get(path, "any")
    if step is None:
        assert cell.checkpoint is None, where
    elif step != "any":
        assert cell.checkpoint is not None and cell.checkpoint.step == step, where
    if path in ("stop_signal", "launcher_death"):   # saved on the way out: nothing lost
        assert cell.checkpoint is not None and cell.checkpoint.step >= 2, where
    if cell.checkpoint is not None and workers:   # intact (it verified) and resumable
        rc, err, resumed, final = cell.resume
        assert rc == 0 and stderr_lines(err) == [], err
        assert resumed == cell.checkpoint.step and final == STEPS, (resumed, final)


# ----------------------------------------------------------------------------------- the issue's commands
def _issue_command(data, out, *extra, workers=1):
    return [sys.executable, os.path.join(ROOT, "main_pretrain.py"), "--data-dir", str(data), "--output-dir", str(out),
            "--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--epochs", "1", "--model", "MoCo",
            "--aug", "MoCov2", "--contrast-num-negative", "32", "--num-workers", str(workers), "--no-tensorboard",
            *extra]


def _run_timed(cmd, out):
    """Run ``cmd`` in its own session; (exit code, one-line stderr, seconds from its first stderr line
    until the whole session is gone)."""
    os.makedirs(out, exist_ok=True)
    err_path = os.path.join(str(out), "stderr.txt")
    with open(err_path, "w") as err:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    first, deadline, tree = None, time.monotonic() + 300, Tree(p.pid)
    while p.poll() is None or tree.alive():
        if first is None and os.path.getsize(err_path) > 0:
            first = time.monotonic()
        if first is not None and time.monotonic() - first > BOUND_S or time.monotonic() > deadline:
            tree.signal(signal.SIGKILL)
            p.wait()
            raise AssertionError(f"still running {BOUND_S} s after its error line: {open(err_path).read()}")
        time.sleep(0.05)
    first = first or time.monotonic()
    return p.returncode, open(err_path).read(), time.monotonic() - first


def _normalise(line):
    return re.sub(r"0x[0-9a-f]+", "0x?", re.sub(r"/\S+/(dirty|o\d)/", "/", line))


def test_dirty_data_with_a_worker_exits_at_once_in_one_line(tmp_path):
    """``--strict-data --num-workers 1`` on a folder with one non-image .png: exit 1 within 20 s, and the
    one line is the one ``--num-workers 0`` prints (not torch's "Caught DatasetError in DataLoader
    worker process 0" block); the worker's traceback is in log.txt."""
    dirty = make_image_folder(str(tmp_path / "dirty"), num_classes=2, per_class=8, size=(36, 36))
    with open(os.path.join(dirty, "train", "class_0", "img_2.png"), "w") as f:
        f.write("not an image")
    lines = {}
    for workers in (1, 0):
        out = tmp_path / f"o{workers}"
        rc, err, seconds = _run_timed(_issue_command(dirty, out, "--strict-data", workers=workers), out)
        assert rc == 1 and seconds <= BOUND_S and len(stderr_lines(err)) == 1 and "Traceback" not in err, err
        lines[workers] = _normalise(stderr_lines(err)[0])
    assert lines[1] == lines[0]
    assert re.fullmatch(r"main_pretrain\.py: error: \S*img_2\.png: cannot read or decode image "
                        r"\(UnidentifiedImageError: .*\)", lines[1]), lines[1]
    log = open(tmp_path / "o1" / "log.txt").read()
    assert "raised in DataLoader worker process 0; its traceback:" in log and "_decode_and_transform" in log


def test_full_disk_exits_at_once_in_one_line(tmp_path):
    """A 60 MB tmpfs as output directory (a ResNet-18 MoCo checkpoint does not fit): the final save fails,
    exit 1 within 20 s, one line naming the error. Where mounting is not allowed, the same through an
    injected ENOSPC on the tiny runner."""
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=8, size=(36, 36))
    out = tmp_path / "full"
    real = _mount_tmpfs(out, "60m")
    try:
        cmd = _issue_command(data, out) if real else \
            [sys.executable, RUNNER, *flags(data, out, "--test-enospc-from", "1", workers=1, epochs=1)]
        rc, err, seconds = _run_timed(cmd, out)
        assert rc == 1 and seconds <= BOUND_S and len(stderr_lines(err)) == 1 and "Traceback" not in err, err
        assert re.search(r"checkpoint not saved: \S+current\.pth: \[Errno 28\] No space left on device; the last "
                         r"good checkpoint is none: nothing was saved yet$", stderr_lines(err)[0]), err
    finally:
        if real:
            subprocess.run(["umount", str(out)], capture_output=True)


def test_rollback_also_restores_the_online_probe(tmp_path):
    """Epoch-end checkpoints only: iteration 0 of epoch 2 trains the online probe, iterations 1 and 2
    diverge, and the rollback to the end of epoch 1 puts the probe (weights and momentum) back to the
    file's along with the network."""
    import torch
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=8, size=(36, 36))
    out = tmp_path / "rolled"
    argv = flags(data, out, "--test-poison", "2:1,2:2", "--max-nonfinite", "2", "--on-divergence", "rollback",
                 "--online-probe", "--save-every-minutes", "0", workers=2, epochs=2)
    done = subprocess.run([sys.executable, RUNNER, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and stderr_lines(done.stderr) == [], done.stderr
    assert "restored " + str(out / "current.pth") + " (epoch 1, step 4)" in open(out / "log.txt").read()
    dump = torch.load(out / "test-rollback-1.pt")
    saved, drifted, restored = (dump[k]["probe"] for k in ("file_monitors", "drifted_monitors", "restored_monitors"))
    assert not torch.equal(drifted["weight"], saved["weight"])   # iteration 0 of epoch 2 trained it
    assert torch.equal(restored["weight"], saved["weight"]) and torch.equal(restored["bias"], saved["bias"])
    momentum = {i: state["momentum_buffer"] for i, state in saved["optimizer"]["state"].items()}
    assert momentum and all(torch.equal(restored["optimizer"]["state"][i]["momentum_buffer"], m)
                            for i, m in momentum.items())


# ----------------------------------------------------------------------------------- launcher reports
def test_launcher_reports_real_failures_of_torch_elastic(tmp_path):
    """``contrast.launch`` on torch's own ``ProcessFailure`` records (no error file: torch makes a
    message up): rank 0 stopped by a signal (75, 128 + N) printed its own line, so the launcher prints
    none; a rank's real error line wins over another rank's "lost contact" line."""
    import json

    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from contrast import launch
    from contrast.engine import LOST_CONTACT

    def failure(rank, code, line=None):
        path = str(tmp_path / f"error-{time.monotonic_ns()}.json")
        if line is not None:
            with open(path, "w") as f:
                json.dump({"message": {"message": line, "extraInfo": {"timestamp": "1"}}}, f)
        return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file=path)

    stopped = {0: failure(0, 75), 1: failure(1, 75)}
    rank, first = launch.first_failure(stopped)
    assert rank == 0 and launch.failure_line("x.py", rank, first) is None
    second = {0: failure(0, 128 + signal.SIGTERM), 1: failure(1, 128 + signal.SIGTERM)}
    assert launch.failure_line("x.py", *launch.first_failure(second)) is None
    assert "rank 1 stopped on a signal" in launch.failure_line("x.py", 1, failure(1, 75))
    errors = {0: failure(0, 1, f"x.py: error: {LOST_CONTACT} (it died or was killed): ..."),
              1: failure(1, 1, "x.py: error (rank 1): /data/a.png: cannot read or decode image")}
    rank, first = launch.first_failure(errors)
    assert rank == 1 and launch.failure_line("x.py", rank, first).endswith("cannot read or decode image")
    crashed = {0: failure(0, 1), 1: failure(1, -9)}   # no error file: torch's made-up message is not a line
    assert launch.failure_line("x.py", *launch.first_failure(crashed)) == \
        "contrast.launch: x.py: rank 0 exited with code 1 (its traceback is above)"


# ----------------------------------------------------------------------------------- divergence rollback
def _lrs(out):
    return [(int(m.group(1)), int(m.group(2)), float(m.group(3))) for m in
            (re.search(r"train epoch \[(\d+)/\d+\] iter \[(\d+)/\d+\] lr (\S+) ", line) for line in train_lines(out))]


def test_rollback_restores_the_last_good_checkpoint_and_skips_the_diverged_batches(tmp_path):
    """Iterations 1 and 2 (0-based) of epoch 2 are poisoned (NaN input, every time they are fed):
    with --max-nonfinite 2 --on-divergence rollback the run restores current.pth in-process (the
    model's tensors right after the rollback equal those of the file, bit for bit), never feeds the
    poisoned batches again, halves the lr, and finishes with finite weights; 2 DataLoader workers
    (the epoch's iterator restarts mid-epoch)."""
    import torch

    from contrast.checkpoint import load_file
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=8, size=(36, 36))
    rolled, ref = tmp_path / "rolled", tmp_path / "ref"
    poison = {(2, 1), (2, 2)}
    argv = lambda out, *extra: flags(data, out, *extra, workers=2, epochs=3)  # noqa: E731
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(lambda: Launch(argv(rolled, "--test-poison", "2:1,2:2", "--max-nonfinite", "2",
                                                "--on-divergence", "rollback", "--rollback-lr-factor", "0.5"),
                                           rolled, 1)),
                pool.submit(lambda: Launch(argv(ref), ref, 1))]
        launches = [r.result() for r in runs]
        results = [launch.finish() for launch in launches]
    for launch, (rc, _) in zip(launches, results):
        assert rc == 0 and stderr_lines(launch.stderr()) == [], launch.stderr()

    log = open(rolled / "log.txt").read()
    assert re.search(rf"WARNING rollback 1: 2 consecutive non-finite losses at epoch 2 \(step 5\); restored "
                     rf"{rolled}/current\.pth \(epoch 1, step 5\); iterations 2, 3 of epoch 2 are skipped; peak lr x "
                     rf"0\.5 \(now x 0\.5 of the configured one\)", log), log
    assert log.count("rollback ") == 1
    dump = torch.load(rolled / "test-rollback-1.pt")
    assert dump["file"].keys() == dump["restored"].keys()
    assert all(torch.equal(dump["file"][k], dump["restored"][k]) for k in dump["file"])   # bit for bit

    import json
    fed = [json.loads(line) for line in open(rolled / "test-batches.rank0.jsonl")]
    poisoned = [b for b in fed if (b["epoch"], b["it"]) in poison]
    assert [b["poisoned"] for b in poisoned] == [True, True] and len(poisoned) == 2   # fed once, never again
    after = fed[fed.index(poisoned[-1]) + 1:]
    assert [(b["epoch"], b["it"]) for b in after] == [(2, 3)] + [(3, i) for i in range(4)]
    assert not any(sorted(b["index"]) == sorted(p["index"]) for b in after if b["epoch"] == 2 for p in poisoned)

    final = load_file(str(rolled / "current.pth"))
    assert all(torch.isfinite(v).all() for v in final["model"].values() if v.is_floating_point())
    assert final["extra"]["divergence"] == {"lr_scale": 0.5, "skipped": {"2": [1, 2]}}
    assert final["step"] == 12 - 2   # the two diverged batches were not steps
    # the lr after the rollback is half the uninterrupted run's at the same samples seen (skipped batches are not
    # steps: the rolled-back run's step k after the rollback is the reference run's step k)
    mine, theirs = _lrs(rolled), _lrs(ref)
    steps_mine = [lr for e, i, lr in mine]
    assert steps_mine[:5] == [lr for _, _, lr in theirs[:5]]
    assert steps_mine[5:] == pytest.approx([0.5 * lr for _, _, lr in theirs[5:10]], rel=2e-3)   # logged: 4 digits
    peak = load_file(str(ref / "current.pth"))["scheduler"]["base_lrs"]
    assert final["scheduler"]["base_lrs"] == [0.5 * b for b in peak]
