"""tools/plot_curves.py on a tiny TensorBoard run and a tiny log.txt run."""
import importlib.util
import os

import numpy as np
import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("plot_curves", os.path.join(ROOT, "tools", "plot_curves.py"))
plot_curves = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot_curves)

LOG = """\
[2025-01-01 10:00:00 rank0] INFO PIC: 40 images, 2 loop epochs x 4 iterations
[2025-01-01 10:00:01 rank0] INFO train epoch [1/2] iter [2/4] lr 0.0075 loss 5.1000 (5.2000) images/s 31.5 data 5% mem 0MB eta 0:00:10
[2025-01-01 10:00:02 rank0] INFO train epoch [1/2] iter [4/4] lr 0.015 loss 4.9000 (5.0000) images/s 33.0 data 4% mem 0MB eta 0:00:08
[2025-01-01 10:00:02 rank0] INFO knn epoch 1: top-1 21.50 top-5 60.25
[2025-01-01 10:00:03 rank0] INFO train epoch [2/2] iter [2/4] lr 0.03 loss 4.5000 (4.6000) images/s 35.0 data 4% mem 0MB eta 0:00:03
[2025-01-01 10:00:04 rank0] INFO train epoch [2/2] iter [4/4] lr 1e-06 loss 4.2500 (4.4000) images/s 34.0 data 4% mem 0MB eta 0:00:00
[2025-01-01 10:00:04 rank0] INFO knn epoch 2: top-1 30.00 top-5 70.00
"""


def make_tb_run(path):
    writer = SummaryWriter(str(path))
    for step in range(1, 11):
        writer.add_scalar("train/loss", 6.0 - 0.3 * step, step)
        writer.add_scalar("train/lr", 0.03 * step / 10, step)
        writer.add_scalar("train/images_per_s", 100.0 + step, step)
    writer.add_scalar("epoch/loss", 4.0, 1)
    for epoch, acc in [(1, 20.0), (2, 35.0)]:
        writer.add_scalar("knn/top1", acc, epoch)
        writer.add_scalar("val/acc1", acc + 5, epoch)
    writer.close()


def test_read_log_and_tensorboard(tmp_path):
    (tmp_path / "logrun").mkdir()
    (tmp_path / "logrun" / "log.txt").write_text(LOG)
    log = plot_curves.load_run(str(tmp_path / "logrun"))
    assert log["train/loss"] == [(2.0, 5.1), (4.0, 4.9), (6.0, 4.5), (8.0, 4.25)]
    assert log["train/lr"] == [(2.0, 0.0075), (4.0, 0.015), (6.0, 0.03), (8.0, 1e-06)]
    assert log["train/images_per_s"][-1] == (8.0, 34.0)
    assert log["knn/top1"] == [(1.0, 21.5), (2.0, 30.0)] and log["knn/top5"] == [(1.0, 60.25), (2.0, 70.0)]

    make_tb_run(tmp_path / "tbrun")
    tb = plot_curves.load_run(str(tmp_path / "tbrun"))
    assert sorted(tb) == ["knn/top1", "train/images_per_s", "train/loss", "train/lr", "val/acc1"]  # epoch/loss dropped
    assert len(tb["train/loss"]) == 10 and tb["train/loss"][0] == (1.0, pytest.approx(5.7))
    assert tb["val/acc1"] == [(1.0, 25.0), (2.0, 40.0)]
    assert {plot_curves.panel_of(k) for k in tb} == {"loss", "lr", "throughput", "accuracy"}


def _has_colour(pixels, hex_colour, tol=12):
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels[..., :3].astype(int) - rgb).max(axis=-1) <= tol).sum())


def test_png_for_two_runs(tmp_path):
    make_tb_run(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "log.txt").write_text(LOG)
    out = tmp_path / "fig" / "curves.png"
    drawn = plot_curves.main(["--runs", str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "tb", "log",
                              "--output", str(out)])
    assert drawn == {"loss": 2, "lr": 2, "throughput": 2, "accuracy": 4}
    pixels = np.array(Image.open(out).convert("RGB"))
    assert pixels.shape[0] > 400 and pixels.shape[1] > 600
    assert _has_colour(pixels, "#1f77b4") > 200 and _has_colour(pixels, "#ff7f0e") > 200  # both runs' lines


def test_errors_name_the_run(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        plot_curves.load_run(str(tmp_path / "empty"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "log.txt").write_text("nothing to see\n")
    with pytest.raises(ValueError, match="junk"):
        plot_curves.load_run(str(tmp_path / "junk"))
    with pytest.raises(SystemExit):
        plot_curves.parse_args(["--runs", "a", "b", "--labels", "x"])


def test_progress_axis_puts_runs_of_different_lengths_on_zero_to_one():
    series = {"train/loss": [(1.0, 5.0), (50.0, 4.0), (200.0, 3.0)], "train/lr": [(1.0, 0.1), (200.0, 0.0)],
              "knn/top1": [(15.0, 60.0), (59.0, 70.0)], "epoch/other": [(3.0, 1.0)]}
    prog = plot_curves.as_progress(series)
    assert prog["train/loss"] == [(1 / 200, 5.0), (0.25, 4.0), (1.0, 3.0)]
    assert prog["train/lr"][-1] == (1.0, 0.0)
    assert prog["knn/top1"] == [(15 / 59, 60.0), (1.0, 70.0)]   # epochs scale by the last epoch, not iteration
    assert prog["epoch/other"] == [(3.0, 1.0)]                   # series not plotted are left alone


LOG_EXTRAS = """\
[2025-01-01 10:00:01 rank0] INFO train epoch [1/1] iter [2/4] lr 0.01 loss 7.0000 (7.1000) images/s 30.0 data 1% mem 0MB eta 0:00:10 pos_sim 0.5 w_norm_mean 0.12 diag/pos_cos 0.41 diag/pos_cos_return nan
[2025-01-01 10:00:02 rank0] INFO train epoch [1/1] iter [4/4] lr 0.01 loss 6.0000 (6.5000) images/s 30.0 data 1% mem 0MB eta 0:00:00 pos_sim -0.25 w_norm_mean 0.13 diag/pos_cos 1e-3
[2025-01-01 10:00:02 rank0] INFO knn epoch 1: top-1 80.00 top-5 99.00
"""


def test_log_extras_scalar_panels_and_reference_lines(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.txt").write_text(LOG_EXTRAS)
    series = plot_curves.load_run(str(tmp_path / "run"))
    assert series["train/pos_sim"] == [(2.0, 0.5), (4.0, -0.25)]
    assert series["train/diag/pos_cos"] == [(2.0, 0.41), (4.0, 0.001)]
    assert series["train/w_norm_mean"] == [(2.0, 0.12), (4.0, 0.13)]
    assert len(series["train/diag/pos_cos_return"]) == 1 and np.isnan(series["train/diag/pos_cos_return"][0][1])
    assert series["train/loss"] == [(2.0, 7.0), (4.0, 6.0)]                   # the standard series are intact
    out = tmp_path / "diag.png"
    drawn = plot_curves.main(["--runs", str(tmp_path / "run"), "--output", str(out), "--panels", "accuracy",
                              "--scalars", "train/diag/pos_cos*", "train/*norm*", "--hline", "86.05=raw pixels",
                              "--hline", "85", "--hline", "train/*norm*:0.125=init"])
    assert drawn == {"accuracy": 2, "train/diag/pos_cos*": 2, "train/*norm*": 1}
    assert out.stat().st_size > 0
    assert plot_curves.parse_hline("86.05=raw pixels") == ("accuracy", 86.05, "raw pixels")
    assert plot_curves.parse_hline("loss:7.6=ln N") == ("loss", 7.6, "ln N")
    assert plot_curves.parse_hline("-1e-3") == ("accuracy", -0.001, "")
    with pytest.raises(ValueError, match="no panel 'lr'"):
        plot_curves.main(["--runs", str(tmp_path / "run"), "--output", str(out), "--panels", "loss",
                          "--hline", "lr:0.1"])
    with pytest.raises(SystemExit):
        plot_curves.parse_args(["--runs", "a", "--hline", "abc"])
    with pytest.raises(SystemExit):
        plot_curves.parse_args(["--runs", "a", "--panels"])
