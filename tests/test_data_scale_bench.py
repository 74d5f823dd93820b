"""benchmarks/data_scale.py runs end to end at tiny sizes and reports every measurement."""
from __future__ import annotations

import json

from benchmarks import data_scale


def test_benchmark_smoke(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert data_scale.main(["--sizes", "3000", "--sampler-sizes", "20000", "--shards", "2", "--reads", "300",
                            "--workdir", str(tmp_path), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    (d,) = res["datasets"]
    for key in ("baseline", "ours", "ours_sharded"):
        assert d[key]["reads_per_s"] > 0 and d[key]["first_read_ms"] >= 0 and "private_1000_mb" in d[key]
    assert d["ours_index"]["index_mb"] > 0 and d["ours_index_shuffled_map"]["build_s"] > 0
    (s,) = res["samplers"]
    assert s["ours_window"]["count"] == s["baseline_window"]["count"] == 2500  # W clamped to N, 8 ranks
    assert s["ours_default"]["count"] == s["baseline_default"]["count"] == 2500
    assert s["ours_default"]["first"] == s["baseline_default"]["first"]  # same DistributedSampler order
    table = capsys.readouterr().out
    assert "| 3,000 | previous (zipfile) |" in table and "| 20,000 | sliding window, ours |" in table
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # synthetic data deleted
