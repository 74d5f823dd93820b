"""The ``meta`` device as a stand-in accelerator, and a counter of host reads of it.

A training run whose device is ``meta`` keeps every tensor that belongs on the accelerator on
``meta`` and every host tensor on the CPU, as on a GPU. A CPU tensor that meets a meta tensor in
an op raises "Tensor on device cpu is not on the expected device meta!": the error a CUDA run
gives for a module or tensor left on the host. Meta tensors hold no data, so the probe patches
what reads their values (``item``, ``tolist``, ``bool()``, a copy to the host, ...): each read
is counted as a host-device synchronisation (it is one on CUDA) and answers zeros. Reads of CPU
tensors are host work and are not counted. It also maps what meta lacks: a generator (a CPU one,
the augmentation draws on the generator's device and moves the draws) and ``torch.autocast``
(device type ``cpu``).
"""
from __future__ import annotations

import traceback
from contextlib import contextmanager
from typing import Iterator, List

import torch

META = torch.device("meta")
_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "nonzero", "cpu")


def _zeros_like_host(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros(t.shape, dtype=t.dtype)


_REAL_GENERATOR = torch.Generator


class _AnyGenerator(type(_REAL_GENERATOR)):
    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, _REAL_GENERATOR)


class _HostGenerator(_REAL_GENERATOR, metaclass=_AnyGenerator):
    """``torch.Generator(device="meta")`` gives a CPU generator (meta has none)."""

    def __new__(cls, device="cpu"):
        return _REAL_GENERATOR(device="cpu" if torch.device(device).type == "meta" else device)


class SyncProbe:
    """Counts host reads of meta tensors (``count``; ``sites``: where each happened)."""

    def __init__(self) -> None:
        self.count = 0
        self.sites: List[str] = []

    def hit(self, what: str) -> None:
        self.count += 1
        frame = next((f for f in reversed(traceback.extract_stack()[:-2]) if "device_probe" not in f.filename),
                     None)
        self.sites.append(f"{what} at {frame.filename.split('/')[-1]}:{frame.lineno} ({frame.line})"
                          if frame else what)


@contextmanager
def meta_device(monkeypatch) -> Iterator[SyncProbe]:
    """Patch torch so that a run on ``meta`` goes through (see the module docstring)."""
    probe = SyncProbe()
    T = torch.Tensor
    originals = {name: getattr(T, name) for name in _HOST_READS + ("to",)}

    def reader(name):
        def read(self, *args, **kwargs):
            if not self.is_meta:
                return originals[name](self, *args, **kwargs)
            probe.hit(name)
            host = _zeros_like_host(self)
            if name == "cpu":
                return host
            if name == "nonzero":
                return torch.zeros((0, self.dim()), dtype=torch.long, device=META)
            return originals[name](host, *args, **kwargs)
        return read

    def to(self, *args, **kwargs):
        parsed = {k: v for k, v in kwargs.items() if k != "copy"}
        device, dtype = torch._C._nn._parse_to(*args, **parsed)[:2]
        if self.is_meta and device is not None and device.type == "cpu":
            probe.hit("to(cpu)")
            return torch.zeros(self.shape, dtype=dtype or self.dtype)
        return originals["to"](self, *args, **kwargs)

    for name in _HOST_READS:
        monkeypatch.setattr(T, name, reader(name))
    monkeypatch.setattr(T, "to", to)
    real_nonzero = torch.nonzero
    monkeypatch.setattr(torch, "nonzero", lambda t, *a, **k: t.nonzero(*a, **k) if t.is_meta
                        else real_nonzero(t, *a, **k))
    real_equal = torch.equal

    def equal(a, b):
        if a.is_meta or b.is_meta:
            probe.hit("equal")
            return a.shape == b.shape
        return real_equal(a, b)
    monkeypatch.setattr(torch, "equal", equal)
    monkeypatch.setattr(T, "equal", equal)
    monkeypatch.setattr(torch, "Generator", _HostGenerator)
    real_autocast = torch.autocast

    def autocast(device_type, *args, **kwargs):
        return real_autocast("cpu" if device_type == "meta" else device_type, *args, **kwargs)
    monkeypatch.setattr(torch, "autocast", autocast)
    yield probe
