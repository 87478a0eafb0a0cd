"""qvlm's CPU kernels (kernels/csrc/qvlm_cpu*.cpp) against the reference ops.

Every test runs once per instruction-set level this processor supports (AVX2; AVX-512 with
VNNI/BF16; AMX tiles), forced with ``cpu_ext.set_isa``, so each kernel variant meets the same
reference comparisons.

Weights are random codes over the full code range (every nibble value, top nibble
included) with random scales and zero points, so the packing, the partial last
group, column tails (N not a multiple of the 16-column tile) and both kernel paths
(register-tiled decode, dequantize + GEMM prefill) are all exercised. int8-activation
schemes are compared with the reference that applies the same per-token quantization.
Skipped, with the reason, where the kernels cannot be built (no AVX2/FMA/F16C, no compiler).
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qvlm_kernels import cpu_ext, reference
from qvlm_kernels.backends import (
    CpuAmxInt8Backend,
    CpuInt8Backend,
    QvlmCpuW4A8Backend,
    QvlmCpuW4A16Backend,
    QvlmCpuW8A8Backend,
)
from qvlm_kernels.dispatch import select_backend
from qvlm_kernels.format import QVLMQuantConfig
from qvlm_kernels.pack import pack_codes

pytestmark = pytest.mark.skipif(not cpu_ext.available(), reason=f"qvlm CPU kernels: {cpu_ext.unavailable_reason()}")


@pytest.fixture(autouse=True, params=cpu_ext.supported_isas() or ["none"])
def isa(request):
    """Run the test with the kernels of one instruction-set level, then restore the default."""
    if request.param == "none":  # kernels unavailable: the module is skipped anyway
        yield request.param
        return
    assert cpu_ext.set_isa(request.param) == request.param
    yield request.param
    cpu_ext.set_isa("auto")

BACKENDS = {"w4a16": QvlmCpuW4A16Backend, "w4a8": QvlmCpuW4A8Backend, "w8a8": QvlmCpuW8A8Backend}


def _spec(scheme, gs, sym):
    return QVLMQuantConfig(scheme=scheme, group_size=gs, symmetric=sym).layer_spec("m")


def _layer(k, n, spec, seed):
    g = torch.Generator().manual_seed(seed)
    groups = 1 if spec.group_size == -1 else -(-k // spec.group_size)
    codes = torch.randint(0, 1 << spec.bits, (k, n), generator=g)
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 1e-3).to(torch.float16)
    qzeros = None if spec.symmetric else torch.randint(0, 1 << spec.bits, (groups, n), generator=g).to(torch.uint8)
    return pack_codes(codes, spec.bits), scales, qzeros


def _tol(dtype, ref):
    rel = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    return rel * ref.abs().max().item() + 1e-6


def _check(scheme, gs, sym, k, n, m, dtype, bias, seed=0, gemm_min_rows=None, shape=None):
    spec = _spec(scheme, gs, sym)
    qweight, scales, qzeros = _layer(k, n, spec, seed)
    be = BACKENDS[scheme]()
    if gemm_min_rows is not None:
        be.gemm_min_rows = gemm_min_rows
    # float32 models keep the fallback for int8-activation schemes (see backends.py); the
    # kernels themselves take float32 inputs and are tested with them.
    assert be.supports(spec, k, n, dtype) == (dtype != torch.float32 or spec.act_mode == "none")
    p = be.prepare(qweight, scales, qzeros, spec, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*(shape or (m,)), k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    y = be.apply(p, x, b)
    ref = reference.linear(x.reshape(-1, k).float(), qweight, scales, qzeros, spec, None if b is None else b.float())
    ref = ref.reshape(*x.shape[:-1], n)
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.float() - ref).abs().max().item()
    assert err <= _tol(dtype, ref), f"{scheme} g={gs} sym={sym} K={k} N={n} M={m} {dtype}: max err {err}"


@pytest.mark.parametrize("scheme,gs,sym", [("w4a16", 128, True), ("w4a16", 64, False), ("w4a16", 32, True),
                                           ("w4a16", -1, False), ("w4a8", 128, True), ("w4a8", 32, False),
                                           ("w4a8", -1, True), ("w8a8", -1, True)])
@pytest.mark.parametrize("k", [64, 688, 4096])
@pytest.mark.parametrize("n", [8, 24, 100])
def test_grid(scheme, gs, sym, k, n):
    for m, dtype, bias in [(1, torch.bfloat16, False), (3, torch.float16, True), (8, torch.float32, True),
                           (33, torch.bfloat16, True)]:
        _check(scheme, gs, sym, k, n, m, dtype, bias, seed=k + n)


@pytest.mark.parametrize("scheme,gs,sym", [("w4a16", 128, True), ("w4a16", 128, False), ("w4a8", 128, False),
                                           ("w8a8", -1, True)])
def test_llava_like_width_and_prefill(scheme, gs, sym):
    """A wide, non-tile-multiple N (stand-in for 11008) at decode and an image-prompt M.

    One token row over 63 / 33 supertiles also takes the AVX-512 kernels' several-supertiles-
    at-once path and its single-supertile remainder.
    """
    _check(scheme, gs, sym, 1024, 1000, 1, torch.bfloat16, True)
    _check(scheme, gs, sym, 512, 520, 1, torch.bfloat16, False)
    _check(scheme, gs, sym, 1024, 1000, 8, torch.bfloat16, True)
    _check(scheme, gs, sym, 688, 200, 600, torch.bfloat16, False)


@pytest.mark.parametrize("scheme", ["w4a16", "w4a8"])
@pytest.mark.parametrize("gemm_min_rows", [1, 10**9])
@pytest.mark.parametrize("gs,sym", [(128, True), (64, False), (-1, True)])
def test_w4_both_paths(scheme, gemm_min_rows, gs, sym):
    """The dequantize + GEMM path (fp32, or bf16 with AVX512-BF16) and the register-tiled path agree with the reference."""
    for m in (1, 5, 40):
        _check(scheme, gs, sym, 688, 56, m, torch.bfloat16, True, gemm_min_rows=gemm_min_rows)
        _check(scheme, gs, sym, 256, 40, m, torch.float32, False, gemm_min_rows=gemm_min_rows)


def test_batched_input_shape():
    for scheme, gs in [("w4a16", 128), ("w4a8", 64), ("w8a8", -1)]:
        _check(scheme, gs, True, 256, 48, None, torch.bfloat16, True, shape=(2, 3))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(scheme=st.sampled_from(["w4a16", "w4a8", "w8a8"]), k8=st.integers(1, 90), n=st.integers(1, 70),
       m=st.integers(1, 20), gs=st.sampled_from([8, 32, 64, 128, -1]), sym=st.booleans(),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), bias=st.booleans(),
       k_extra=st.integers(0, 7), seed=st.integers(0, 1000))
def test_random_shapes(scheme, k8, n, m, gs, sym, dtype, bias, k_extra, seed):
    if scheme == "w8a8":
        gs, sym, k = -1, True, 8 * k8 + k_extra  # 8-bit: any K, per channel, symmetric
    else:
        k = 8 * k8
    _check(scheme, gs, sym, k, n, m, dtype, bias, seed=seed)


def test_w8a8_extreme_codes_do_not_saturate():
    """All weights -128 against all-positive activations: |sum| far beyond int16, exact in int32."""
    spec = _spec("w8a8", -1, True)
    k, n = 4096, 16
    qweight = torch.zeros(k, n, dtype=torch.uint8)  # code 0 -> weight -128
    scales = torch.full((1, n), 1e-3, dtype=torch.float16)
    x = torch.ones(2, k, dtype=torch.float32)
    be = QvlmCpuW8A8Backend()
    y = be.apply(be.prepare(qweight, scales, None, spec, torch.float32), x, None)
    ref = reference.linear(x, qweight, scales, None, spec)
    assert torch.allclose(y, ref, rtol=1e-5)


def test_quant_per_token_matches_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 77, generator=g) * torch.logspace(-3, 3, 9).unsqueeze(1)
    x[3] = 0.0  # all-zero row: scale clamps to 1e-10 / 127
    x[4, :10] = torch.arange(10) * 0.5  # exact ties round half to even
    q, s = cpu_ext.ops().quant_per_token(x)
    rq, rs = reference.quantize_per_token(x, 8)
    assert torch.equal(s, rs)
    assert torch.equal(q.float(), rq)


def test_dispatch_prefers_qvlm_kernels_on_cpu():
    assert select_backend(_spec("w4a16", 128, True), 4096, 4096, torch.bfloat16, "cpu").name == "qvlm_cpu_w4a16"
    assert select_backend(_spec("w4a8", 128, False), 4096, 4096, torch.bfloat16, "cpu").name == "qvlm_cpu_w4a8"
    w8 = select_backend(_spec("w8a8", -1, True), 4096, 4096, torch.bfloat16, "cpu").name
    amx = CpuAmxInt8Backend.supports(_spec("w8a8", -1, True), 4096, 4096, torch.bfloat16)
    onednn = CpuInt8Backend.supports(_spec("w8a8", -1, True), 4096, 4096, torch.bfloat16)
    assert w8 == ("cpu_amx_int8" if amx else "cpu_onednn_int8" if onednn else "qvlm_cpu_w8a8")
    # Fake-quant schemes have no integer kernel: dense fallback.
    assert select_backend(_spec("w4a4", 128, True), 4096, 4096, torch.bfloat16, "cpu").name == "dequantized"


def test_isa_levels(isa):
    levels = cpu_ext.supported_isas()
    assert levels[0] == "avx2" and levels == list(cpu_ext.ISAS[: len(levels)])
    assert cpu_ext.current_isa() == isa
    with pytest.raises(RuntimeError, match="unknown instruction set"):
        cpu_ext.set_isa("sse2")
    for unsupported in cpu_ext.ISAS[len(levels):]:
        with pytest.raises(RuntimeError, match="does not support"):
            cpu_ext.set_isa(unsupported)
    assert cpu_ext.current_isa() == isa


def test_amx_row_blocks(isa):
    """Token counts around the AMX kernel's thresholds and 16-row tiles (any level: same reference)."""
    for m in (2, 3, 15, 16, 17, 40):
        _check("w4a16", 128, False, 688, 40, m, torch.bfloat16, True)
        _check("w4a16", 32, True, 256, 17, m, torch.bfloat16, False)


def test_w4a16_int16_activations_keep_small_values():
    """Decode rows of 16-bit activations run as 15-bit codes with one power-of-two scale per group.

    Values 2^6 below the group's largest are still exact codes; smaller ones round at 2^-14 of it.
    Rows mixing magnitudes (outlier channels, as in LLMs) stay within the bf16 tolerance, and a
    per-channel group longer than 8192 rows combines the two int8 halves' sums in fp32.
    """
    spec = _spec("w4a16", 128, False)
    k, n = 1024, 48
    qweight, scales, qzeros = _layer(k, n, spec, 3)
    be = BACKENDS["w4a16"]()
    p = be.prepare(qweight, scales, qzeros, spec, torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    for m in (1, 2, 4):
        x = torch.randn(m, k, generator=g) * torch.logspace(-4, 2, k)[torch.randperm(k, generator=g)]
        x = x.to(torch.bfloat16)
        y = be.apply(p, x, None).float()
        ref = reference.linear(x.float(), qweight, scales, qzeros, spec, None)
        assert (y - ref).abs().max().item() <= _tol(torch.bfloat16, ref)
    _check("w4a16", -1, True, 16392, 24, 1, torch.bfloat16, True)
    _check("w4a16", -1, True, 16392, 24, 3, torch.float16, False)


@pytest.mark.parametrize("scheme,gs,sym", [("w4a16", 128, False), ("w4a8", 64, True)])
def test_prefill_gemm_blocks(scheme, gs, sym):
    """Prompt-sized calls around the prefill GEMM's blocking (any level: same reference).

    Rows: one and two 16-row tiles, a 32-row block plus a 16-row tail; K = 1040 spans two K
    chunks and ends mid-tile; N = 600 is 38 supertiles, so 3 panels of which the last is odd.
    Large calls before small ones reuse the per-thread scratch buffers; two threads split panels.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for m in (300, 17, 48, 32, 100, 16):
            _check(scheme, gs, sym, 1040, 600, m, torch.bfloat16, m % 2 == 0, gemm_min_rows=1, seed=m)
    finally:
        torch.set_num_threads(threads)


def test_unavailable_reason_when_disabled(monkeypatch):
    monkeypatch.setenv("QVLM_CPU_KERNELS", "0")
    assert "QVLM_CPU_KERNELS=0" in cpu_ext._load()
