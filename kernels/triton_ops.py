"""Triton GEMM kernels for qvlm packed weights (see ``format.py`` for the layout).

What it is for
--------------
The serving path of the integer schemes on NVIDIA GPUs (vLLM's CUDA build):

* ``w4a16_gemm``  int4 group-wise weights, 16-bit activations (weight-only).
* ``w8a8_gemm``   int8 per-channel weights, int8 dynamic per-token activations.
* ``w4a8_gemm``   int4 group-wise weights, int8 dynamic per-token activations.
* ``per_token_quant_int8``  the activation quantizer of the two ``a8`` schemes;
  bit-identical to ``reference.quantize_per_token(x, 8)``.

Every op computes ``y = x @ w (+ bias)`` with ``w`` dequantized exactly as
``reference.dequantize`` states it; ``reference.py`` is the oracle the tests
compare against. The kernels also run under ``TRITON_INTERPRET=1`` on CPU
tensors (slowly), which is how CI checks them without a GPU; there they use one
fixed block configuration instead of autotuning.

What it does not do
-------------------
* No 6-bit or 4-bit activation kernels (``w6a6`` / ``w4a4`` are fake-quant
  schemes served by the reference path).
* No fused activation quantization inside the GEMM: ``per_token_quant_int8`` is
  a separate, cheap pass (one read of ``x``), as in vLLM's own int8 kernels.
* No persistent / stream-K scheduling, TMA descriptors or Hopper ``wgmma``
  hand-tuning; Triton picks the MMA instructions. No weight re-layout: the
  kernels read the on-disk format directly (the only load-time conversion the
  caller does is the ``uint8 - 128 -> int8`` view for ``w8a8``).
* Integer accumulation is exact in int32 for ``K < 2**31 / (128 * 128)``
  (131072), far above any LLaVA layer.
* No GPU timings are claimed here; the reasoning below is a design rationale.

Performance reasoning (GPU)
---------------------------
Decode (``M`` = a few tokens) is memory-bound: each output token must stream
every weight once, so the cost per layer is about ``K*N/2`` bytes of int4 codes
plus ``2*G*N`` bytes of fp16 scales (``G*N`` more for asymmetric zeros), versus
``2*K*N`` for fp16 weights -- roughly a 3.5-4x reduction of the bytes that set
decode latency at group size 128. Hence:

* codes are read once per CTA as packed ``int32`` words (``[BLOCK_K/8, BLOCK_N]``
  loads, coalesced along N) and unpacked in registers; scales/zeros are read once
  per ``BLOCK_K`` block (``BLOCK_K`` divides the group size), and the scale is
  applied to the ``BLOCK_M x BLOCK_N`` partial product instead of to the
  ``BLOCK_K x BLOCK_N`` weight tile, which also keeps ``(u - z)`` exact in
  fp16/bf16/int8 for the tensor-core dot;
* at ``M = 1`` there are only ``cdiv(N, BLOCK_N)`` output tiles (e.g. 64 for
  N=4096), fewer than the SMs of an H100 (132), so K is split (``split_k``) to
  put enough CTAs in flight to saturate HBM bandwidth; partial sums go to a
  small fp32 ``[split_k, M, N]`` buffer that a second tiny kernel sums (adding
  the bias and casting); deterministic, no atomics, no zero-fill, and the extra
  traffic is ``split_k*M*N*4`` bytes, tiny next to the weights at small M;
* prefill (large M) is compute-bound: the autotuner picks larger ``BLOCK_M``
  tiles and ``split_k`` is 1; programs run M-tile-fastest so CTAs that share a
  weight tile run together and hit L2.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .format import num_groups

__all__ = ["w4a16_gemm", "w8a8_gemm", "w4a8_gemm", "per_token_quant_int8"]

_INTERPRET = bool(os.environ.get("TRITON_INTERPRET")) and os.environ.get("TRITON_INTERPRET") != "0"

# Fixed tiles used under the interpreter (and as the non-autotuned fallback).
_INTERP_META = {"BLOCK_M": 16, "BLOCK_N": 64}
_MAX_BLOCK_K = 64 if _INTERPRET else 128
_MAX_SPLIT_K = 16
_QUANT_BLOCK = 1024

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------- #
# Triton kernels
# --------------------------------------------------------------------------- #


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # M tiles fastest: consecutive CTAs share one weight tile (L2 reuse in prefill).
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_pid_m
    pid_n = pid // num_pid_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n


@triton.jit
def _unpack_int4(qw_ptr, k0, K, offs_n, N, stride_qk, stride_qn, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Codes ``[BLOCK_K, BLOCK_N]`` (int32 in [0, 15]) of rows ``k0 .. k0+BLOCK_K``."""
    offs_kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    mask = (offs_kw[:, None] < K // 8) & (offs_n[None, :] < N)
    words = tl.load(qw_ptr + offs_kw[:, None] * stride_qk + offs_n[None, :] * stride_qn, mask=mask, other=0)
    shifts = tl.arange(0, 8) * 4
    codes = (words[:, None, :] >> shifts[None, :, None]) & 0xF  # [BLOCK_K/8, 8, BLOCK_N]: row 8i+j
    return tl.reshape(codes, (BLOCK_K, BLOCK_N))


@triton.jit
def _group_params(s_ptr, z_ptr, g, offs_n, mask, stride_sg, stride_sn, stride_zg, stride_zn, HAS_ZEROS: tl.constexpr):
    """Scale (fp32) and zero point (int32) of group ``g`` (a scalar or a [BLOCK_K, 1] tensor)."""
    s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + g * stride_zg + offs_n * stride_zn, mask=mask, other=0).to(tl.int32)
    else:
        z = tl.full(s.shape, 8, tl.int32)
    return s, z


@triton.jit
def _store_out(out_ptr, acc, offs_m, offs_n, M, N, b_ptr, pid_k, stride_os, stride_om, stride_on,
               HAS_BIAS: tl.constexpr, IS_SPLIT: tl.constexpr):
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if IS_SPLIT:
        # fp32 partial sums; bias and the cast are applied after the reduction.
        tl.store(ptrs, acc, mask=mask)
    else:
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            acc = acc + bias[None, :]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _w4a16_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, GS, K_BLOCKS_PER_SPLIT, M_BUCKET,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_os, stride_om, stride_on,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, IS_SPLIT: tl.constexpr,
    GROUP_ALIGNED: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m, offs_n = _tile_ids(M, N, BLOCK_M, BLOCK_N)
    pid_k = tl.program_id(1)
    kb_start = pid_k * K_BLOCKS_PER_SPLIT
    kb_end = tl.minimum(kb_start + K_BLOCKS_PER_SPLIT, tl.cdiv(K, BLOCK_K))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_start, kb_end):
        k0 = kb * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0,
        )
        codes = _unpack_int4(qw_ptr, k0, K, offs_n, N, stride_qk, stride_qn, BLOCK_K, BLOCK_N)
        if GROUP_ALIGNED:
            # The whole block lies in one group: dot with exact small integers (u - z),
            # then one scale multiply of the [BLOCK_M, BLOCK_N] partial product.
            s, z = _group_params(s_ptr, z_ptr, k0 // GS, offs_n, offs_n < N,
                                 stride_sg, stride_sn, stride_zg, stride_zn, HAS_ZEROS)
            if DOT_F32:
                part = tl.dot(x.to(tl.float32), (codes - z[None, :]).to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(x, (codes - z[None, :]).to(x_ptr.dtype.element_ty))
            acc += part * s[None, :]
        else:
            # Groups change inside the block (group size not a multiple of 16):
            # per-row scales, full dequantization to fp32, exact fp32 dot.
            g = (offs_k // GS)[:, None]
            kn_mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
            s, z = _group_params(s_ptr, z_ptr, g, offs_n[None, :], kn_mask,
                                 stride_sg, stride_sn, stride_zg, stride_zn, HAS_ZEROS)
            w = (codes - z).to(tl.float32) * s
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
    _store_out(out_ptr, acc, offs_m, offs_n, M, N, b_ptr, pid_k, stride_os, stride_om, stride_on, HAS_BIAS, IS_SPLIT)


@triton.jit
def _w4a8_kernel(
    xq_ptr, xs_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, GS, K_BLOCKS_PER_SPLIT, M_BUCKET,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_os, stride_om, stride_on,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, IS_SPLIT: tl.constexpr,
    GROUP_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m, offs_n = _tile_ids(M, N, BLOCK_M, BLOCK_N)
    pid_k = tl.program_id(1)
    kb_start = pid_k * K_BLOCKS_PER_SPLIT
    kb_end = tl.minimum(kb_start + K_BLOCKS_PER_SPLIT, tl.cdiv(K, BLOCK_K))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_start, kb_end):
        k0 = kb * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xq = tl.load(
            xq_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0,
        )
        codes = _unpack_int4(qw_ptr, k0, K, offs_n, N, stride_qk, stride_qn, BLOCK_K, BLOCK_N)
        if GROUP_ALIGNED:
            # int8 x int8 -> int32 dot of one group's slice, then the group scale.
            s, z = _group_params(s_ptr, z_ptr, k0 // GS, offs_n, offs_n < N,
                                 stride_sg, stride_sn, stride_zg, stride_zn, HAS_ZEROS)
            w = (codes - z[None, :]).to(tl.int8)
            part = tl.dot(xq, w, out_dtype=tl.int32)
            acc += part.to(tl.float32) * s[None, :]
        else:
            g = (offs_k // GS)[:, None]
            kn_mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
            s, z = _group_params(s_ptr, z_ptr, g, offs_n[None, :], kn_mask,
                                 stride_sg, stride_sn, stride_zg, stride_zn, HAS_ZEROS)
            w = (codes - z).to(tl.float32) * s
            acc += tl.dot(xq.to(tl.float32), w, input_precision="ieee")
    xs = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)
    acc = acc * xs[:, None]
    _store_out(out_ptr, acc, offs_m, offs_n, M, N, b_ptr, pid_k, stride_os, stride_om, stride_on, HAS_BIAS, IS_SPLIT)


@triton.jit
def _w8a8_kernel(
    xq_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, out_ptr,
    M, N, K, K_BLOCKS_PER_SPLIT, M_BUCKET,
    stride_xm, stride_xk, stride_wk, stride_wn,
    stride_os, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, IS_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m, offs_n = _tile_ids(M, N, BLOCK_M, BLOCK_N)
    pid_k = tl.program_id(1)
    kb_start = pid_k * K_BLOCKS_PER_SPLIT
    kb_end = tl.minimum(kb_start + K_BLOCKS_PER_SPLIT, tl.cdiv(K, BLOCK_K))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kb in range(kb_start, kb_end):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        xq = tl.load(
            xq_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0,
        )
        w = tl.load(
            w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0,
        )
        acc = tl.dot(xq, w, acc, out_dtype=tl.int32)
    xs = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)
    ws = tl.load(ws_ptr + offs_n, mask=offs_n < N, other=0.0)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    _store_out(out_ptr, y, offs_m, offs_n, M, N, b_ptr, pid_k, stride_os, stride_om, stride_on, HAS_BIAS, IS_SPLIT)


@triton.jit
def _splitk_reduce_kernel(part_ptr, b_ptr, out_ptr, MN, N, SPLIT, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """Second pass of split-K: ``out = sum_s part[s] (+ bias)``, cast; contiguous buffers."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _per_token_quant_int8_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_xk, stride_qm, stride_qk,
                                 BLOCK: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs * stride_xk, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    # Same fp32 operations as reference.quantize_per_token: IEEE division, then
    # round-half-to-even via the 1.5 * 2**23 trick (exact for |v| < 2**22).
    scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-10), 127.0)
    scale_b = tl.full((BLOCK,), 0.0, tl.float32) + scale
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs * stride_xk, mask=offs < K, other=0.0).to(tl.float32)
        v = tl.math.div_rn(x, scale_b)
        v = (v + 12582912.0) - 12582912.0
        v = tl.minimum(tl.maximum(v, -128.0), 127.0)
        tl.store(q_row + offs * stride_qk, v.to(tl.int8), mask=offs < K)
    tl.store(s_ptr + row, scale)


# --------------------------------------------------------------------------- #
# Autotuning (GPU only; the interpreter uses _INTERP_META)
# --------------------------------------------------------------------------- #

_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
]


def _prune_by_m(configs, named_args, **kwargs):
    m = named_args["M_BUCKET"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m)]
    return kept or configs[:1]


def _maybe_autotune(fn):
    if _INTERPRET:
        return fn
    return triton.autotune(
        configs=_GEMM_CONFIGS,
        key=["M_BUCKET", "N", "K"],
        prune_configs_by={"early_config_prune": _prune_by_m},
    )(fn)


_w4a16 = _maybe_autotune(_w4a16_kernel)
_w4a8 = _maybe_autotune(_w4a8_kernel)
_w8a8 = _maybe_autotune(_w8a8_kernel)
_FIXED_META = _INTERP_META if _INTERPRET else {}


# --------------------------------------------------------------------------- #
# Python wrappers
# --------------------------------------------------------------------------- #

_SM_COUNT: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: small, but still exercises split-K at M=1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    # fp32 activations: exact IEEE fp32 dot (no TF32). The interpreter stores bf16
    # as raw uint16 and its dot would multiply the bit patterns, so there bf16 tiles
    # are upcast first (products of bf16 values are exact in fp32: same result).
    return dtype == torch.float32 or (_INTERPRET and dtype == torch.bfloat16)


def _pow2_divisor(n: int) -> int:
    return n & -n


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 1024)


def _split_plan(M: int, N: int, K: int, block_k: int, split_k: int | None, device: torch.device) -> tuple[int, int]:
    """(number of K splits, K blocks per split)."""
    k_blocks = max(triton.cdiv(K, block_k), 1)
    if split_k is None:
        split_k = 1
        if M <= 64:
            tiles = triton.cdiv(M, 16) * triton.cdiv(N, 64)  # tile estimate before autotuning
            target = 2 * _num_sms(device)
            # Grow while the grid is short of ~2 waves and each split keeps >= 4 K blocks.
            while split_k * 2 <= _MAX_SPLIT_K and tiles * split_k < target and k_blocks // (split_k * 2) >= 4:
                split_k *= 2
    elif not isinstance(split_k, int) or split_k < 1:
        raise ValueError(f"split_k must be a positive int or None, got {split_k!r}")
    per_split = triton.cdiv(k_blocks, min(split_k, k_blocks))
    return triton.cdiv(k_blocks, per_split), per_split


def _int4_block_k(K: int, group_size: int, min_aligned: int) -> tuple[int, bool]:
    """BLOCK_K and whether every K block lies inside one quantization group."""
    if group_size == -1:
        return max(min(_MAX_BLOCK_K, triton.next_power_of_2(K)), min_aligned), True
    bk = min(_pow2_divisor(group_size), _MAX_BLOCK_K)
    if bk >= min_aligned:
        return bk, True
    return 32, False


def _flatten_x(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name}: x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name}: x must have at least one dimension [..., K]")
    return x.reshape(-1, x.shape[-1])


def _check_device(name: str, x: torch.Tensor, **tensors) -> None:
    for tname, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: {tname} is on {t.device} but x is on {x.device}")


def _check_bias(name: str, bias: torch.Tensor | None, N: int) -> None:
    if bias is None:
        return
    if bias.dim() != 1 or bias.shape[0] != N:
        raise ValueError(f"{name}: bias must have shape [{N}], got {tuple(bias.shape)}")
    if bias.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name}: bias must be a float tensor, got {bias.dtype}")


def _check_int4_weight(name, K, qweight, scales, qzeros, group_size) -> int:
    if group_size != -1 and (not isinstance(group_size, int) or group_size <= 0):
        raise ValueError(f"{name}: group_size must be -1 or a positive int, got {group_size!r}")
    if K % 8:
        raise ValueError(f"{name}: input width K={K} must be a multiple of 8 for packed int4 weights")
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"{name}: qweight must be int32 [K/8, N], got {qweight.dtype} {tuple(qweight.shape)}")
    if qweight.shape[0] != K // 8:
        raise ValueError(f"{name}: qweight has {qweight.shape[0]} rows but x has K={K} (expected K/8={K // 8})")
    N = qweight.shape[1]
    G = num_groups(K, group_size)
    if scales.dim() != 2 or tuple(scales.shape) != (G, N):
        raise ValueError(f"{name}: scales must have shape [{G}, {N}] (K={K}, group_size={group_size}), "
                         f"got {tuple(scales.shape)}")
    if scales.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name}: scales must be a float tensor (float16 in the format), got {scales.dtype}")
    if qzeros is not None:
        if qzeros.dtype not in (torch.uint8, torch.int32) or tuple(qzeros.shape) != (G, N):
            raise ValueError(f"{name}: qzeros must be uint8 [{G}, {N}], got {qzeros.dtype} {tuple(qzeros.shape)}")
    return N


def _launch_gemm(kernel, M, N, split, tensors, ints, strides, out_strides, constexprs, block_k):
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split)  # noqa: E731
    kernel[grid](*tensors, *ints, *strides, *out_strides, **constexprs, BLOCK_K=block_k, **_FIXED_META)


def _reduce_splits(part: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    """Second pass of split-K: sum the fp32 partials, add the bias, cast (one small kernel)."""
    split, M, N = part.shape
    out = torch.empty((M, N), dtype=dtype, device=part.device)
    block = 1024
    _splitk_reduce_kernel[(triton.cdiv(M * N, block),)](
        part, bias if bias is not None else part, out, M * N, N, split, HAS_BIAS=bias is not None, BLOCK=block
    )
    return out


def _out_buffers(M, N, split, dtype, device):
    """(kernel destination, its (split, m, n) strides, final output or None)."""
    if split == 1:
        out = torch.empty((M, N), dtype=dtype, device=device)
        return out, (0, out.stride(0), out.stride(1)), None
    part = torch.empty((split, M, N), dtype=torch.float32, device=device)
    return part, (part.stride(0), part.stride(1), part.stride(2)), part


def w4a16_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    split_k: int | None = None,
) -> torch.Tensor:
    """``y = x @ dequant(qweight)`` with int4 group-wise weights; ``x [..., K]`` -> ``[..., N]`` in ``x.dtype``.

    ``qzeros=None`` means symmetric (implicit zero 8). ``split_k=None`` picks the
    number of K splits from the problem size; an int forces it (testing, tuning).
    """
    name = "w4a16_gemm"
    x2 = _flatten_x(x, name)
    M, K = x2.shape
    N = _check_int4_weight(name, K, qweight, scales, qzeros, group_size)
    _check_bias(name, bias, N)
    _check_device(name, x, qweight=qweight, scales=scales, qzeros=qzeros, bias=bias)
    if M == 0 or N == 0:
        return torch.zeros((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    block_k, aligned = _int4_block_k(K, group_size, 16)
    split, per_split = _split_plan(M, N, K, block_k, split_k, x.device)
    dest, out_strides, part = _out_buffers(M, N, split, x.dtype, x.device)
    zeros = qzeros if qzeros is not None else scales  # dummy pointer when symmetric
    _launch_gemm(
        _w4a16, M, N, split,
        (x2, qweight, scales, zeros, bias if bias is not None else scales, dest),
        (M, N, K, K if group_size == -1 else group_size, per_split, _m_bucket(M)),
        (x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
         zeros.stride(0), zeros.stride(1)),
        out_strides,
        dict(HAS_ZEROS=qzeros is not None, HAS_BIAS=bias is not None, IS_SPLIT=split > 1,
             GROUP_ALIGNED=aligned, DOT_F32=_dot_in_fp32(x.dtype)),
        block_k,
    )
    out = dest if part is None else _reduce_splits(part, x.dtype, bias)
    return out.reshape(*x.shape[:-1], N)


def per_token_quant_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic per-token int8: ``x ~= q * scale``; ``q int8 [M, K]``, ``scale fp32 [M, 1]``.

    ``scale = max(absmax(row), 1e-10) / 127``, ``q = clamp(round_half_even(x / scale), -128, 127)``,
    bit-identical to ``reference.quantize_per_token(x, 8)``. ``x [..., K]`` is flattened to 2-D.
    """
    x2 = _flatten_x(x, "per_token_quant_int8")
    M, K = x2.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    s = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M == 0:
        return q, s
    if K == 0:
        s.fill_(1e-10 / 127)
        return q, s
    block = min(_QUANT_BLOCK, triton.next_power_of_2(K))
    _per_token_quant_int8_kernel[(M,)](x2, q, s, K, x2.stride(0), x2.stride(1), q.stride(0), q.stride(1),
                                       BLOCK=block)
    return q, s


def w8a8_gemm(
    x: torch.Tensor,
    qweight_s8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    split_k: int | None = None,
) -> torch.Tensor:
    """int8 x int8 GEMM with dynamic per-token activation quantization.

    ``qweight_s8``: signed int8 ``[K, N]`` (stored uint8 codes - 128, converted once at
    load time); ``w_scale``: fp32 ``[N]`` (a ``[1, N]`` tensor is accepted).
    ``y = (xq @ qweight_s8) * x_scale[m] * w_scale[n] (+ bias)`` in ``x.dtype``.
    """
    name = "w8a8_gemm"
    x2 = _flatten_x(x, name)
    M, K = x2.shape
    if qweight_s8.dtype != torch.int8 or qweight_s8.dim() != 2:
        raise ValueError(f"{name}: qweight_s8 must be int8 [K, N] (uint8 codes - 128), "
                         f"got {qweight_s8.dtype} {tuple(qweight_s8.shape)}")
    if qweight_s8.shape[0] != K:
        raise ValueError(f"{name}: qweight_s8 has {qweight_s8.shape[0]} rows but x has K={K}")
    N = qweight_s8.shape[1]
    if w_scale.dtype != torch.float32 or w_scale.numel() != N or w_scale.dim() not in (1, 2) or w_scale.shape[-1] != N:
        raise ValueError(f"{name}: w_scale must be float32 [{N}], got {w_scale.dtype} {tuple(w_scale.shape)}")
    _check_bias(name, bias, N)
    _check_device(name, x, qweight_s8=qweight_s8, w_scale=w_scale, bias=bias)
    if M == 0 or N == 0:
        return torch.zeros((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    ws = w_scale.reshape(N)
    xq, xs = per_token_quant_int8(x2)
    block_k = max(min(_MAX_BLOCK_K, triton.next_power_of_2(K)), 32)
    split, per_split = _split_plan(M, N, K, block_k, split_k, x.device)
    dest, out_strides, part = _out_buffers(M, N, split, x.dtype, x.device)
    _launch_gemm(
        _w8a8, M, N, split,
        (xq, xs, qweight_s8, ws, bias if bias is not None else ws, dest),
        (M, N, K, per_split, _m_bucket(M)),
        (xq.stride(0), xq.stride(1), qweight_s8.stride(0), qweight_s8.stride(1)),
        out_strides,
        dict(HAS_BIAS=bias is not None, IS_SPLIT=split > 1),
        block_k,
    )
    out = dest if part is None else _reduce_splits(part, x.dtype, bias)
    return out.reshape(*x.shape[:-1], N)


def w4a8_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    split_k: int | None = None,
) -> torch.Tensor:
    """int4 group-wise weights x dynamic per-token int8 activations.

    Per group: int32 dot of ``xq`` and ``(u - z)`` (both exact in int8), times the group
    scale, accumulated in fp32; times the token scale at the end. When the group size
    is not a multiple of 32 (the int8 MMA depth) blocks straddle groups and the kernel
    falls back to an exact fp32 dot of dequantized weights.
    """
    name = "w4a8_gemm"
    x2 = _flatten_x(x, name)
    M, K = x2.shape
    N = _check_int4_weight(name, K, qweight, scales, qzeros, group_size)
    _check_bias(name, bias, N)
    _check_device(name, x, qweight=qweight, scales=scales, qzeros=qzeros, bias=bias)
    if M == 0 or N == 0:
        return torch.zeros((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    xq, xs = per_token_quant_int8(x2)
    block_k, aligned = _int4_block_k(K, group_size, 32)
    split, per_split = _split_plan(M, N, K, block_k, split_k, x.device)
    dest, out_strides, part = _out_buffers(M, N, split, x.dtype, x.device)
    zeros = qzeros if qzeros is not None else scales
    _launch_gemm(
        _w4a8, M, N, split,
        (xq, xs, qweight, scales, zeros, bias if bias is not None else scales, dest),
        (M, N, K, K if group_size == -1 else group_size, per_split, _m_bucket(M)),
        (xq.stride(0), xq.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
         zeros.stride(0), zeros.stride(1)),
        out_strides,
        dict(HAS_ZEROS=qzeros is not None, HAS_BIAS=bias is not None, IS_SPLIT=split > 1,
             GROUP_ALIGNED=aligned),
        block_k,
    )
    out = dest if part is None else _reduce_splits(part, x.dtype, bias)
    return out.reshape(*x.shape[:-1], N)
