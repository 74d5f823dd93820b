"""--amp-opt-level resolution, in particular ``auto`` on CUDA and on CPUs with and without native bf16."""
from contextlib import nullcontext

import pytest
import torch

from contrast import precision as P
from contrast.precision import Precision, build_precision, cpu_has_fast_bf16, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _cuda_scaler_warning():
    """GradScaler("cuda") warns (and disables itself) on a machine without CUDA."""
    return pytest.warns(UserWarning) if not torch.cuda.is_available() else nullcontext()


def test_auto_on_cuda_is_the_releases_o1():
    with _cuda_scaler_warning():
        p, why = resolve_precision("auto", CUDA, bf16_probe=lambda: pytest.fail("no CPU probe on CUDA"))
    assert p.dtype is torch.float16 and isinstance(p.scaler, torch.amp.GradScaler)
    assert "O1" in why and "GradScaler" in why


def test_auto_on_a_cpu_with_native_bf16_stays_fp32_and_says_why():
    """bf16 autocast on the CPU is opt-in: torch 2.14.1's CPU bf16 convolution backward returned garbage
    weight gradients (~1e33) for ResNet-18's layer4 at 16 px inputs in 10 of 20 passes here."""
    p, why = resolve_precision("auto", CPU, bf16_probe=lambda: (True, "flags: amx_bf16"))
    assert p.dtype is None and p.scaler is None and "amx_bf16" in why and "O1 opts in" in why
    with p.autocast(CPU):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.float32


def test_auto_on_a_cpu_without_native_bf16_is_fp32():
    p, why = resolve_precision("auto", CPU, bf16_probe=lambda: (False, "flags: none"))
    assert p.dtype is None and p.scaler is None and "fp32" in why and "flags: none" in why
    with p.autocast(CPU):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.float32


def test_auto_on_another_device_is_fp32():
    p, why = resolve_precision("auto", torch.device("meta"), bf16_probe=lambda: pytest.fail("not a CPU"))
    assert p.dtype is None and "fp32" in why


def test_explicit_levels_keep_their_meaning():
    assert resolve_precision("O0", CPU)[0] == Precision(None, None)
    for level in ("O1", "O2"):
        p, why = resolve_precision(level, CPU)
        assert p.dtype is torch.bfloat16 and p.scaler is None and why.startswith(level)
    with _cuda_scaler_warning():
        assert isinstance(resolve_precision("O1", CUDA)[0].scaler, torch.amp.GradScaler)
    assert resolve_precision("O2", CUDA)[0].scaler is None
    assert build_precision("O0", CPU).dtype is None
    with pytest.raises(ValueError, match="--amp-opt-level 'O3'.*O0, O1, O2, auto"):
        resolve_precision("O3", CPU)


def test_probe_uses_torchs_cpu_checks(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert cpu_has_fast_bf16() == (True, "torch CPU probe: amx_tile")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    fast, why = cpu_has_fast_bf16()
    assert not fast and "no AMX" in why


def test_probe_falls_back_to_proc_cpuinfo(monkeypatch, tmp_path):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n")
    read = P._cpuinfo_flags
    monkeypatch.setattr(P, "_cpuinfo_flags", lambda: read(str(cpuinfo)))
    assert cpu_has_fast_bf16() == (True, "/proc/cpuinfo flags: avx512_bf16")
    cpuinfo.write_text("flags\t\t: fpu sse avx2 avx512f\n")
    assert cpu_has_fast_bf16()[0] is False
    monkeypatch.setattr(P, "_cpuinfo_flags", lambda: read(str(tmp_path / "missing")))
    fast, why = cpu_has_fast_bf16()
    assert not fast and "no amx_bf16" in why
