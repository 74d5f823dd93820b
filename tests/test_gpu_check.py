"""benchmarks/gpu_check.sh in its tiny CPU mode (what CI runs), so the GPU check cannot rot."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from contrast.models import METHODS, PIC

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check   # its dataclasses look their module up
_spec.loader.exec_module(gpu_check)


def test_tiny_mode_runs_every_method_and_writes_the_table(tmp_path):
    out = tmp_path / "gpu_check_tiny.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--tiny", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    expected = {s.name for s in gpu_check.settings()}
    assert {s.model for s in gpu_check.settings()} == set(METHODS) and "PIC multi-crop" in expected
    assert set(doc["checks"]) == expected == set(doc["speed"])
    for name, check in doc["checks"].items():
        assert check["ok"] and len(check["cpu_losses"]) == 2 and check["max_abs_diff"] <= 1e-4, name
    for name, row in doc["speed"].items():
        assert set(row) == {"fp32", "bf16+cl"}, name
        assert all(v["images_per_s"] > 0 and v["finite"] for v in row.values()), name
    assert doc["mode"] == "tiny" and doc["failures"] == [] and "| PIC multi-crop |" in doc["table"]
    assert "| setting |" in r.stdout


def test_settings_follow_the_registry(monkeypatch):
    """A method registered later gets its own rows (and a multi-crop row when it takes multi-crop)."""
    class Later(PIC):
        name = "Later"
    monkeypatch.setitem(METHODS, "Later", Later)
    names = [s.name for s in gpu_check.settings()]
    assert "Later" in names and "Later multi-crop" in names


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a GPU")
def test_full_mode_without_a_gpu_says_so(capsys):
    assert gpu_check.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
