"""Pack/unpack and quantize/dequantize round trips, as properties over shapes and settings."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qvlm_kernels import reference
from offline_helpers import make_layer_tensors
from qvlm_kernels.format import LayerSpec, QVLMQuantConfig, num_groups
from qvlm_kernels.pack import append_zero_rows, expand_groups, pack_codes, pack_int4, unpack_codes, unpack_int4
from qvlm_offline.rtn import quantize_rtn

bits_st = st.sampled_from([4, 6, 8])


@settings(max_examples=60, deadline=None)
@given(k8=st.integers(1, 40), n=st.integers(1, 40), bits=bits_st, seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip_is_identity(k8, n, bits, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (k8 * 8, n), generator=g).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == (torch.int32 if bits == 4 else torch.uint8)
    assert packed.shape == (k8 * 8 // (8 if bits == 4 else 1), n)
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_int4_nibble_order_is_row_8i_plus_j_in_nibble_j():
    codes = torch.zeros(8, 1, dtype=torch.uint8)
    codes[3, 0] = 0xA
    codes[7, 0] = 0xF
    word = pack_int4(codes)[0, 0].item() & 0xFFFFFFFF
    assert word == (0xA << 12) | (0xF << 28)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)


@settings(max_examples=40, deadline=None)
@given(
    k8=st.integers(1, 50), n=st.integers(1, 24), bits=bits_st, sym=st.booleans(),
    group=st.sampled_from([-1, 8, 16, 32, 128]), seed=st.integers(0, 2**16),
)
def test_rtn_dequantization_error_is_within_half_a_step(k8, n, bits, sym, group, seed):
    k = k8 * 8
    spec = LayerSpec("t", bits, group, sym, None, "none")
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    qweight, scales, qzeros = quantize_rtn(w, spec)
    assert scales.shape == (num_groups(k, group), n) and scales.dtype == torch.float16
    deq = reference.dequantize(qweight, scales, qzeros, spec)
    step = expand_groups(scales.float(), group, k)
    # Symmetric grids clip nothing (absmax maps to +-(2^(b-1)-1)); asymmetric grids span [min, max].
    assert ((deq - w.t()).abs() <= step * 0.5 + 1e-6).all()
    # Re-quantizing the dequantized weights on the same grid gives the same codes.
    again = reference.quantize_codes(deq, scales, qzeros, spec)
    assert torch.equal(pack_codes(again, bits), qweight)


def test_partial_last_group_covers_the_remaining_rows():
    k, gs = 688, 128  # 5 full groups + 48 rows
    spec = LayerSpec("w4a16", 4, gs, True, None, "none")
    w = torch.randn(16, k)
    w[:, 640:] *= 100  # the partial group alone has a large range
    _, scales, _ = quantize_rtn(w, spec)
    assert scales.shape == (6, 16)
    assert (scales[5].float() > 10 * scales[:5].float().max()).all()


@pytest.mark.parametrize("scheme,gs,sym", [("w8a8", -1, True), ("w4a8", 64, True), ("w4a8", 32, False),
                                           ("w4a8", -1, False), ("w4a16", 128, True)])
def test_appended_rows_dequantize_to_exact_zeros(scheme, gs, sym):
    spec = QVLMQuantConfig(scheme=scheme, group_size=gs, symmetric=sym).layer_spec("m")
    t = make_layer_tensors(256, 48, spec, seed=5)
    q, s, z = append_zero_rows(t["qweight"], t["scales"], t.get("qzeros"), spec, 128)
    w = reference.dequantize(q, s, z, spec)
    assert w.shape == (384, 48)
    assert torch.equal(w[:256], reference.dequantize(t["qweight"], t["scales"], t.get("qzeros"), spec))
    assert torch.count_nonzero(w[256:]) == 0
