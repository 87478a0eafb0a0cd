"""GPTQ (qvlm_offline.gptq): RTN's stored format, RTN's codes when inputs are
uncorrelated, clearly lower output error than RTN when they are correlated."""

import warnings

import pytest
import torch

from offline_helpers import write_fake_llava
from qvlm_kernels.checkpoint import read_tensor, tensor_table
from qvlm_kernels.format import LayerSpec, num_groups
from qvlm_kernels.pack import unpack_codes
from qvlm_kernels.reference import dequantize
from qvlm_offline.export import export_checkpoint
from qvlm_offline.gptq import HessianAccumulator, _inverse_cholesky, make_gptq_quantize_fn, quantize_gptq
from qvlm_offline.rtn import quantize_rtn, rtn_grid

N = 64


def spec(bits, group_size, symmetric=True):
    return LayerSpec("test", bits, group_size, symmetric, None, "none")


def correlated(k, *, n=N, tokens=2048, seed=0):
    """Activations with strongly correlated channels (low-rank mixing plus noise) and a weight."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, k, generator=g)
    a = torch.randn(k // 4, k, generator=g) / (k // 4) ** 0.5
    x = 2 * z[:, : k // 4] @ a + 0.3 * z
    w = torch.randn(n, k, generator=g)
    return x, w


def hessian_of(x):
    acc = HessianAccumulator(x.shape[-1])
    acc.update(x)
    return acc.hessian()


def output_error(x, w, stored, sp):
    return float((x @ w.t() - x @ dequantize(*stored, sp)).norm())


def assert_same(a, b):
    for ta, tb in zip(a, b):
        assert (ta is None) == (tb is None)
        if ta is not None:
            assert ta.dtype == tb.dtype and torch.equal(ta, tb)


SETTINGS = [  # (bits, group_size, symmetric, K)
    (4, 128, True, 256),
    (4, 64, False, 256),
    (4, -1, True, 256),
    (8, -1, True, 256),
    (4, 64, True, 200),  # partial last group: 64, 64, 64, 8
    (4, 64, False, 200),
]


# (a) H = I: no correlation to exploit, and GPTQ's updates are all zero. Each
# group's grid is RTN's rule on the (unchanged) weights and codes use the same
# rounding, so the result is bit-identical to RTN.
@pytest.mark.parametrize("bits,group_size,symmetric,k", [*SETTINGS, (6, 32, False, 96)])
def test_identity_hessian_gives_exactly_rtn(bits, group_size, symmetric, k):
    sp = spec(bits, group_size, symmetric)
    w = torch.randn(N, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    rtn = quantize_rtn(w, sp)
    assert_same(quantize_gptq(w, sp, torch.eye(k)), rtn)
    # Any diagonal H (uncorrelated inputs of any scales) too, in any column order.
    diag = torch.diag(torch.rand(k, generator=torch.Generator().manual_seed(2)) * 5 + 0.1)
    assert_same(quantize_gptq(w, sp, diag, act_order=True), rtn)


# (b) Correlated inputs: GPTQ's output error is clearly below RTN's (measured ~0.36-0.41x).
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,group_size,symmetric,k", SETTINGS)
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size, symmetric, k, act_order):
    sp = spec(bits, group_size, symmetric)
    x, w = correlated(k)
    e_gptq = output_error(x, w, quantize_gptq(w, sp, hessian_of(x), act_order=act_order), sp)
    e_rtn = output_error(x, w, quantize_rtn(w, sp), sp)
    assert e_gptq < 0.8 * e_rtn, (e_gptq / e_rtn)


def naive_gptq_codes(w, h, sp, damp=0.01):
    """The algorithm as written in the paper, one column at a time, in float64, no lazy batching."""
    w = w.double().clone()
    k = w.shape[1]
    h = h.double() + damp * torch.diagonal(h).double().mean() * torch.eye(k, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    gs = k if sp.group_size == -1 else sp.group_size
    codes = torch.empty(k, w.shape[0], dtype=torch.uint8)
    for j in range(k):
        if j % gs == 0:
            s, z = rtn_grid(w[:, j : j + gs].t(), spec(sp.bits, -1, sp.symmetric))
            s = s[0].double()
            z = float(sp.implicit_zero) if z is None else z[0].double()
        q = torch.clamp(torch.round(w[:, j] / s) + z, 0, (1 << sp.bits) - 1)
        codes[j] = q.to(torch.uint8)
        e = (w[:, j] - (q - z) * s) / u[j, j]
        w[:, j:] -= e[:, None] * u[j, j:][None, :]
    return codes


# Lazy batch updates and block sizes only reorder float work: codes match a naive,
# unbatched float64 implementation up to rare rounding ties.
@pytest.mark.parametrize("bits,group_size,symmetric,k", [(4, 64, False, 200), (4, -1, True, 256)])
@pytest.mark.parametrize("block_size", [16, 128, 1024])
def test_matches_unbatched_reference(bits, group_size, symmetric, k, block_size):
    sp = spec(bits, group_size, symmetric)
    x, w = correlated(k, n=32)
    h = hessian_of(x)
    codes = unpack_codes(quantize_gptq(w, sp, h, block_size=block_size)[0], bits)
    ref = naive_gptq_codes(w, h, sp)
    assert (codes != ref).float().mean() < 0.01


# (c) Stored tensors follow the format and dequantize.
@pytest.mark.parametrize("bits,group_size,symmetric,k", [*SETTINGS, (6, 32, False, 96), (6, -1, True, 96)])
def test_stored_tensors_follow_the_format(bits, group_size, symmetric, k):
    sp = spec(bits, group_size, symmetric)
    x, w = correlated(k, n=24)
    stored = quantize_gptq(w.to(torch.float16), sp, hessian_of(x), act_order=bits == 4)
    expected = sp.tensor_shapes(k, 24)
    got = dict(zip(("qweight", "scales", "qzeros"), stored))
    assert (got["qzeros"] is None) == symmetric
    for suffix, (shape, dtype) in expected.items():
        assert tuple(got[suffix].shape) == shape and str(got[suffix].dtype) == f"torch.{dtype}", suffix
    assert got["scales"].shape[0] == num_groups(k, group_size)
    assert (got["scales"] > 0).all() and torch.isfinite(got["scales"]).all()
    deq = dequantize(*stored, sp)
    assert deq.shape == (k, 24) and torch.isfinite(deq).all()
    # The error-compensated weights stay near the original: within the group's grid range.
    assert (deq - w.t()).abs().max() < 2 * float(w.abs().max())


# (d) Inputs that are always zero give zero Hessian rows: no NaN, weights there become 0.
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 64, False), (4, -1, True)])
def test_dead_inputs(bits, group_size, symmetric, act_order):
    sp = spec(bits, group_size, symmetric)
    x, w = correlated(128, n=16)
    dead = [0, 5, 64, 127]
    x[:, dead] = 0
    stored = quantize_gptq(w, sp, hessian_of(x), act_order=act_order)
    deq = dequantize(*stored, sp)
    assert torch.isfinite(deq).all() and torch.isfinite(stored[1].float()).all()
    assert (deq[dead] == 0).all()
    assert output_error(x, w, stored, sp) < output_error(x, w, quantize_rtn(w, sp), sp)
    # No calibration data at all: everything is dead, still a valid (all-zero) layer.
    deq0 = dequantize(*quantize_gptq(w, sp, torch.zeros(128, 128)), sp)
    assert (deq0 == 0).all()


# (e) Determinism.
def test_deterministic():
    sp = spec(4, 64, False)
    x, w = correlated(200, n=32)
    h = hessian_of(x)
    assert_same(quantize_gptq(w, sp, h), quantize_gptq(w, sp, h.clone()))
    assert_same(quantize_gptq(w, sp, h, act_order=True), quantize_gptq(w, sp, h, act_order=True))


def test_hessian_accumulator_streams_over_tokens():
    x = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(0))
    acc = HessianAccumulator(16)
    lin = torch.nn.Linear(16, 4)
    handle = acc.register(lin)
    lin(x[:2])
    handle.remove()
    acc.update(x[2:])
    assert acc.n_samples == 30
    flat = x.reshape(-1, 16).double()
    assert torch.allclose(acc.hessian(), 2 / 30 * flat.t() @ flat, rtol=1e-12, atol=1e-12)
    assert acc.hessian().dtype == torch.float64
    with pytest.raises(ValueError):
        acc.update(torch.randn(4, 8))


def torch_inverse_cholesky(h):
    """The textbook upper factor of H^-1, by torch's solvers."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_place_inverse_is_the_upper_factor_of_the_inverse(dtype):
    """The CPU inverse runs in the Hessian's own memory (LAPACK on a Fortran view) and gives
    the same factor as torch's out-of-place solvers."""
    x, _ = correlated(96, tokens=512)
    h = hessian_of(x).to(dtype)
    want = torch_inverse_cholesky(h + 0.01 * h.diagonal().mean() * torch.eye(96, dtype=dtype))
    work = h.clone()
    ptr = work.data_ptr()
    u = _inverse_cholesky(work, 0.01, "t")
    assert u.data_ptr() == ptr and u.dtype == dtype
    assert torch.equal(u, u.triu())
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose(u, want, rtol=tol, atol=tol * float(want.abs().max()))


def test_in_place_inverse_retries_from_the_intact_triangle():
    """A Hessian that is not positive definite at the first damping: the failed attempt wrote
    into the buffer, the retry restores H from the other triangle and succeeds with more damping."""
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    h = q @ torch.diag(torch.linspace(-0.05, 3.0, 64, dtype=torch.float64)) @ q.t()
    h = (h + h.t()) / 2
    with pytest.warns(UserWarning, match="not positive definite"):
        u = _inverse_cholesky(h.clone(), 0.01, "t")
    used = None
    for d in (0.1, 1.0):  # the damping the retry ends on: the first that factors
        try:
            want = torch_inverse_cholesky(h + d * h.diagonal().mean() * torch.eye(64, dtype=torch.float64))
            used = d
            break
        except RuntimeError:
            continue
    assert used is not None
    assert torch.allclose(u, want, rtol=1e-9, atol=1e-9)


def test_taken_hessian_and_overwrite_give_the_same_codes():
    """``take()`` scales the sum in place (no copy); ``overwrite_hessian`` solves in the caller's
    matrix. Both give exactly the codes of the copying path."""
    sp = spec(4, 64, False)
    x, w = correlated(200, n=32)
    acc = HessianAccumulator(200, dtype=torch.float64)
    acc.update(x)
    h = acc.hessian()
    ptr = acc._sum.data_ptr()
    taken = acc.take()
    assert taken.data_ptr() == ptr and torch.equal(taken, h)
    want = quantize_gptq(w, sp, h)
    assert torch.equal(h, taken)  # the copying path left the caller's matrix alone
    assert_same(quantize_gptq(w, sp, taken, overwrite_hessian=True), want)


def test_bad_hessian_is_rejected():
    w = torch.randn(8, 32)
    with pytest.raises(ValueError, match="Hessian"):
        quantize_gptq(w, spec(4, -1), torch.eye(16))
    with pytest.raises(ValueError, match="NaN"):
        quantize_gptq(w, spec(4, -1), torch.full((32, 32), float("nan")))


def test_quantize_fn_looks_up_by_module_and_falls_back_to_rtn():
    sp = spec(4, 64, True)
    x, w = correlated(128, n=16)
    h = hessian_of(x)
    fn = make_gptq_quantize_fn({"model.layers.0.mlp.down_proj": h}, block_size=64)
    assert_same(fn(w, sp, "model.layers.0.mlp.down_proj.weight"), quantize_gptq(w, sp, h, block_size=64))
    with pytest.warns(UserWarning, match="falling back to RTN"):
        out = fn(w, sp, "model.layers.0.mlp.up_proj.weight")
    assert_same(out, quantize_rtn(w, sp))
    empty = make_gptq_quantize_fn({"m": HessianAccumulator(128)})
    with pytest.warns(UserWarning, match="falling back to RTN"):
        assert_same(empty(w, sp, "m.weight"), quantize_rtn(w, sp))


def test_plugs_into_the_exporter(tmp_path):
    src, tensors = write_fake_llava(tmp_path / "src", hidden=64, intermediate=136)
    eye = {name.rpartition(".")[0]: torch.eye(t.shape[1]) for name, t in tensors.items() if t.dim() == 2}
    export_checkpoint(src, tmp_path / "rtn", scheme="w4a16", group_size=64, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_checkpoint(src, tmp_path / "gptq", scheme="w4a16", group_size=64, method="gptq",
                          quantize_fn=make_gptq_quantize_fn(eye), progress=False)
    a, b = tensor_table(tmp_path / "rtn"), tensor_table(tmp_path / "gptq")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(read_tensor(a[name]), read_tensor(b[name])), name


def test_a_sequence_of_weights_is_their_stacked_rows():
    """Linears that read one input are one problem: a list of weights gives exactly what their
    stacked rows give, without the caller stacking them (16-bit weights upcast the same way)."""
    sp = spec(4, 64, False)
    x, w = correlated(200, n=48)
    parts = [w[:16].to(torch.bfloat16), w[16:].to(torch.bfloat16)]
    h = hessian_of(x)
    assert_same(quantize_gptq(parts, sp, h), quantize_gptq(torch.cat(parts), sp, h))
    with pytest.raises(Exception, match="one input width"):
        quantize_gptq([w, w[:, :100]], sp, h)
