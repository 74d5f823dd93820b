"""tools/pic_stability_table.py on a hand-written log."""
import importlib.util
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("pic_stability_table",
                                               os.path.join(ROOT, "tools", "pic_stability_table.py"))
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)

LOG = """\
[t] train epoch [1/3] iter [1/2] lr 0.01 loss 9.0 (9.0) images/s 1 data 1% mem 0MB eta 0:00:01 pos_sim 0.9
[t] train epoch [1/3] iter [2/2] lr 0.01 loss 8.0 (8.5) images/s 1 data 1% mem 0MB eta 0:00:01 pos_sim 0.2 diag/pos_cos_return nan diag/feat_mean_norm 0.99
[t] knn epoch 1: top-1 70.00 top-5 90.00 (best top-1 70.00)
[t] train epoch [2/3] iter [2/2] lr 0.01 loss 12.0 (11.0) images/s 1 data 1% mem 0MB eta 0:00:01 pos_sim -0.4 diag/pos_cos_return -0.7 diag/feat_mean_norm 1.0
[t] knn epoch 2: top-1 75.50 top-5 91.00 (best top-1 75.50)
[t] train epoch [3/3] iter [2/2] lr 0.0 loss 7.0 (7.5) images/s 1 data 1% mem 0MB eta 0:00:00 pos_sim 0.1 diag/pos_cos_return 0.3 diag/feat_mean_norm 0.5
[t] knn epoch 3: top-1 72.25 top-5 91.00 (best top-1 75.50)
"""


def test_summary_and_table(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "log.txt").write_text(LOG)
    r = tool.summarize(str(tmp_path / "a"))
    assert (r["epochs"], r["planned"]) == (3, 3)
    assert (r["knn_peak"], r["knn_final"]) == (75.5, 72.25)
    assert (r["loss_final"], r["loss_max"]) == (7.5, 11.0)          # epoch means (the running average)
    assert (r["pos_final"], r["pos_min"]) == (0.1, -0.4)             # last line of each epoch only
    assert r["pos_return_min"] == -0.7 and r["feat_mean_norm"] == 0.5
    text = tool.main(["--runs", str(tmp_path / "a"), "--labels", "release", "--output", str(tmp_path / "t.md")])
    assert "| release | 3/3 | 75.50 | 72.25 | 7.50 | 11.00 | 0.100 | -0.400 | -0.700 | 0.500 |" in text
    assert (tmp_path / "t.md").read_text().strip() == text


def test_missing_values_and_errors(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "log.txt").write_text("[t] train epoch [1/1] iter [1/1] lr 0.1 loss 1.0 (1.0) images/s 1\n")
    r = tool.summarize(str(tmp_path / "b"))
    assert math.isnan(r["knn_peak"]) and math.isnan(r["pos_final"])
    assert "| b | 1/1 | - | - | 1.00 | 1.00 | - | - | - | - |" in tool.table([r], ["b"])
    with pytest.raises(FileNotFoundError, match="nothing"):
        tool.summarize(str(tmp_path / "nothing"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "log.txt").write_text("no training here\n")
    with pytest.raises(ValueError, match="no training lines"):
        tool.summarize(str(tmp_path / "c"))
