"""benchmarks/gpu_check.py: the plan follows the registry, rows are judged from what the runs record
(GradScaler skips, resume, kNN lines), the budget marks rows NOT RUN, and ``--tiny`` (what CI runs)
passes with the real entry scripts on the CPU."""
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from benchmarks import gpu_check
from benchmarks import gpu_check_report as report
from contrast.models import METHODS, PIC, SimCLR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lines in the format contrast.engine.Trainer logs (log.txt of a run).
LOG = ("[2026-12-06 02:12:21 rank0] INFO train epoch [1/2] iter [5/5] lr 0.0006 loss 3.7896 (2.9355) images/s 44.8 "
       "data 6% mem 933MB eta 0:00:00 pos_sim 0.4576\n"
       "[2026-12-06 02:12:23 rank0] INFO train epoch [2/2] iter [5/5] lr 2.4e-05 loss 4.7394 (4.7141) images/s 60.4 "
       "data 3% mem 940MB eta 0:00:00\n"
       "[2026-12-06 02:12:23 rank0] INFO knn epoch 2: top-1 25.00 top-5 70.00 (best top-1 25.00)\n")


def scaler_state(skips, steps):
    """The state of a real GradScaler after ``steps`` steps of which those in ``skips`` had inf gradients."""
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), 0.1)
    scaler = torch.amp.GradScaler("cpu")
    for i in range(steps):
        loss = model(torch.ones(1, 2)).sum() * (math.inf if i in skips else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    return scaler.state_dict()


@pytest.mark.parametrize("skips,steps", [((), 6), ((0,), 6), ((0, 1, 4), 6), (tuple(range(5)), 5)])
def test_scaler_skipped_counts_the_steps_a_real_gradscaler_skipped(skips, steps):
    assert report.scaler_skipped(scaler_state(set(skips), steps), steps) == len(skips)


def test_scaler_skipped_is_unknown_past_the_growth_interval_or_without_a_scaler():
    assert report.scaler_skipped({"scale": 2.0 ** 16, "growth_interval": 10}, 10) is None
    assert report.scaler_skipped(None, 5) is None


def fp16():
    return gpu_check.Setting("PIC fp16", model="PIC", precision="fp16")


def test_an_fp16_run_whose_steps_were_all_skipped_fails():
    row = report.judge(fp16(), 0, LOG, {"epoch": 2, "step": 10, "scaler": scaler_state(set(range(10)), 10)}, 2)
    assert row["status"] == "FAILED" and "all 10 steps skipped by the GradScaler" in row["error"]
    assert row["skipped_steps"] == 10 and row["scaler_skipped"] == 10


def test_an_fp16_run_with_some_skipped_steps_passes_and_reports_them():
    row = report.judge(fp16(), 0, LOG, {"epoch": 2, "step": 10, "scaler": scaler_state({0, 1, 7}, 10)}, 2)
    assert row["status"] == "ok" and row["skipped_steps"] == 3
    assert row["images_per_s"] == 60.4 and row["peak_mem_mb"] == 940


def test_nonfinite_loss_skips_are_counted_and_a_nonfinite_logged_loss_fails():
    warn = ("[t rank0] WARNING non-finite loss at epoch 1 iteration 3: step skipped on all ranks "
            "(1 in a row, 1 in total)\n")
    s = gpu_check.Setting("MoCo fp32", model="MoCo")
    row = report.judge(s, 0, LOG + warn, {"epoch": 2, "step": 9}, 2)
    assert row["status"] == "ok" and row["skipped_steps"] == 1
    bad = LOG.replace("loss 4.7394 (4.7141)", "loss nan (nan)")
    assert "non-finite loss in the log" in report.judge(s, 0, bad, {"epoch": 2, "step": 10}, 2)["error"]


def test_pretrain_rows_fail_on_what_the_run_did_not_do():
    s = gpu_check.Setting("PIC fp32", model="PIC", knn_monitor=True, kill=True)
    ck = {"epoch": 3, "step": 15}
    resume = "[t rank0] INFO resumed from runs/PIC-fp32/current.pth (epoch 1, step 5, 40 of 120 samples seen)\n" + LOG
    row = report.judge(s, 0, "", ck, 3, killed=True, resume_log=resume)
    assert row["status"] == "ok" and row["resumed_from"] == "epoch 1, step 5" and row["knn_top1"] == 25.0
    assert "ended before the kill" in report.judge(s, 0, "", ck, 3, killed=False, resume_log=resume)["error"]
    assert "no 'resumed from' line" in report.judge(s, 0, LOG, ck, 3, killed=True, resume_log=LOG)["error"]
    no_knn = LOG.replace("knn epoch", "kxx epoch")
    assert "no kNN monitor line" in report.judge(s, 0, "", ck, 3, killed=True,
                                                    resume_log=resume.replace(LOG, no_knn))["error"]
    assert "not 3" in report.judge(s, 0, "", {"epoch": 2, "step": 10}, 3, killed=True, resume_log=resume)["error"]
    crashed = report.judge(gpu_check.Setting("PIC bf16", model="PIC"), 1, "", None, 2)
    assert crashed["status"] == "FAILED" and "exit code 1" in crashed["error"]
    assert "no final checkpoint" in crashed["error"]
    assert "time budget" in report.judge(gpu_check.Setting("x", model="PIC"), -9, LOG, None, 2,
                                            timed_out=True)["error"]


def test_evaluation_rows():
    lin = gpu_check.Setting("main_linear.py", "linear", source="PIC fp32")
    done = LOG + "[t rank0] INFO linear evaluation done: last top-1 20.00 top-5 60.00, best top-1 20.00 (epoch 1)\n"
    assert report.judge(lin, 0, done, None, 1)["top1"] == 20.0
    assert report.judge(lin, 0, LOG, None, 1)["status"] == "FAILED"
    knn = gpu_check.Setting("main_knn.py", "knn", source="PIC fp32")
    result = {"knn": {str(report.KNN_K): {"top1": 35.0}}, "num_train": 40, "num_val": 20, "extract_seconds": 2.0}
    row = report.judge(knn, 0, "", None, 1, knn_json=result)
    assert row["status"] == "ok" and row["images_per_s"] == 30.0
    assert report.judge(knn, 1, "", None, 1)["status"] == "FAILED"


def test_plan_follows_the_registry_and_says_what_a_cpu_cannot_run(monkeypatch):
    class Later(PIC):
        name = "Later"
    monkeypatch.setitem(METHODS, "Later", Later)
    rows = gpu_check.plan(gpu_check.TINY, cuda=False, gpus=0)
    by = {r.name: r for r in rows}
    ran = {r.model for r in rows if not r.not_run and r.kind == "pretrain"}
    assert ran == set(METHODS) and by["Later fp32"].multi_crop and by["PIC fp32"].multi_crop   # their recipe
    assert all(r.not_run == "n/a on cpu" for r in rows if r.precision == "fp16" and r.kind == "pretrain")
    assert [r.kind for r in rows[:3]] == ["pretrain", "linear", "knn"] and rows[0].kill
    assert rows[1].source == rows[2].source == rows[0].name
    gloo = [r for r in rows if r.nproc == 2]
    assert len(gloo) == 1 and gloo[0].kill and gloo[0].resume_nproc == 1
    assert METHODS[gloo[0].model].recipe.sync_batchnorm
    assert all(r.knn_monitor for r in rows if r.precision == "fp32" and r.nproc == 1 and r.kind == "pretrain")


def test_full_plan_on_gpus(monkeypatch):
    one = gpu_check.plan(gpu_check.FULL, cuda=True, gpus=1)
    assert not any(r.not_run for r in one) and not any(r.nproc > 1 for r in one)
    assert all(r.kill for r in one if r.precision == "fp16" and r.kind == "pretrain")
    two = gpu_check.plan(gpu_check.FULL, cuda=True, gpus=2)
    nccl = [r for r in two if r.nproc == 2]
    assert {(r.model, r.multi_crop) for r in nccl} == set(gpu_check.variants())
    assert sum(r.kill for r in nccl) == 1 and nccl[0].resume_nproc == 1


def test_flags_come_from_the_class_declarations():
    s = gpu_check.Setting("MoCov2 multi-crop fp16", model="MoCov2", multi_crop=True, precision="fp16",
                          knn_monitor=True)
    argv = gpu_check.pretrain_argv(s, gpu_check.FULL, "auto", 1)
    assert argv[argv.index("--aug") + 1] == "MultiCrop" and argv[argv.index("--amp-opt-level") + 1] == "O1"
    assert "--knn-monitor" in argv and "--plain-aug" not in argv and int(argv[argv.index("--num-workers") + 1]) >= 2
    swav = gpu_check.pretrain_argv(gpu_check.Setting("SwAV fp32", model="SwAV", multi_crop=True), gpu_check.FULL,
                                   "auto", 1)
    assert "--aug" not in swav   # its own recipe is MultiCrop
    pair = gpu_check.Setting("SimCLR x2", model=SimCLR.name, nproc=2, kill=True, resume_nproc=1)
    two, one = (gpu_check.pretrain_argv(pair, gpu_check.TINY, "cpu", n) for n in (2, 1))
    assert 2 * int(two[two.index("--batch-size") + 1]) == int(one[one.index("--batch-size") + 1])


def test_rows_over_the_budget_are_not_run_and_fail(tmp_path):
    check = gpu_check.Check(gpu_check.TINY, "cpu", str(tmp_path), budget_s=1.0)
    row = check.run(gpu_check.Setting("PIC fp32", model="PIC"), {})
    assert row["status"] == "NOT RUN" and "time budget" in row["reason"] and not os.listdir(tmp_path)
    na = check.run(gpu_check.Setting("PIC fp16", model="PIC", not_run="n/a on cpu"), {})
    assert report.failures([row, na]) == [f"PIC fp32: NOT RUN {row['reason']}"]
    text = report.table([row, na], 8)
    assert "| PIC fp32 | NOT RUN |" in text and "| PIC fp16 | n/a on cpu |" in text


def _gone(pid, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the process tree from /proc")
def test_the_kill_reaches_processes_in_sessions_of_their_own(tmp_path):
    """torchrun starts every rank with start_new_session: killing the launcher's group would spare them."""
    spawn = ("import subprocess, sys, time\n"
             "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
             "print(c.pid, flush=True)\ntime.sleep(120)\n")
    p = subprocess.Popen([sys.executable, "-c", spawn], stdout=subprocess.PIPE, text=True, start_new_session=True)
    child = int(p.stdout.readline())
    assert child in gpu_check.process_tree(p.pid)
    gpu_check.kill_tree(p.pid)
    assert p.wait(timeout=10) == -9 and _gone(child)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a GPU")
def test_full_mode_without_a_gpu_says_so(capsys):
    assert gpu_check.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_bad_arguments_end_in_one_line(tmp_path, capsys):
    assert gpu_check.main(["--tiny", "--methods", "NoSuchMethod"]) == 2
    assert capsys.readouterr().err.startswith("gpu_check: --methods ['NoSuchMethod']: no registered method")
    (tmp_path / "old").write_text("")
    assert gpu_check.main(["--tiny", "--workdir", str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err


# PIC: the first row (killed, resumed, evaluated by main_linear.py / main_knn.py, its ViT row), a memory
# bank and its multi-crop recipe; DINO: a momentum teacher, multi-crop views and sync batch-norm (the gloo
# pair). Every registered method being planned is test_plan_follows_the_registry_...; every method's
# main_pretrain.py run is tests/test_cli_pretrain.py (METHOD_FLAGS).
TINY_METHODS = ["PIC", "DINO"]


@pytest.mark.slow
def test_tiny_mode_runs_the_entry_scripts_for_representative_methods(tmp_path):
    """``gpu_check.sh --tiny`` end to end on two representative methods (all 13 took ~10 minutes of CI)."""
    out = tmp_path / "gpu_check_tiny.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--tiny", "--out", str(out),
                        "--methods", *TINY_METHODS], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = out.read_text()
    assert str(tmp_path) not in text and ROOT not in text   # relative paths only
    doc = json.loads(text)
    rows = {row["name"]: row for row in doc["rows"]}
    assert doc["mode"] == "tiny" and doc["failures"] == [] and "| setting | status |" in r.stdout
    passed = {row["model"] for row in rows.values() if row["status"] == "ok" and row["kind"] == "pretrain"}
    assert passed == set(TINY_METHODS) and doc["methods"] == list(METHODS)
    first = doc["rows"][0]
    assert first["resumed_from"] and "--auto-resume" in first["commands"][1] and first["knn_top1"] >= 0
    assert rows["main_linear.py"]["status"] == rows["main_knn.py"]["status"] == "ok"
    assert all(row["status"] == "n/a on cpu" for row in rows.values() if row["precision"] == "fp16" and row["model"])
    for row in rows.values():
        if row["status"] == "ok" and row["kind"] == "pretrain":
            argv = row["commands"][0]
            assert "--plain-aug" not in argv and argv[argv.index("--num-workers") + 1] == "2", row["name"]
            assert row["images_per_s"] > 0 and row["skipped_steps"] == 0, row["name"]
    assert [row["model"] for row in rows.values() if row["nproc"] == 2 and row["status"] == "ok"] == ["DINO"]


def test_plan_has_a_vit_row_per_method_with_its_arch_flags():
    rows = gpu_check.plan(gpu_check.FULL, cuda=True, gpus=1)
    vit = [r for r in rows if "vit_small" in r.name]
    assert {(r.model, r.multi_crop) for r in vit} == set(gpu_check.variants())
    assert all(r.precision == "bf16" and not r.not_run for r in vit) and sum(r.kill for r in vit) == 1
    argv = gpu_check.pretrain_argv(vit[0], gpu_check.FULL, "cuda", 1)
    assert argv[-4:] == ["--arch", "vit_small", "--patch-size", "8"]
    tiny = [r for r in gpu_check.plan(gpu_check.TINY, cuda=False, gpus=0) if "vit_tiny" in r.name]
    assert [r.not_run for r in tiny][0] == "" and all(r.not_run == "not in --tiny" for r in tiny[1:])
