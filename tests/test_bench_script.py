"""The Fashion-MNIST scripts end to end on tiny synthetic IDX files: scripts/bench_fashion_mnist.sh (two
methods, a few steps), scripts/pic_stability.sh and scripts/fmnist_60k.sh (their mechanics, not their
accuracy; the cheap ``imagenet`` stem where a script takes ``STEM``)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from contrast.runconfig import flat_config
from tests.test_prepare_fashion_mnist import idx_bytes, write

pytestmark = pytest.mark.slow   # end to end: each script starts a dozen processes
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_fashion_mnist(src, num_train=300, num_val=40):
    """IDX files of 28 px images with a class-dependent bright band, so features carry the label."""
    rng = np.random.default_rng(0)
    src.mkdir()
    for prefix, n in (("train", num_train), ("t10k", num_val)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 * label:2 * label + 6, 4:24] = 220
        write(src / f"{prefix}-images-idx3-ubyte", idx_bytes(images))
        write(src / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels))
    return src


def run_script(name, env):
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", name)], env=dict(os.environ, PY=sys.executable, **env),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_bench_script_writes_both_tables_and_curves(tmp_path):
    src = fake_fashion_mnist(tmp_path / "src")
    out = tmp_path / "bench"
    env = dict(os.environ, SRC=str(src), OUT=str(out), PY=sys.executable, METHODS="PIC SimCLR",
               PRETRAIN_LIMIT="64", BUDGET="128", BATCH="16", NUM_NEGATIVE="32", PIC_NEGATIVE="24", WINDOW="32", STRIDE="16",
               LINEAR_EPOCHS="2", STANDARD_LIMIT="300", STANDARD_EPOCHS="1", STANDARD_BATCH="100",
               KNN_K="5 20", WORKERS="0", MONITOR_VAL="20", MONITOR_POINTS="2", STEM="imagenet")
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "bench_fashion_mnist.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rows = {}
    for line in (out / "results.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "method":
            rows[cells[0]] = cells
    assert sorted(rows) == ["PIC", "SimCLR", "baseline-random-init", "baseline-raw-pixels"]
    for name, cells in rows.items():
        accs = [float(c) for c in cells[4:]]  # kNN k=5, k=20, linear top-1, linear top-5
        assert len(accs) == 4 and all(0.0 <= a <= 100.0 for a in accs), cells
    # budget: 128 views over 64 images -> PIC 2 plain epochs = ceil(2 x 64 / 32) = 4 window-epochs,
    # SimCLR (2 views per image) 1 epoch
    assert rows["PIC"][1] == "4/4" and rows["SimCLR"][1] == "1/1"
    pic = json.loads((out / "results" / "PIC.json").read_text())
    assert pic["num_train"] == 300 and pic["num_val"] == 40 and pic["images_seen"] == 4 * 32
    # kNN monitor: PIC's 4 window-epochs every ceil(4 / 2) = 2 -> epochs 2 and 4; SimCLR at its only epoch
    monitor = re.compile(r"knn epoch (\d+): top-1 [\d.]+")
    assert [m.group(1) for m in monitor.finditer((out / "PIC" / "log.txt").read_text())] == ["2", "4"]
    assert [m.group(1) for m in monitor.finditer((out / "SimCLR" / "log.txt").read_text())] == ["1"]
    raw = json.loads((out / "results" / "baseline-raw-pixels.json").read_text())
    assert raw["knn"]["5"]["top1"] > 50.0  # the bands make raw pixels easy to classify

    protocols = (out / "linear_protocols.md").read_text()
    assert re.search(r"^\| PIC \| [\d.]+ \| \d+ \| [\d.]+ \| [\d.]+ \| \d+ \|$", protocols, re.M), protocols
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pic_stability_script_runs_release_and_centred_and_tabulates(tmp_path):
    src = fake_fashion_mnist(tmp_path / "src", num_train=64, num_val=20)
    out = tmp_path / "stab"
    stdout = run_script("pic_stability.sh", dict(SRC=str(src), OUT=str(out), N="64", VAL="20", WINDOW="32",
                                                  STRIDE="16", BATCH="16", EPOCHS="2"))
    table = (out / "table.md").read_text().splitlines()
    # 2 epochs of 64 images over windows of 32 = 4 window-epochs
    assert [line.split("|")[1:3] for line in table[2:]] == [[" release ", " 4/4 "], [" centred ", " 4/4 "]]
    centred = {name: flat_config(str(out / name / "config.json"))["pic_head_center"]
               for name in ("release", "centred")}
    assert centred == {"release": False, "centred": True}
    assert "diag/feat_mean_norm" in (out / "release" / "log.txt").read_text()
    assert "ln N = 4.16" in stdout
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fmnist_60k_script_baselines_run_table_and_curve(tmp_path):
    src = fake_fashion_mnist(tmp_path / "src", num_train=96, num_val=20)
    out = tmp_path / "fm"
    run_script("fmnist_60k.sh", dict(SRC=str(src), OUT=str(out), EPOCHS="2", BATCH="16", WINDOW="64", STRIDE="32",
                                     MONITOR_POINTS="2", LINEAR_EPOCHS="2", WORKERS="0", STEM="imagenet"))
    rows = [line for line in (out / "results_PIC.md").read_text().splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["baseline-raw-pixels", "baseline-random-init", "PIC"]
    config = flat_config(str(out / "PIC" / "config.json"))
    assert config["pic_head_center"] is True and config["use_sliding_window_sampler"] is True
    assert (config["window_size"], config["window_stride"], config["amp_opt_level"]) == (64, 32, "O0")
    # 2 epochs of 96 images = ceil(192 / 64) = 3 window-epochs; the monitor every ceil(3 / 2) = 2 and at the end
    assert config["loop_epochs"] == 3
    monitor = re.compile(r"knn epoch (\d+): top-1 [\d.]+")
    assert [m.group(1) for m in monitor.finditer((out / "PIC" / "log.txt").read_text())] == ["2", "3"]
    assert (out / "knn_curve_PIC.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_script_tune_split_and_vit_rows(tmp_path):
    """scripts/compare_fashion_mnist.sh: TUNE=1 scores on a split of the training images; VIT=1 trains vit_tiny with
    the ViT rows' overrides (mechanics: a tiny budget, the cheap stem)."""
    src = fake_fashion_mnist(tmp_path / "src", num_train=160, num_val=20)
    out = tmp_path / "cmp"
    run_script("compare_fashion_mnist.sh", dict(SRC=str(src), OUT=str(out), METHODS="SimCLR", SEEDS="0", BUDGET="64",
                                                PRETRAIN="64", EVAL_TRAIN="100", EVAL_VAL="20", TUNE="1", TUNE_VAL="20", WORKERS="0",
                                                EXTRA="--set SimCLR --batch-size=16 --pretrain-args --stem=imagenet --baselines raw-pixels"))
    val = (out / "data" / "eval-tune" / "val_map.txt").read_text().splitlines()
    assert len(val) == 20 and not (out / "data" / "eval-test").exists()   # the last 20 of 160 training images
    table = (out / "results.md").read_text()
    assert "| SimCLR |" in table and "| baseline-raw-pixels |" in table
    vit = tmp_path / "vit"
    run_script("compare_fashion_mnist.sh", dict(SRC=str(src), OUT=str(vit), METHODS="PIC", SEEDS="0", BUDGET="128",
                                                PRETRAIN="128", EVAL_TRAIN="100", EVAL_VAL="20", VIT="1", WORKERS="0",
                                                EXTRA="--baselines"))
    config = flat_config(str(vit / "runs" / "PIC-s0" / "config.json"))
    assert (config["arch"], config["patch_size"], config["image_size"], config["image_size2"]) == ("vit_tiny", 4, 32, 16)
