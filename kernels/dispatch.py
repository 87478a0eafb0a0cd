"""Which kernel runs a quantized layer: decided here, once per layer, at load time.

Order of preference per platform (a backend is used only where it supports the
layer's scheme, shape and dtype, and the fallback is always correct):

* CUDA: vLLM's own kernel layers first (``vllm_kernels``): w4a16 -> the kernel vLLM's
        mixed-precision selection picks (Machete on Hopper, Marlin from Turing on, ...;
        ``vllm_mp``), w8a8 -> its int8 scaled-mm selection (CUTLASS; ``vllm_scaled_mm``);
        then qvlm's Triton kernels (w4a16, w8a8, w4a8) for what vLLM refuses (a group size
        it lacks, a partial last group it cannot re-express); fake-quant schemes -> dequantized.
* CPU:  w4a16 and w4a8 -> qvlm's own kernels (``qvlm_cpu_w4a16``/``qvlm_cpu_w4a8``,
        kernels/csrc, built on first use; AVX2, AVX-512 VNNI/BF16 or AMX chosen at run time),
        then vLLM-CPU's ``int4_scaled_mm_cpu`` (w4a8, AMX) and ``cpu_gemm_wna16`` (w4a16);
        w8a8 -> vLLM's AMX int8 GEMM (``int8_scaled_mm_with_quant``), then its oneDNN int8
        GEMM where it is exact (the processor has VNNI), else ``qvlm_cpu_w8a8``;
        fake-quant schemes and anything unsupported (no AVX2/FMA/F16C, no compiler) ->
        dequantized.

  Measured at LLaVA-7B decode shapes, one thread (benchmarks/kernel_bench.py): on a Sapphire
  Rapids core qvlm's w4a16 is 4.7-5.3x vLLM's ``cpu_gemm_wna16`` at one token and its w4a8
  26-34% faster than ``int4_scaled_mm_cpu`` (within 8% at 8 tokens), while vLLM's AMX int8
  GEMM is about as fast as qvlm's w8a8 at one token and 1.5x faster at 8 and at prefill; on an
  AVX2 EPYC vLLM's int4 op is slower than bf16 and oneDNN int8 is at the bandwidth limit.

Every backend answers ``can_implement(spec, K, N, act_dtype) -> (ok, reason)``; ``choose_backend``
returns the first that can, with the reasons of those passed over (the plugin logs them once
per scheme). On CPU, vLLM's kernel layers are reachable by name (``QVLM_KERNEL=vllm_mp`` runs
its CPUWNA16 kernel, ``vllm_scaled_mm`` its oneDNN/AMX int8 kernel) but not in the automatic
order: the backends above call the same vLLM-CPU ops directly where measurement put them.

``QVLM_KERNEL=<backend name>`` forces a backend (tests, benchmarks, debugging).
"""

from __future__ import annotations

import os

import torch

from .backends import (
    Backend,
    CpuAmxInt8Backend,
    CpuAmxW4A8Backend,
    CpuInt8Backend,
    CpuWNA16Backend,
    DequantizedBackend,
    QvlmCpuW4A8Backend,
    QvlmCpuW4A16Backend,
    QvlmCpuW8A8Backend,
    ReferenceBackend,
)
from .format import LayerSpec
from .vllm_kernels import VllmMixedPrecisionBackend, VllmScaledMMBackend

_FORCED_ENV = "QVLM_KERNEL"


def _triton_backends() -> list[type[Backend]]:
    from .cuda import TritonW4A8Backend, TritonW4A16Backend, TritonW8A8Backend

    return [TritonW4A16Backend, TritonW8A8Backend, TritonW4A8Backend]


_CPU_ORDER = [QvlmCpuW4A16Backend, QvlmCpuW4A8Backend, CpuAmxW4A8Backend, CpuWNA16Backend,
              CpuAmxInt8Backend, CpuInt8Backend, QvlmCpuW8A8Backend]
_VLLM_KERNEL_LAYERS = [VllmMixedPrecisionBackend, VllmScaledMMBackend]


def _all_backends() -> dict[str, type[Backend]]:
    out = {b.name: b for b in (ReferenceBackend, DequantizedBackend, *_CPU_ORDER, *_VLLM_KERNEL_LAYERS)}
    try:
        out.update({b.name: b for b in _triton_backends()})
    except ImportError:
        pass
    return out


def candidates(device: torch.device | str) -> list[type[Backend]]:
    """The automatic order for a device (the dense fallback comes after all of them)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return [*_VLLM_KERNEL_LAYERS, *_triton_backends()]
        except ImportError:  # no triton: vLLM's kernels, then the dense fallback
            return list(_VLLM_KERNEL_LAYERS)
    if device.type == "cpu":
        return list(_CPU_ORDER)
    return []


def choose_backend(
    spec: LayerSpec, in_features: int, out_features: int, act_dtype: torch.dtype, device: torch.device | str
) -> tuple[Backend, list[tuple[str, str]]]:
    """The backend for one layer, and ``(name, reason)`` for each candidate passed over before it."""
    forced = os.environ.get(_FORCED_ENV)
    if forced:
        backends = _all_backends()
        if forced not in backends:
            raise ValueError(f"{_FORCED_ENV}={forced!r} is not a backend; choose one of {sorted(backends)}")
        return backends[forced](), [("*", f"{_FORCED_ENV}={forced}")]
    refused: list[tuple[str, str]] = []
    for b in candidates(device):
        ok, reason = b.can_implement(spec, in_features, out_features, act_dtype)
        if ok:
            return b(), refused
        refused.append((b.name, reason or "refused"))
    return DequantizedBackend(), refused


def select_backend(
    spec: LayerSpec, in_features: int, out_features: int, act_dtype: torch.dtype, device: torch.device | str
) -> Backend:
    return choose_backend(spec, in_features, out_features, act_dtype, device)[0]
