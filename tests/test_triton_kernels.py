"""Triton kernels (qvlm_kernels.triton_ops) against the pure-torch oracle (qvlm_kernels.reference).

Without CUDA, conftest.py sets TRITON_INTERPRET=1 before this module imports Triton,
so the kernels run in Triton's CPU interpreter: shapes are kept small on purpose.

Tolerances. Integer parts (activation codes, per-token scales, int32 accumulators)
must match exactly. Float outputs: kernel and oracle both form an fp32 value of
the same exact math, summed in a different order (tiles, split-K, scale applied
per group instead of per weight), so they differ by a few fp32 ulps of the
accumulated magnitude; the result is then rounded to x.dtype on both sides, which
can land on adjacent values: at most one ulp of the output dtype (rtol = 2**-10
for fp16, 2**-7 for bf16), plus a small absolute term, relative to the output's
magnitude, for outputs near zero where fp32 noise dominates.
"""

from __future__ import annotations

import pytest
import torch

from qvlm_kernels.format import LayerSpec, num_groups
from qvlm_kernels.pack import pack_codes
from qvlm_kernels import reference

triton = pytest.importorskip("triton")
from qvlm_kernels import triton_ops as T  # noqa: E402  (after conftest set TRITON_INTERPRET)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (rtol, atol as a fraction of max|ref|); see the module docstring.
_TOL = {
    torch.float32: (1e-5, 2e-6),
    torch.float16: (2.0**-10 + 1e-5, 1e-5),
    torch.bfloat16: (2.0**-7 + 1e-5, 1e-4),
}


def assert_close_dtype(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.dtype == ref.dtype and y.shape == ref.shape
    rtol, afrac = _TOL[y.dtype]
    ref32 = ref.float().cpu()
    atol = afrac * max(float(ref32.abs().max()), 1.0)
    torch.testing.assert_close(y.float().cpu(), ref32, rtol=rtol, atol=atol)


def cpu(t):
    return None if t is None else t.cpu()


def ref_linear(x, qweight, scales, qzeros, spec, bias=None):
    # The oracle runs on CPU even when the kernels run on CUDA: torch on CUDA divides
    # by a Python scalar (absmax / 127) through a reciprocal multiply, which is not
    # bit-identical to the IEEE division the format (and the kernel) specify.
    return reference.linear(cpu(x), cpu(qweight), cpu(scales), cpu(qzeros), spec, cpu(bias))


def make_int4(K: int, N: int, gs: int, sym: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    G = num_groups(K, gs)
    codes = torch.randint(0, 16, (K, N), generator=g)
    qweight = pack_codes(codes, 4)
    scales = (torch.rand(G, N, generator=g) * 0.02 + 0.002).half()
    qzeros = None if sym else torch.randint(0, 16, (G, N), generator=g, dtype=torch.uint8)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(qweight), to(scales), to(qzeros), codes


def make_x(M: int, K: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(M, K, generator=g).to(dtype).to(DEVICE)


def make_bias(N: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 2000)
    return torch.randn(N, generator=g).to(DEVICE)


FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32

# (M, K, N, group_size, symmetric, x dtype, split_k, bias). K=136/688 with group 128
# have a partial last group; group 40 is not a multiple of 16/32, so its K blocks
# straddle groups (the per-row-scale fallback path); K=64 with group 128 is one
# partial group. split_k None = the size heuristic (splits at M=1 here).
INT4_CASES = [
    (1, 64, 48, 32, True, FP16, None, False),
    (1, 688, 200, 128, True, FP16, None, True),
    (1, 688, 48, 32, False, BF16, None, False),
    (1, 136, 200, -1, False, FP32, None, True),
    (5, 136, 48, 128, False, FP16, 2, False),
    (5, 688, 200, -1, True, BF16, 3, False),
    (5, 64, 200, 128, True, FP32, None, False),
    (5, 136, 200, 40, False, FP16, None, True),
    (33, 136, 200, 32, True, BF16, None, True),
    (33, 688, 48, 128, False, FP32, 2, False),
    (33, 64, 48, -1, False, FP16, None, False),
    (3, 136, 48, 40, True, FP32, 2, False),
    (17, 688, 48, 128, True, FP16, 4, True),
]


def _case_id(c):
    M, K, N, gs, sym, dt, sk, b = c
    return f"M{M}-K{K}-N{N}-g{gs}-{'sym' if sym else 'asym'}-{str(dt)[6:]}-sk{sk}{'-bias' if b else ''}"


@pytest.mark.parametrize("case", INT4_CASES, ids=_case_id)
def test_w4a16_matches_reference(case):
    M, K, N, gs, sym, dt, split_k, has_bias = case
    qweight, scales, qzeros, _ = make_int4(K, N, gs, sym, seed=K + N + M)
    x = make_x(M, K, dt, seed=M)
    bias = make_bias(N, M) if has_bias else None
    y = T.w4a16_gemm(x, qweight, scales, qzeros, gs, bias, split_k=split_k)
    ref = ref_linear(x, qweight, scales, qzeros, LayerSpec("w4a16", 4, gs, sym, None, "none"), bias)
    assert_close_dtype(y, ref)


@pytest.mark.parametrize("case", INT4_CASES, ids=_case_id)
def test_w4a8_matches_reference(case):
    M, K, N, gs, sym, dt, split_k, has_bias = case
    qweight, scales, qzeros, _ = make_int4(K, N, gs, sym, seed=K + N + M)
    x = make_x(M, K, dt, seed=M)
    bias = make_bias(N, M) if has_bias else None
    y = T.w4a8_gemm(x, qweight, scales, qzeros, gs, bias, split_k=split_k)
    ref = ref_linear(x, qweight, scales, qzeros, LayerSpec("w4a8", 4, gs, sym, 8, "int8_dynamic"), bias)
    assert_close_dtype(y, ref)


W8A8_CASES = [
    (1, 64, 48, FP16, None, False),
    (1, 688, 200, BF16, None, True),
    (5, 100, 200, FP32, None, True),  # K not a multiple of 8 is fine for 8-bit
    (5, 136, 48, FP16, 2, False),
    (33, 688, 48, FP32, 3, False),
    (17, 136, 200, BF16, None, False),
]


def make_int8(K: int, N: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (K, N), generator=g, dtype=torch.uint8)
    scales = (torch.rand(1, N, generator=g) * 0.01 + 0.001).half()
    return codes.to(DEVICE), scales.to(DEVICE)


def to_s8(codes_u8: torch.Tensor) -> torch.Tensor:
    return (codes_u8.to(torch.int16) - 128).to(torch.int8)


@pytest.mark.parametrize("case", W8A8_CASES, ids=lambda c: f"M{c[0]}-K{c[1]}-N{c[2]}-{str(c[3])[6:]}-sk{c[4]}")
def test_w8a8_matches_reference(case):
    M, K, N, dt, split_k, has_bias = case
    codes, scales = make_int8(K, N, seed=K * N + M)
    x = make_x(M, K, dt, seed=M)
    bias = make_bias(N, M) if has_bias else None
    y = T.w8a8_gemm(x, to_s8(codes), scales.float().reshape(N), bias, split_k=split_k)
    ref = ref_linear(x, codes, scales, None, LayerSpec("w8a8", 8, -1, True, 8, "int8_dynamic"), bias)
    assert_close_dtype(y, ref)


# ---- exact integer paths ------------------------------------------------------
# With integer activations whose row absmax is 127, the per-token scale is exactly 1
# and the codes are x itself; with unit weight scales every output is an integer
# below 2**24, so fp32 outputs must equal the int64 product exactly (this checks
# the int8 unpack, zero points, int32 dot and split-K reduction bit for bit).


def int_x(M: int, K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-127, 128, (M, K), generator=g)
    x[torch.arange(M), (torch.arange(M) * 7) % K] = torch.where(torch.arange(M) % 2 == 0, 127, -127)
    return x


@pytest.mark.parametrize("split_k", [1, 3])
def test_w8a8_integer_accumulator_exact(split_k):
    M, K, N = 6, 200, 72
    xi = int_x(M, K, seed=1)
    codes, _ = make_int8(K, N, seed=2)
    w = to_s8(codes)
    y = T.w8a8_gemm(xi.float().to(DEVICE), w, torch.ones(N, device=DEVICE), split_k=split_k)
    expect = (xi.long() @ w.cpu().long()).float()
    assert torch.equal(y.cpu(), expect)


@pytest.mark.parametrize("gs,sym,split_k", [(32, False, 1), (128, True, 2), (40, False, 2), (-1, False, 1)])
def test_w4a8_integer_accumulator_exact(gs, sym, split_k):
    M, K, N = 5, 136, 48
    xi = int_x(M, K, seed=3)
    qweight, scales, qzeros, codes = make_int4(K, N, gs, sym, seed=4)
    scales = torch.ones_like(scales)
    z = torch.full((num_groups(K, gs), N), 8, dtype=torch.long) if qzeros is None else qzeros.cpu().long()
    from qvlm_kernels.pack import expand_groups

    w_int = codes.long() - expand_groups(z, gs, K)
    y = T.w4a8_gemm(xi.float().to(DEVICE), qweight, scales, qzeros, gs, split_k=split_k)
    assert torch.equal(y.cpu(), (xi.long() @ w_int).float())


# ---- per-token activation quantization ------------------------------------------


@pytest.mark.parametrize("M,K", [(1, 64), (5, 136), (33, 688), (3, 2500)])
@pytest.mark.parametrize("dtype", [FP16, BF16, FP32])
def test_per_token_quant_int8_exact(M, K, dtype):
    x = make_x(M, K, dtype, seed=K) * 3
    x[0, :] = 0  # all-zero row: scale clamps at 1e-10 / 127
    q, s = T.per_token_quant_int8(x)
    rq, rs = reference.quantize_per_token(x.cpu(), 8)
    assert q.dtype == torch.int8 and q.shape == (M, K)
    assert s.dtype == torch.float32 and s.shape == (M, 1)
    assert torch.equal(q.cpu().float(), rq.cpu())
    assert torch.equal(s.cpu(), rs.cpu())


def test_per_token_quant_int8_rounds_half_to_even():
    x = torch.tensor([[127.0, 2.5, 3.5, -2.5, -3.5, 0.5, -0.5, 1.5, 126.5]], device=DEVICE)
    q, s = T.per_token_quant_int8(x)
    assert float(s) == 1.0
    assert q.cpu().tolist() == [[127, 2, 4, -2, -4, 0, 0, 2, 126]]


# ---- shapes, leading dims, errors ------------------------------------------------


def test_leading_dims_and_empty_batch():
    K, N, gs = 64, 48, 32
    qweight, scales, qzeros, _ = make_int4(K, N, gs, False, seed=9)
    x = make_x(6, K, FP16, seed=9).reshape(2, 3, K)
    y = T.w4a16_gemm(x, qweight, scales, qzeros, gs)
    assert y.shape == (2, 3, N)
    torch.testing.assert_close(y.reshape(6, N), T.w4a16_gemm(x.reshape(6, K), qweight, scales, qzeros, gs))
    assert T.w4a16_gemm(x[:0, 0], qweight, scales, qzeros, gs).shape == (0, N)
    assert T.w4a8_gemm(x[:0, 0], qweight, scales, qzeros, gs).shape == (0, N)


def test_non_contiguous_x():
    K, N, gs = 136, 48, 32
    qweight, scales, qzeros, _ = make_int4(K, N, gs, True, seed=11)
    xt = make_x(K, 7, FP32, seed=11).t()  # [7, K], stride (1, 7)
    y = T.w4a16_gemm(xt, qweight, scales, qzeros, gs)
    ref = ref_linear(xt, qweight, scales, qzeros, LayerSpec("w4a16", 4, gs, True, None, "none"))
    assert_close_dtype(y, ref)


def test_validation_errors():
    K, N, gs = 64, 48, 32
    qweight, scales, qzeros, _ = make_int4(K, N, gs, False, seed=5)
    x = make_x(2, K, FP16, seed=5)
    with pytest.raises(ValueError, match="qweight has"):
        T.w4a16_gemm(make_x(2, K + 8, FP16, 5), qweight, scales, qzeros, gs)
    with pytest.raises(ValueError, match="multiple of 8"):
        T.w4a16_gemm(make_x(2, 60, FP16, 5), qweight, scales, qzeros, gs)
    with pytest.raises(ValueError, match="scales must have shape"):
        T.w4a16_gemm(x, qweight, scales, qzeros, 16)
    with pytest.raises(ValueError, match="qzeros"):
        T.w4a8_gemm(x, qweight, scales, qzeros[:1], gs)
    with pytest.raises(ValueError, match="qweight must be int32"):
        T.w4a8_gemm(x, qweight.to(torch.int64), scales, qzeros, gs)
    with pytest.raises(ValueError, match="x must be float16"):
        T.w4a16_gemm(x.to(torch.int32), qweight, scales, qzeros, gs)
    with pytest.raises(ValueError, match="bias"):
        T.w4a16_gemm(x, qweight, scales, qzeros, gs, torch.zeros(N + 1, device=DEVICE))
    codes, w_scale = make_int8(K, N, seed=5)
    with pytest.raises(ValueError, match="int8"):
        T.w8a8_gemm(x, codes, w_scale.float().reshape(N))
    with pytest.raises(ValueError, match="w_scale"):
        T.w8a8_gemm(x, to_s8(codes), w_scale.reshape(N))  # float16, not float32
    with pytest.raises(ValueError, match="split_k"):
        T.w8a8_gemm(x, to_s8(codes), w_scale.float().reshape(N), split_k=0)
