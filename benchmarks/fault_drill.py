"""Fault drill: one pretraining run killed again and again, measured against an uninterrupted one.

A run (MoCo v2, ResNet-18 at 32 px by default, the default number of DataLoader workers, a
checkpoint after every step; every launch goes through ``tests/fault_runner.py``, whose save hooks
do the pausing) is killed with SIGKILL ``--kills`` times, ``--in-save`` of them while it writes a
checkpoint (paused at a random point: per-rank files written, half of the main file written, or
between the main file's rename and the manifest's), and after ``--damage`` of the kills 4 KB in
the middle of ``current.pth`` are overwritten (once an epoch checkpoint exists to fall back to).
Each time it is relaunched with ``--auto-resume``. Then it gets a SIGTERM, is resumed once more and finishes.

For every relaunch the drill computes on its own, from the files (SHA-256 against the manifests),
which checkpoint a correct resume must use (the committed ``current.pth`` set, or the one whose
interrupted commit only lacks its manifest rename, or, when ``current.pth`` is damaged, the newest
valid ``ckpt_epoch_<e>.pth``) and compares it with the step the run says it resumed from: any
difference is a silent acceptance of a corrupt or mixed checkpoint. It reports the steps each
fault lost, the steps the SIGTERM lost, and whether the final weights equal the uninterrupted run's.

    python benchmarks/fault_drill.py                         # 20 kills (5 in a save), 5 damaged
    python benchmarks/fault_drill.py --tiny --kills 6 --in-save 2 --damage 2   # a quick look

Writes ``benchmarks/results/fault_drill.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

from contrast.checkpoint import read_checkpoint  # noqa: E402
from contrast.option import new_parser  # noqa: E402
from tools.make_demo_dataset import make_dataset  # noqa: E402


def fault_drill_parser() -> argparse.ArgumentParser:
    p = new_parser("benchmarks/fault_drill.py", "Kill a pretraining run again and again (SIGKILL, some inside a "
                   "save, some followed by a damaged current.pth, then a SIGTERM), resume it each time with "
                   "--auto-resume, and compare the result with an uninterrupted run.")
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs")
    p.add_argument("--in-save", type=int, default=5, help="how many of them hit a checkpoint being written")
    p.add_argument("--damage", type=int, default=5, help="kills after which 4 KB of current.pth are overwritten")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: the training "
                   "script's default)")
    p.add_argument("--tiny", action="store_true", help="a 2-conv backbone (tests/fault_runner.py) instead of "
                   "ResNet-18")
    p.add_argument("--images", type=int, default=80, help="training images (synthetic, 10 classes)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step")
    p.add_argument("--epochs", type=int, default=8, help="epochs of the run (long enough for every kill)")
    p.add_argument("--seed", type=int, default=0, help="seed of the run and of the drill's choices")
    p.add_argument("--work-dir", default="output/fault_drill", help="data, reference and drill runs")
    p.add_argument("--out", default="benchmarks/results/fault_drill.json", help="results (JSON)")
    return p


def parse_fault_drill_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = fault_drill_parser()
    args = p.parse_args(argv)
    if args.kills < 1 or not 0 <= args.in_save < args.kills or not 0 <= args.damage < args.kills:
        p.error("need --kills >= 1, 0 <= --in-save < --kills and 0 <= --damage < --kills (the first kill hits "
                "between steps)")
    return args


EXIT_PREEMPTED = 75


def run_flags(args, data: str, out: str) -> List[str]:
    workers = [] if args.num_workers is None else ["--num-workers", str(args.num_workers)]
    return ["--data-dir", data, "--output-dir", out, "--model", "MoCov2", "--aug", "MoCov2", "--mlp-head",
            "--contrast-num-negative", "256", "--feature-dim", "64", "--arch", "resnet18", "--image-size", "32",
            "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--warmup-epoch", "1",
            "--print-freq", "1", "--no-tensorboard", "--base-learning-rate", "0.3", "--amp-opt-level", "O0",
            "--save-every-minutes", "1e-9", "--save-freq", "1", "--keep-last", "2", "--seed", str(args.seed),
            *workers]


class Launch:
    def __init__(self, args, argv: List[str], out: str) -> None:
        """``tests/fault_runner.py`` (its flags inject the pauses in a save), with the real backbone
        unless ``--tiny``."""
        script = os.path.join(ROOT, "tests", "fault_runner.py")
        argv = argv if args.tiny else ["--test-real-backbone", *argv]
        self.out = out
        self.before = len(train_lines(out))
        self.err = os.path.join(out, f"stderr-{time.monotonic_ns()}.txt")
        with open(self.err, "w") as err:
            self.p = subprocess.Popen([sys.executable, script, *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                                      stderr=err, start_new_session=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})

    def steps(self) -> int:
        return len(train_lines(self.out)) - self.before

    def wait_until(self, done, timeout: float = 900) -> bool:
        """Poll until ``done()``; False when the process ended first."""
        deadline = time.time() + timeout
        while not done():
            if self.p.poll() is not None:
                return False
            if time.time() > deadline:
                raise TimeoutError(f"no progress in {timeout} s: {self.out}")
            time.sleep(0.02)
        return True

    def stderr(self) -> str:
        with open(self.err) as f:
            return f.read()


def train_lines(out: str) -> List[str]:
    try:
        with open(os.path.join(out, "log.txt")) as f:
            return [line for line in f if "train epoch" in line]
    except FileNotFoundError:
        return []


def last_resume(out: str) -> Optional[int]:
    with open(os.path.join(out, "log.txt")) as f:
        found = re.findall(r"resumed from \S+ \(epoch \d+, step (\d+)", f.read())
    return int(found[-1]) if found else None


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def valid_step(out: str, manifest_file: str) -> Optional[int]:
    """The step of the checkpoint set ``manifest_file`` describes when every file matches it."""
    try:
        with open(manifest_file) as f:
            manifest = json.load(f)
        ok = all(os.path.isfile(os.path.join(out, e["name"])) and sha256(os.path.join(out, e["name"])) == e["sha256"]
                 for e in manifest["files"])
    except (OSError, ValueError, KeyError):
        return None
    return int(manifest["step"]) if ok else None


def expected_resume(out: str) -> Optional[int]:
    """The step a correct ``--auto-resume`` takes: current (or its pending commit), else the newest
    valid epoch checkpoint."""
    current = os.path.join(out, "current.manifest.json")
    for candidate in (current + ".tmp", current):
        step = valid_step(out, candidate) if os.path.exists(candidate) else None
        if step is not None:
            return step
    steps = [valid_step(out, os.path.join(out, f)) for f in os.listdir(out)
             if re.fullmatch(r"ckpt_epoch_\d+\.manifest\.json", f)]
    steps = [s for s in steps if s is not None]
    return max(steps) if steps else None


def damage(path: str, rng: random.Random) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(rng.randrange(size // 4, size // 2))
        f.write(os.urandom(4096))


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> None:
    cli = sys.argv[1:] if argv is None else list(argv)
    args = parse_fault_drill_args(cli)
    rng = random.Random(args.seed)
    work = os.path.abspath(args.work_dir)
    data = os.path.join(work, "data")
    if not os.path.isdir(os.path.join(data, "train")):
        make_dataset(data, train_per_class=args.images // 10, val_per_class=2, size=40)
    ref, out = os.path.join(work, "reference"), os.path.join(work, "drill")
    for d in (ref, out):
        if os.path.exists(d):
            raise SystemExit(f"{d} exists: use another --work-dir")
        os.makedirs(d)
    started, load_start = time.time(), load()

    t0 = time.time()
    reference = Launch(args, run_flags(args, data, ref), ref)
    if reference.p.wait() != 0:
        raise SystemExit(f"the reference run failed: {reference.stderr()[-2000:]}")
    reference_s = time.time() - t0

    argv = run_flags(args, data, out)
    in_save = set(rng.sample(range(1, args.kills), args.in_save))
    damaged = set(rng.sample(sorted(set(range(args.kills)) - {0}), args.damage))
    events, done, first, pending = [], 0, True, 0
    for k in range(args.kills):
        pause, marker, point = [], os.path.join(out, "paused"), None
        if k in in_save and not first:
            point = rng.choice(["shards", "main", "commit"])
            pause = ["--test-pause-in-save", marker, "--test-pause-at", f"{point}:{rng.randint(1, 3)}"]
        launch = Launch(args, argv + ([] if first else ["--auto-resume"]) + pause, out)
        target = rng.randint(2, 3) if first else rng.randint(1, 3)  # the first kill: once a checkpoint exists
        alive = launch.wait_until((lambda: os.path.exists(marker)) if point else (lambda: launch.steps() >= target))
        if not alive:
            raise SystemExit(f"the run ended before kill {k + 1} (lengthen --epochs): {launch.stderr()[-2000:]}")
        reached = done + launch.steps()
        resumed_from = None if first else last_resume(out)
        launch.p.kill()
        launch.p.wait()
        if os.path.exists(marker):
            os.remove(marker)
        event = {"kill": k + 1, "where": f"inside a save ({point})" if point else "between steps",
                 "step_reached": reached, "resumed_from": resumed_from, "expected_resume": done if not first else None}
        pending += k in damaged
        snapshots = [f for f in os.listdir(out) if re.fullmatch(r"ckpt_epoch_\d+\.manifest\.json", f)]
        if pending and snapshots and os.path.exists(os.path.join(out, "current.pth")):
            # only once an epoch checkpoint exists: without one the right answer is to refuse, which
            # would end the drill
            damage(os.path.join(out, "current.pth"), rng)
            event["damaged"] = "4 KB of current.pth overwritten"
            pending -= 1
        expected = expected_resume(out)
        event["committed"] = expected
        event["lost_steps"] = reached - (expected or 0)
        events.append(event)
        done, first = expected or 0, False

    # the next launch resumes from what the last kill left; then a SIGTERM
    launch = Launch(args, argv + ["--auto-resume"], out)
    launch.wait_until(lambda: launch.steps() >= 2)
    reached = done + launch.steps()
    resumed_from = last_resume(out)
    launch.p.send_signal(signal.SIGTERM)
    rc = launch.p.wait()
    saved = re.search(r"\(step (\d+)\) saved", launch.stderr())
    sigterm = {"exit_code": rc, "step_reached": reached, "saved_step": int(saved.group(1)) if saved else None,
               "stderr_lines": len(launch.stderr().strip().splitlines()), "resumed_from": resumed_from,
               "expected_resume": done}
    sigterm["lost_steps"] = max(0, reached - (sigterm["saved_step"] or 0))
    done = sigterm["saved_step"] or 0
    final = Launch(args, argv + ["--auto-resume"], out)
    final_rc = final.p.wait()
    final_resumed = last_resume(out)

    # the resume that followed each kill is the next event's "resumed_from" (or the SIGTERM / final launch's)
    follow = [e["resumed_from"] for e in events[1:]] + [sigterm["resumed_from"]]
    for e, r in zip(events, follow):
        e["next_launch_resumed_from"] = r
    silent = [e for e in events if e["next_launch_resumed_from"] != e["committed"]]
    if final_resumed != done:
        silent.append({"final launch": final_resumed, "expected": done})
    a = read_checkpoint(os.path.join(ref, "current.pth")).model
    b = read_checkpoint(os.path.join(out, "current.pth")).model
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    summary = {
        "command": " ".join(["python benchmarks/fault_drill.py", *cli]), "run_flags": " ".join(argv).replace(ROOT + os.sep, ""),
        "machine": f"{socket.gethostname()}, {os.cpu_count()} CPUs", "load_start": load_start, "load_end": load(),
        "model": "tiny 2-conv backbone (tests/fault_runner.py)" if args.tiny else
                 f"{argv[argv.index('--model') + 1]}, ResNet-18, 32 px",
        "num_workers": args.num_workers if args.num_workers is not None else "default",
        "kills": args.kills, "inside_a_save": args.in_save,
        "damaged_current": sum("damaged" in e for e in events),
        "resumed": sum(e["next_launch_resumed_from"] is not None for e in events),
        "silent_acceptances": len(silent), "damaged_detected": sum(
            1 for e in events if "damaged" in e and e["next_launch_resumed_from"] == e["committed"]),
        "max_lost_steps_per_kill": max([e["lost_steps"] for e in events if "damaged" not in e] or [0]),
        "max_lost_steps_damaged": max([e["lost_steps"] for e in events if "damaged" in e] or [0]),
        "sigterm": sigterm, "final_exit_code": final_rc,
        "final_weights_bit_exact": not differ, "tensors_differing": f"{len(differ)} of {len(a)}",
        "reference_run_s": round(reference_s, 1), "wall_s": round(time.time() - started, 1), "events": events,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"{summary['kills']} kill -9 ({summary['inside_a_save']} inside a save, {summary['damaged_current']} "
          f"followed by a damaged current.pth), workers {summary['num_workers']}: {summary['resumed']} resumed, "
          f"{summary['silent_acceptances']} silent acceptances of a corrupt or mixed checkpoint, damaged files "
          f"detected {summary['damaged_detected']}/{summary['damaged_current']}, at most "
          f"{summary['max_lost_steps_per_kill']} step(s) lost per kill (at most {summary['max_lost_steps_damaged']} "
          f"when current.pth was damaged: back to the last epoch checkpoint); SIGTERM: exit {rc}, "
          f"{sigterm['lost_steps']} step(s) lost; final weights bit-exact: {summary['final_weights_bit_exact']} "
          f"({summary['tensors_differing']} tensors differ); wall {summary['wall_s']} s, load {load_start} -> "
          f"{summary['load_end']}; {os.path.relpath(args.out)}")


if __name__ == "__main__":
    main()
