"""Mixed precision: ``--amp-opt-level`` resolved for a device (``torch.amp``; replaces Apex).

=========  ===================================================================================
level      meaning
=========  ===================================================================================
``O0``     fp32, no autocast, no GradScaler
``O1``     autocast; fp16 + ``GradScaler`` on CUDA (Apex O1's dynamic loss scaling), bf16 on a CPU
``O2``     bf16 autocast, no GradScaler (Apex O2's fp16 master-weight mode has no torch.amp twin)
``auto``   the release's default O1 on CUDA (fp16 + GradScaler), bf16 autocast (no scaler) for a
           backbone that prefers it (ViTs) on a CUDA device with bf16; fp32 (O0) on a CPU. Without native
           bf16 instructions (AMX, AVX512-BF16) CPU bf16 is emulated and slower than fp32; with
           them it is ~1.5x faster (benchmarks/precision_cpu.py), but torch 2.14.1's CPU bf16
           convolution backward gave garbage weight gradients (~1e33) for ResNet-18's layer4 at
           16 px inputs in 10 of 20 passes on this project's AMX machine, so it stays opt-in (O1)
=========  ===================================================================================

Logits and losses stay fp32 in every mode (the methods disable autocast around them).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

OPT_LEVELS = ("O0", "O1", "O2", "auto")
#: /proc/cpuinfo flags that mean native bf16 arithmetic (Intel AMX, AVX512-BF16 on Intel and AMD Zen 4+).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass
class Precision:
    """``--amp-opt-level`` resolved for a device: autocast dtype (None = fp32) and GradScaler."""

    dtype: Optional[torch.dtype]
    scaler: Optional[torch.amp.GradScaler]

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> set:
    """The CPU feature flags listed in ``path`` (empty where the file does not exist, e.g. macOS)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_fast_bf16() -> Tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and the evidence (for the log).

    Asks torch's own CPU probes (``torch.cpu._is_amx_tile_supported``,
    ``_is_avx512_bf16_supported``, which read CPUID) when this torch has them, else the flags of
    ``/proc/cpuinfo`` (:data:`BF16_CPU_FLAGS`).
    """
    probes = [(name, getattr(torch.cpu, name, None)) for name in ("_is_amx_tile_supported",
                                                                  "_is_avx512_bf16_supported")]
    if all(fn is not None for _, fn in probes):
        found = [name.strip("_").replace("is_", "").replace("_supported", "") for name, fn in probes if fn()]
        return bool(found), f"torch CPU probe: {', '.join(found) if found else 'no AMX, no AVX512-BF16'}"
    flags = _cpuinfo_flags()
    found = [f for f in BF16_CPU_FLAGS if f in flags]
    return bool(found), f"/proc/cpuinfo flags: {', '.join(found) if found else 'no amx_bf16, no avx512_bf16'}"


def cuda_has_bf16() -> bool:
    """Whether the current CUDA device computes bf16 natively (Ampere and newer)."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(opt_level: str, device: torch.device,
                      bf16_probe: Callable[[], Tuple[bool, str]] = cpu_has_fast_bf16, prefer_bf16: bool = False,
                      cuda_bf16_probe: Callable[[], bool] = cuda_has_bf16) -> Tuple[Precision, str]:
    """``(Precision, description)`` for ``--amp-opt-level opt_level`` on ``device``.

    The description says what was picked and, for ``auto``, why (logged by the entry scripts).
    ``bf16_probe`` is :func:`cpu_has_fast_bf16` (a parameter so tests can stand in for the CPU).
    ``prefer_bf16`` (the backbone's ``prefers_bf16``: ViTs): ``auto`` on a CUDA device for which
    ``cuda_bf16_probe()`` is true is bf16 autocast without a GradScaler.
    """
    if opt_level not in OPT_LEVELS:
        raise ValueError(f"--amp-opt-level {opt_level!r} is not supported; choose one of: {', '.join(OPT_LEVELS)}")
    device = torch.device(device)
    if opt_level == "auto":
        if device.type == "cuda" and prefer_bf16 and cuda_bf16_probe():
            return Precision(torch.bfloat16, None), \
                "auto -> bf16 autocast on CUDA (the backbone prefers bf16), no GradScaler"
        if device.type == "cuda":
            return Precision(torch.float16, torch.amp.GradScaler("cuda")), \
                "auto -> O1 on CUDA: fp16 autocast + GradScaler (the release's default, Apex O1)"
        if device.type == "cpu":
            fast, evidence = bf16_probe()
            if fast:
                return Precision(None, None), (f"auto -> fp32 (O0) on the CPU ({evidence}: bf16 would be faster, but "
                                               f"CPU bf16 convolution gradients are not trusted, see "
                                               f"docs/deviations.md; --amp-opt-level O1 opts in)")
            return Precision(None, None), f"auto -> fp32 (O0) on the CPU: bf16 would be emulated ({evidence})"
        return Precision(None, None), f"auto -> fp32 (O0) on {device.type}"
    if opt_level == "O0":
        return Precision(None, None), "O0: fp32"
    if opt_level == "O1" and device.type == "cuda":
        return Precision(torch.float16, torch.amp.GradScaler("cuda")), "O1: fp16 autocast + GradScaler"
    return Precision(torch.bfloat16, None), f"{opt_level}: bf16 autocast, no GradScaler"


def build_precision(opt_level: str, device: torch.device) -> Precision:
    """The :class:`Precision` of :func:`resolve_precision` (without the description)."""
    return resolve_precision(opt_level, device)[0]
