"""``benchmarks/train_step.py --loop``: the old loop's host reads emulated next to the new loop."""
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_step", os.path.join(ROOT, "benchmarks", "train_step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_loop_benchmark_writes_both_rates(tmp_path):
    rows = _bench().main(["--loop", "--quick", "--methods", "SimCLR", "--precisions", "fp32", "--channels-last", "0",
                          "--iters", "2", "--device", "cpu", "--output-json", str(tmp_path / "train_step.json")])
    data = json.loads((tmp_path / "train_step_loop.json").read_text())
    assert data["rows"] == rows and rows[0]["steps_per_s_old"] > 0 and rows[0]["steps_per_s_new"] > 0
    assert rows[0]["ratio"] == pytest.approx(rows[0]["steps_per_s_new"] / rows[0]["steps_per_s_old"], rel=1e-2)

