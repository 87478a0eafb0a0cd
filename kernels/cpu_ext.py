"""The qvlm CPU kernel library (kernels/csrc/qvlm_cpu.cpp): built on first use, loaded lazily.

``available()`` says whether the ops ``torch.ops.qvlm_cpu.*`` can run here. It never
raises: on a processor without AVX2/FMA/F16C, without a C++ compiler, or when the
build fails it returns False and logs the reason once, and the dispatcher falls back
to the dequantized backend. The build is torch's JIT (``torch.utils.cpp_extension.load``)
into torch's extensions directory; torch's file lock serializes concurrent builds from
several worker processes and later processes just load the cached library.

``QVLM_CPU_KERNELS=0`` turns the library off (benchmarks, debugging).

The library holds AVX2 kernels and AVX-512 ones (VNNI, BF16, and AMX tiles where present),
chosen at run time from the processor's features; ``QVLM_CPU_ISA=avx2|avx512|amx`` (or
``set_isa``) caps the choice, so every path can be tested and measured on one machine.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

logger = logging.getLogger("vllm.qvlm")

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = [_CSRC / "qvlm_cpu.cpp", _CSRC / "qvlm_cpu_avx512.cpp"]  # the header is qvlm_cpu.h
_NAME = "qvlm_cpu"
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
_REQUIRED = ("avx2", "fma", "f16c")

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_flags() -> set[str] | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _missing_isa() -> str | None:
    flags = _cpu_flags()
    if flags is None:  # not Linux: trust torch's dispatch level
        cap = torch.backends.cpu.get_cpu_capability()
        return None if cap in ("AVX2", "AVX512") else f"torch reports CPU capability {cap}"
    missing = [f for f in _REQUIRED if f not in flags]
    return f"processor lacks {', '.join(missing)}" if missing else None


def _build() -> None:
    from torch.utils.cpp_extension import load

    load(
        name=_NAME,
        sources=[str(s) for s in _SOURCES],
        extra_cflags=_FLAGS,
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=os.environ.get("QVLM_CPU_KERNELS_VERBOSE") == "1",
    )


def _register_fakes() -> None:
    """Shape-only implementations, so torch.compile can trace through the ops."""
    lib = "qvlm_cpu::"
    fakes = {
        "w4a16_linear": lambda x, w, s, z, bias, n, group_size, gemm_min_rows: x.new_empty(x.shape[0], n),
        "w4a8_linear": lambda x, w, s, z, bias, n, group_size, gemm_min_rows: x.new_empty(x.shape[0], n),
        "w8a8_linear": lambda x, w, w_scale, bias, n: x.new_empty(x.shape[0], n),
        "quant_per_token": lambda x: (x.new_empty(x.shape, dtype=torch.int8),
                                      x.new_empty(x.shape[0], 1, dtype=torch.float32)),
    }
    for name, fn in fakes.items():
        try:
            torch.library.register_fake(lib + name)(fn)
        except RuntimeError:  # already registered in this process
            pass


def _load() -> str | None:
    """Build/load once per process; returns the reason it is unusable, or None."""
    if os.environ.get("QVLM_CPU_KERNELS", "1") == "0":
        return "disabled by QVLM_CPU_KERNELS=0"
    if os.uname().machine not in ("x86_64", "AMD64"):
        return f"not an x86-64 processor ({os.uname().machine})"
    reason = _missing_isa()
    if reason:
        return reason
    if not all(s.is_file() for s in _SOURCES):
        return f"kernel source missing: {_SOURCES[0]}"
    try:
        if not hasattr(torch.ops.qvlm_cpu, "w4a16_linear"):
            _build()
        torch.ops.qvlm_cpu.w4a16_linear  # noqa: B018 - raises if the library did not register
        _register_fakes()
        torch.ops.qvlm_cpu.isa(os.environ.get("QVLM_CPU_ISA", "auto"))
    except Exception as e:  # compiler missing, build error, load error
        return f"building the qvlm CPU kernels failed: {type(e).__name__}: {str(e).strip()[:2000]}"
    return None


def unavailable_reason() -> str | None:
    """None when the kernels are usable, else why not (builds on first call)."""
    with _lock:
        if "reason" not in _state:
            reason = _load()
            _state["reason"] = reason
            if reason:
                logger.warning("qvlm: CPU kernels unavailable (%s); quantized layers use the dequantized fallback",
                               reason)
        return _state["reason"]  # type: ignore[return-value]


ISAS = ("avx2", "avx512", "amx")  # each level includes the ones before it


def set_isa(name: str) -> str:
    """Use the kernels of ``name`` (one of ISAS, or "auto": the best this processor has); returns it.

    Raises when the processor lacks it. Process-wide; prepared weights stay valid (every
    instruction set reads the same packed layouts).
    """
    return ops().isa(name)


def current_isa() -> str:
    return ops().isa("")


def supported_isas() -> list[str]:
    """The instruction-set levels this processor runs, lowest first ([] without the library)."""
    if not available():
        return []
    active = current_isa()
    best = set_isa("auto")
    set_isa(active)
    return list(ISAS[: ISAS.index(best) + 1])


def available() -> bool:
    return unavailable_reason() is None


def ops():
    """``torch.ops.qvlm_cpu`` after a successful build (call ``available()`` first)."""
    if not available():
        raise RuntimeError(f"qvlm CPU kernels unavailable: {unavailable_reason()}")
    return torch.ops.qvlm_cpu
