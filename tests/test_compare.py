"""python -m contrast.compare: plan and budget, evaluation kinds, time budget, the table's statistics
(against hand-written values), the small-scale recipe files, and a 2-method, 2-seed comparison killed
in the middle (SIGKILL of its process group) that finishes on the rerun without redoing a finished run."""
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from contrast.compare.evaluations import EvalSettings, plan_evaluations
from contrast.compare.plan import Budget, Job, Settings, build_jobs, parse_methods
from contrast.compare.report import collect, markdown, mean_std, write_tables
from contrast.compare.runner import Runner, write_json
from contrast.option import parse_pretrain_args
from tests.synthetic import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = os.path.join(ROOT, "scripts", "configs", "fmnist")


# --------------------------------------------------------------------------- statistics and table
def test_mean_std_against_hand_values():
    mean, std = mean_std([80.0, 82.0])
    assert mean == 81.0 and abs(std - math.sqrt(2.0)) < 1e-12          # ((1 + 1) / (2 - 1)) ** 0.5
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and abs(std - 1.2909944487358056) < 1e-12         # (5 / 3) ** 0.5
    mean, std = mean_std([70.0])
    assert mean == 70.0 and math.isnan(std)


def _result(folder, row, seed, kind, metrics, **extra):
    write_json(os.path.join(folder, "result.json"), {"name": os.path.basename(folder), "row": row, "seed": seed,
                                                    "kind": kind, "metrics": metrics, "eval_seconds": 10.0, **extra})


def test_table_has_mean_std_per_row_and_the_baselines(tmp_path):
    runs = tmp_path / "runs"
    folders = {}
    for row, kind, values in (("baseline-raw-pixels", "baseline", [(83.0, 50.0), (83.0, 52.0)]),
                              ("M", "pretrain", [(80.0, 60.0), (84.0, 61.0)])):
        for seed, (knn, probe) in enumerate(values):
            folder = str(runs / f"{row}-s{seed}")
            extra = dict(images_seen=1000 + seed * 100, epoch=4, loop_epochs=4, pretrain_seconds=120.0 + 60 * seed,
                         stopped_by="schedule") if kind == "pretrain" else {}
            _result(folder, row, seed, kind, {"kNN top-1 k=20": knn, "probe top-1": probe}, **extra)
            folders.setdefault(row, []).append(folder)
    folders["N"] = [str(runs / "N-s0"), str(runs / "N-s1")]   # not run yet
    rows = collect(folders)
    text = write_tables(rows, str(tmp_path), "title")
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")]
             for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")}
    # M: kNN (80 + 84) / 2 = 82, std sqrt(8) = 2.83; probe 60.5 +- sqrt(0.5) = 0.71; images 1050 +- 70.71;
    # pretrain (2 + 3) / 2 = 2.5 min +- sqrt(0.5) = 0.7
    assert lines["M"] == ["M", "2/2", "1050 ± 71", "4/4", "2.5 ± 0.7", "10 ± 0", "schedule", "82.00 ± 2.83",
                          "60.50 ± 0.71"]
    assert lines["baseline-raw-pixels"][-2:] == ["83.00 ± 0.00", "51.00 ± 1.41"]
    assert lines["N"] == ["N", "0/2", "-", "-", "-", "-", "-", "-", "-"]
    table = json.loads((tmp_path / "results.json").read_text())
    m = next(r for r in table["rows"] if r["method"] == "M")
    assert m["metrics"]["kNN top-1 k=20"] == {"mean": 82.0, "std": round(math.sqrt(8), 4), "values": [80.0, 84.0]}
    csv_rows = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_rows[0].split(",")[-4:] == ["kNN top-1 k=20 mean", "kNN top-1 k=20 std", "probe top-1 mean",
                                           "probe top-1 std"]
    assert csv_rows[2].split(",")[-4:] == ["82.0", str(round(math.sqrt(8), 4)), "60.5", str(round(math.sqrt(.5), 4))]
    assert markdown(collect({"one": [folders["M"][0]]})).splitlines()[-1].endswith("| 80.00 | 60.00 |")  # 1 seed


# --------------------------------------------------------------------------- plan and budget
def _settings(tmp_path, methods, budget, **kw):
    return Settings(str(tmp_path), "DATA", True, "full", 0, "cpu", budget, (0, 1), tuple(methods), **kw)


def test_budget_in_images_gives_epochs_window_epochs_monitor_and_flag_order(tmp_path):
    methods = parse_methods(["PIC", "SC=SimCLR"], FMNIST, [["SC", "--contrast-temperature 0.5"]])
    assert methods[0].recipe_file == os.path.join(FMNIST, "PIC.yaml")
    assert methods[1].recipe_file == os.path.join(FMNIST, "SimCLR.yaml")   # no SC.yaml: the method's
    s = _settings(tmp_path, methods, Budget(images=2500), pretrain_args=("--batch-size", "64"))
    jobs = build_jobs(s, parse_pretrain_args, num_images=1000)
    assert [j.name for j in jobs] == ["baseline-raw-pixels-s0", "baseline-raw-pixels-s1", "baseline-random-init-s0",
                                      "baseline-random-init-s1", "PIC-s0", "PIC-s1", "SC-s0", "SC-s1"]
    pic, sc = jobs[4], jobs[6]
    # ceil(2500 / 1000) = 3 plain epochs; PIC's window of 512: ceil(3 * 1000 / 512) = 6 window-epochs,
    # the monitor every ceil(6 / 4) = 2
    assert (pic.plain_epochs, pic.loop_epochs, sc.loop_epochs) == (3, 6, 3)
    assert pic.pretrain_argv[pic.pretrain_argv.index("--knn-freq") + 1] == "2"
    assert sc.pretrain_argv[sc.pretrain_argv.index("--knn-freq") + 1] == "1"
    args = parse_pretrain_args(sc.pretrain_argv)
    assert (args.model, args.contrast_temperature, args.batch_size, args.epochs, args.seed) == ("SimCLR", 0.5, 64, 3, 0)
    assert args.output_dir == os.path.join(str(tmp_path), "runs", "SC-s0") and args.auto_resume
    assert sc.pretrain_argv[-2:] == [args.output_dir, "--auto-resume"]
    # baselines at the recipe's 28 px, whole image, ResNet-18 small-maxpool
    assert jobs[0].encoder_flags == ["--raw-pixels", "--image-size", "28", "--val-crop-fraction", "1.0"]
    assert jobs[2].encoder_flags[:5] == ["--random-init", "--arch", "resnet18", "--stem", "small-maxpool"]


def test_plan_refusals_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="--set SimCLR: --epochs is set by the comparison"):
        parse_methods(["SimCLR"], "", [["SimCLR", "--epochs 3"]])
    with pytest.raises(ValueError, match="no registered method"):
        parse_methods(["X=NoSuchMethod"], "", [])
    with pytest.raises(ValueError, match="--set Y: no such --methods label"):
        parse_methods(["SimCLR"], "", [["Y", "--crop 0.3"]])
    with pytest.raises(ValueError, match="needs --epochs"):
        Budget(minutes=5)
    assert Budget(minutes=5, epochs=100).plain_epochs(10) == 100 and Budget(images=10).plain_epochs(3) == 4


def test_a_flag_string_of_one_flag_is_a_value_not_an_option():
    from contrast.compare.cli import parse_args
    args = parse_args(["--methods", "PIC", "P2=PIC", "--data-dir", "d", "--out", "o", "--set", "P2", "--pic-head-center",
                       "--pretrain-args", "--no-tensorboard", "--knn-args", "--knn-t 0.1", "--seeds", "0"])
    assert [label for label, _ in args.set] == ["P2"] and [f.strip() for _, f in args.set] == ["--pic-head-center"]
    assert (args.pretrain_args.strip(), args.knn_args.strip(), args.seeds) == ("--no-tensorboard", "--knn-t 0.1", [0])
    assert [(m.label, m.flags) for m in parse_methods(args.methods, "", args.set)] == \
        [("PIC", ()), ("P2", ("--pic-head-center",))]


def test_evaluation_kinds_pluggable_and_refused_without_their_flags(tmp_path):
    s = EvalSettings("py", ROOT, "E", False, "no", 0, "cpu", label_fraction=0.1)
    with pytest.raises(ValueError, match="--eval finetune: main_linear.py has no --finetune --label-fraction flag"):
        plan_evaluations(["finetune"], s, available=frozenset({"--pretrained-model"}))
    evs = plan_evaluations(["knn", "probe", "finetune"], s,
                           available=frozenset({"--finetune", "--label-fraction"}))
    assert [e.name for e in evs] == ["probe", "finetune"]   # the probe's call gives the kNN columns too
    from contrast.compare.evaluations import Target
    cmd = evs[1].command(Target(["--pretrained-model", "C"], "C", 3, "W"))
    assert cmd[1] == "--finetune" and cmd[cmd.index("--label-fraction") + 1] == "0.1"
    assert cmd[-3:] == ["--output-dir", "W", "--auto-resume"]
    with pytest.raises(ValueError, match="unknown"):
        plan_evaluations(["nope"], s, available=frozenset())


# --------------------------------------------------------------------------- time budget (fake processes)
class FakeProc:
    """A pretraining process that runs until SIGTERM, then exits 75 (saved); ``clock`` advances 1 s per poll."""

    def __init__(self, clock):
        self.clock, self.signals = clock, []

    def wait(self, timeout):
        if self.signals:
            return 75
        self.clock[0] += 1.0
        raise subprocess.TimeoutExpired("x", timeout)

    def send_signal(self, s):
        self.signals.append(s)


def test_time_budget_stops_the_run_and_counts_over_sittings(tmp_path):
    now = [0.0]
    procs = []

    def popen(argv, **kw):
        procs.append(FakeProc(now))
        return procs[-1]

    job = Job("M-s0", "M", 0, "pretrain", str(tmp_path / "M-s0"), ["--x"])
    os.makedirs(job.folder)
    write_json(os.path.join(job.folder, "clock.json"), {"seconds": 50.0})   # an earlier sitting used 50 s
    runner = Runner(str(tmp_path), "py", ROOT, Budget(minutes=1.5, epochs=10), [], popen=popen, clock=lambda: now[0])
    done = runner.pretrain(job)
    assert procs[0].signals == [signal.SIGTERM]   # once, after 90 - 50 = 40 s
    assert done["stopped_by"] == "time" and done["seconds"] == pytest.approx(90.0, abs=1.0)
    assert json.load(open(os.path.join(job.folder, "pretrain.json")))["stopped_by"] == "time"
    assert json.load(open(os.path.join(job.folder, "clock.json")))["seconds"] == pytest.approx(90.0, abs=1.0)


# --------------------------------------------------------------------------- recipe files
@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(FMNIST, "*.yaml"))), ids=os.path.basename)
def test_fmnist_recipe_file_parses_and_gives_a_reason_for_each_value(path):
    with open(path) as f:
        lines = f.read().splitlines()
    keys = yaml.safe_load("\n".join(lines))
    assert keys["model"] == os.path.basename(path)[:-5]
    args = parse_pretrain_args(["--config", path])
    for key, value in keys.items():
        assert getattr(args, key) == value or (isinstance(value, list) and tuple(value) == tuple(getattr(args, key)))
    for i, line in enumerate(lines):   # each block of keys has its reason in the comment above it
        if line and not line.startswith("#"):
            j = i
            while j > 0 and lines[j - 1] and not lines[j - 1].startswith("#"):
                j -= 1
            assert j > 0 and lines[j - 1].startswith("#"), f"{path}:{i + 1}: {line}: no reason above it"


# --------------------------------------------------------------------------- end to end
def _events(out):
    path = os.path.join(out, "compare_log.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


@pytest.mark.slow
def test_comparison_killed_in_the_middle_finishes_without_redoing_a_finished_run(tmp_path):
    data = make_image_folder(str(tmp_path / "data"), num_classes=3, per_class=8, size=(16, 16), formats=("png",))
    out = str(tmp_path / "cmp")
    cmd = [sys.executable, "-m", "contrast.compare", "--methods", "SimCLR", "InstDisc", "--seeds", "0", "1",
           "--data-dir", data, "--out", out, "--num-workers", "0", "--device", "cpu", "--budget-images", "48",
           "--eval", "knn", "probe", "--knn-k", "3", "--monitor-k", "3", "--monitor-points", "1", "--probe-epochs", "1",
           "--pretrain-args", "--arch resnet18 --stem small --image-size 16 --batch-size 8 --val-crop-fraction 1.0 "
                              "--mlp-hidden-dim 16 --warmup-epoch 0 --print-freq 1 --no-tensorboard "
                              "--save-every-minutes 0",
           "--set", "InstDisc", "--contrast-num-negative 8"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 300
    try:
        while True:   # kill once SimCLR-s0 is finished and SimCLR-s1 is pretraining
            ev = _events(out)
            if any(e["run"] == "SimCLR-s0" and e["stage"] == "result" for e in ev) and \
                    any(e["run"] == "SimCLR-s1" and e["stage"] == "pretrain" for e in ev):
                break
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline
            time.sleep(0.1)
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    runs = os.path.join(out, "runs")
    assert not os.path.isfile(os.path.join(runs, "SimCLR-s1", "result.json"))
    finished = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(runs, "*", "result.json"))}
    assert os.path.join(runs, "SimCLR-s0", "result.json") in finished and len(finished) == 5   # 4 baselines too

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    for path, mtime in finished.items():
        assert os.stat(path).st_mtime_ns == mtime, f"{path} was rewritten"
    starts = [(e["run"], e["stage"]) for e in _events(out) if e["event"] == "start"]
    assert starts.count(("SimCLR-s0", "pretrain")) == 1 and starts.count(("SimCLR-s0", "eval:probe")) == 1
    assert starts.count(("SimCLR-s1", "pretrain")) == 2        # interrupted, then resumed
    assert all(starts.count(s) == 1 for s in starts if s[0] != "SimCLR-s1"), starts
    assert "knn" not in {s[1] for s in starts}                  # the probe's call gave the kNN columns
    assert len(glob.glob(os.path.join(runs, "*", "result.json"))) == 8

    rows = {line.split("|")[1].strip(): line for line in open(os.path.join(out, "results.md"))
            if line.startswith("| ") and not line.startswith("| method")}
    assert list(rows) == ["baseline-raw-pixels", "baseline-random-init", "SimCLR", "InstDisc"]
    for line in rows.values():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert cells[1] == "2/2" and all(" ± " in c for c in cells[-2:]), line   # kNN k=3, probe
    simclr = [c.strip() for c in rows["SimCLR"].strip().strip("|").split("|")]
    assert simclr[2] == "48 ± 0" and simclr[3] == "2/2" and simclr[6] == "schedule"   # 48 images: 2 epochs of 24
    result = json.load(open(os.path.join(runs, "SimCLR-s1", "result.json")))
    assert result["images_seen"] == 48 and result["epoch"] == 2
    assert open(os.path.join(out, "curves.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
