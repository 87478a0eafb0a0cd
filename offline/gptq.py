"""GPTQ weight quantization onto the qvlm grid (Frantar et al. 2022).

What: layer-wise post-training quantization with second-order error compensation.
For one linear layer with calibration inputs ``X [n, K]`` GPTQ minimises the output
error ``||X W^T - X Q^T||_F^2`` column by column: each input column of ``W [N, K]``
is rounded onto its group's grid and the rounding error is spread over the not yet
quantized columns through the inverse Hessian ``H = 2/n X^T X`` (via the upper
Cholesky factor of ``H^-1``). Columns are processed in blocks with lazy batch
updates, as in the paper.

Why: RTN ignores how inputs correlate; GPTQ uses the calibration Hessian and
lowers the layer output error at the same storage cost. The output is exactly
RTN's stored format (``qweight``, float16 ``scales [G, N]``, uint8 ``qzeros`` or
None), so :func:`make_gptq_quantize_fn` plugs into ``export_checkpoint`` as a
``quantize_fn``.

Grids: each group's scale/zero is RTN's rule (:func:`qvlm_offline.rtn.rtn_grid`,
scales rounded up to float16) applied to the *current*, error-updated weights of
that group's columns when the group starts (the reference implementation's
``static_groups=False``; blocks are aligned to groups so a group's columns are
always fully up to date). Per-channel layers (``group_size == -1``) fit the grid
once on the original weights. With ``act_order=True`` columns are processed in
order of decreasing Hessian diagonal, and the grids are *static*: fitted on the
original weights before permuting, so stored groups stay contiguous along K.
Codes use the same math as ``qvlm_kernels.reference.quantize_codes``; with
``H = I`` the result is bit-identical to RTN.

Dead inputs (``H[k, k] == 0``: the input is always zero in calibration) get
``H[k, k] = 1`` and their weight column is set to 0, as in the reference code.

What it does not do: collect activations from a model (see
:class:`HessianAccumulator`, fed by forward hooks elsewhere), sequential
layer-by-layer requantization of inputs, activation quantization, or any search
over clipping ranges.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import torch

from qvlm_kernels.format import FormatError, LayerSpec
from qvlm_kernels.pack import pack_codes

from .rtn import quantize_rtn, rtn_grid

__all__ = ["HessianAccumulator", "quantize_gptq", "make_gptq_quantize_fn"]


class HessianAccumulator:
    """Streaming ``H = 2/n * sum_t x_t x_t^T`` over the tokens of a linear layer's inputs.

    ``update(x)`` takes activations ``[..., K]`` (all leading dims are tokens).
    The raw sum is kept in ``dtype`` (float64 by default: sums over many tokens
    lose precision in float32, and the ``K x K`` matrix is small next to a model)
    and normalised only when :meth:`hessian` is read, so chunking the data does
    not change the result beyond summation order.
    """

    def __init__(self, in_features: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float64) -> None:
        self.in_features = int(in_features)
        self._sum = torch.zeros(self.in_features, self.in_features, dtype=dtype, device=device)
        self.n_samples = 0  # tokens seen

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"HessianAccumulator: expected inputs [..., {self.in_features}], got {list(x.shape)}")
        x = x.reshape(-1, self.in_features).to(device=self._sum.device, dtype=self._sum.dtype)
        if not torch.isfinite(x).all():
            raise ValueError("HessianAccumulator: activations contain NaN or Inf")
        self._sum.addmm_(x.t(), x)
        self.n_samples += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """``2/n * X^T X`` in the accumulation dtype (all zeros before any update)."""
        if self.n_samples == 0:
            return self._sum.clone()
        return self._sum * (2.0 / self.n_samples)

    def take(self) -> torch.Tensor:
        """:meth:`hessian` without a copy: the sum is scaled in place and handed over (the
        accumulator is spent after this; ``K x K`` is 0.5 GB at K = 11008 in float32)."""
        h, self._sum = self._sum, None
        if self.n_samples:
            h.mul_(2.0 / self.n_samples)
        return h

    def register(self, module: torch.nn.Module):
        """Feed this accumulator from ``module``'s forward inputs; returns the hook handle."""
        return module.register_forward_pre_hook(lambda _m, args: self.update(args[0]))


# Widest input whose Hessian inverse is computed in float64; wider ones in float32 (as
# llm-compressor does for all): at K = 11008 (LLaVA-7B's down_proj) one K x K matrix is
# 0.97 GB in float64, 0.48 GB in float32.
FLOAT64_INVERSE_MAX = 8192


def _finite(t: torch.Tensor, rows: int = 1024) -> bool:
    """All of ``t`` finite, checked ``rows`` rows at a time (no ``K x K`` mask)."""
    return all(bool(torch.isfinite(c).all()) for c in t.split(rows))


def _mirror_lower_(h: torch.Tensor, block: int = 1024) -> None:
    """Make ``h`` symmetric from its lower triangle, in place (temporaries of ``block x K``)."""
    k = h.shape[0]
    for i0 in range(0, k, block):
        i1 = min(i0 + block, k)
        d = h[i0:i1, i0:i1]
        d.copy_(d.tril() + d.tril(-1).t())
        if i1 < k:
            h[i0:i1, i1:].copy_(h[i1:, i0:i1].t())


def _lapack_inverse_cholesky_(h: torch.Tensor) -> int:
    """CPU: ``h`` (C-ordered, symmetric) -> the upper Cholesky factor of its inverse, in place
    in ``h``'s own memory (LAPACK potrf, potri, potrf); returns LAPACK's ``info`` (0: done).

    The buffer's transpose is a Fortran-ordered view of the same symmetric matrix, so LAPACK
    works on it without a copy. Each call writes only the Fortran lower triangle (the C upper
    triangle and the diagonal); the C strict lower triangle keeps ``h``'s values throughout,
    so a failed attempt can be restored from it (:func:`_mirror_lower_`). On success the
    Fortran lower factor ``L`` of the inverse reads in C order as ``L^T``: the upper factor."""
    import numpy as np
    from scipy.linalg import lapack

    a = h.numpy().T
    potrf, potri = lapack.get_lapack_funcs(("potrf", "potri"), (a,))
    c, info = potrf(a, lower=1, overwrite_a=1, clean=0)
    if info == 0:
        c, info = potri(c, lower=1, overwrite_c=1)
    if info == 0:
        c, info = potrf(c, lower=1, overwrite_a=1, clean=0)
    if not np.shares_memory(c, a):  # a SciPy that copied: take its result
        h.copy_(torch.from_numpy(np.ascontiguousarray(c.T)))
    if info == 0:
        h.triu_()
    return int(info)


def _inverse_cholesky(h: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``; more damping if needed.

    Consumes ``h`` (the caller's working copy): damped in place, and on a CPU the factor, the
    inverse and the factor of the inverse are computed in its own memory by LAPACK (no other
    ``K x K`` matrix: 0.5 GB at K = 11008 in float32). Elsewhere (CUDA) torch's solvers run
    beside it, their results in one more buffer."""
    diag = torch.diagonal(h)
    undamped = diag.clone()
    base = float(undamped.mean())
    d = damp
    in_place = h.device.type == "cpu" and h.is_contiguous()
    info = torch.empty((), dtype=torch.int32, device=h.device)
    for attempt in range(6):
        if attempt and in_place:
            _mirror_lower_(h)  # undo a failed attempt: the C lower triangle still holds H
        torch.add(undamped, d * base, out=diag)
        if in_place:
            ok = _lapack_inverse_cholesky_(h) == 0 and _finite(h)
            u = h
        else:
            u, bad = torch.linalg.cholesky_ex(h)
            ok = int(bad) == 0
            if ok:
                torch.cholesky_inverse(u, out=u)
                torch.linalg.cholesky_ex(u, upper=True, out=(u, info))
                ok = int(info) == 0 and _finite(u)
        if ok:
            if attempt:
                warnings.warn(f"GPTQ {name!r}: Hessian not positive definite with damp={damp}; used {d:g}",
                              stacklevel=3)
            return u
        del u
        d = max(d, 1e-6) * 10
    raise FormatError(f"tensor {name!r}: GPTQ Hessian is not positive definite even with damp={d / 10:g}")


@torch.no_grad()
def quantize_gptq(
    weight: torch.Tensor | Sequence[torch.Tensor],
    spec: LayerSpec,
    hessian: torch.Tensor,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    name: str = "weight",
    overwrite_hessian: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Dense ``weight [N, K]`` + input Hessian ``[K, K]`` -> stored ``(qweight, scales, qzeros)``.

    ``weight`` may be a sequence of ``[N_i, K]`` weights that read the same input: solved as
    one problem with their rows stacked (each row's solution is the one it would get alone),
    without a stacked copy in the weights' dtype.

    ``damp`` is relative to the mean Hessian diagonal; ``block_size`` is the lazy
    batch width (rounded to a multiple of the group size when groups are fitted
    on the fly, so the math does not depend on it beyond float rounding).
    The Hessian inverse is computed in float64 (in float32 for inputs wider than
    ``FLOAT64_INVERSE_MAX``), the column sweep in float32. ``overwrite_hessian``: the
    caller's ``hessian`` may serve as the inverse's working memory (no ``K x K`` copy when it
    is already in the inverse's dtype and on the weight's device); it is garbage afterwards.
    """
    parts = [weight] if isinstance(weight, torch.Tensor) else list(weight)
    for part in parts:
        if part.dim() != 2 or part.shape[1] != parts[0].shape[1]:
            raise FormatError(f"tensor {name!r}: expected 2-D linear weights of one input width, got shapes "
                              f"{[list(p.shape) for p in parts]}")
        if not _finite(part):
            raise FormatError(f"tensor {name!r}: contains NaN or Inf")
    n, k = sum(p.shape[0] for p in parts), parts[0].shape[1]
    spec.check_shape(k, where=f"tensor {name!r}: ")
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"tensor {name!r}: Hessian must be [{k}, {k}], got {list(hessian.shape)}")
    if not _finite(hessian):
        raise ValueError(f"tensor {name!r}: Hessian contains NaN or Inf")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")

    dev = parts[0].device
    # Transposed, [K, N]: each input column of W is a contiguous row, so the per-column steps
    # below run over contiguous N-vectors (several times faster on CPUs than strided columns).
    w = torch.empty(k, n, dtype=torch.float32, device=dev)
    row = 0
    for part in parts:
        w[:, row:row + part.shape[0]].copy_(part.t())
        row += part.shape[0]
    del parts, weight
    h = hessian.to(device=dev, dtype=torch.float64 if k <= FLOAT64_INVERSE_MAX else torch.float32,
                   copy=not overwrite_hessian).contiguous()
    del hessian
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0

    gs = spec.group_size
    qmax = float((1 << spec.bits) - 1)
    static = act_order or gs == -1
    if static:
        # One grid per group, fitted before any update (and before permuting).
        scales, zeros = rtn_grid(w, spec)
        _check_scales(scales, name)
        s_all = scales.to(torch.float32)
        z_all = None if zeros is None else zeros.to(torch.float32)
    else:
        block_size = gs * max(1, block_size // gs)  # a group never straddles two blocks
        s_parts: list[torch.Tensor] = []
        z_parts: list[torch.Tensor] = []

    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w = w[perm]
        h = h[perm][:, perm]
    else:
        perm = None
    col_group = None
    if static:
        orig = perm if perm is not None else torch.arange(k, device=dev)
        col_group = torch.zeros(k, dtype=torch.long, device=dev) if gs == -1 else orig // gs

    u = _inverse_cholesky(h, damp, name).to(torch.float32)
    del h
    codes = torch.empty(k, n, dtype=torch.uint8, device=dev)  # [K, N], the packer's layout
    implicit = float(spec.implicit_zero)
    s_col = z_col = None

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        if static:
            g_blk = col_group[i1:i2].tolist()
        for i in range(i2 - i1):
            col = i1 + i
            if static:
                g = g_blk[i]
                s_col = s_all[g]
                z_col = implicit if z_all is None else z_all[g]
            elif col % gs == 0:
                width = min(gs, k - col)
                sc, zc = rtn_grid(w1[i : i + width], spec)
                _check_scales(sc, name)
                s_parts.append(sc)
                s_col = sc[0].to(torch.float32)
                if zc is None:
                    z_col = implicit
                else:
                    z_parts.append(zc)
                    z_col = zc[0].to(torch.float32)
            x = w1[i]
            q = torch.clamp(torch.round(x / s_col) + z_col, 0.0, qmax)
            codes[col] = q.to(torch.uint8)
            e = (x - (q - z_col) * s_col) / u1[i, i]
            w1[i:] -= u1[i, i:].unsqueeze(1) * e.unsqueeze(0)
            err1[i] = e
        w[i2:].addmm_(u[i1:i2, i2:].t(), err1, alpha=-1.0)  # in place: no [K, N] temporary

    if perm is not None:
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(k, device=dev)
        codes = codes[inv]
    if not static:
        scales = torch.cat(s_parts)
        zeros = torch.cat(z_parts) if z_parts else None
    qweight = pack_codes(codes, spec.bits)
    return qweight, scales, zeros


def _check_scales(scales: torch.Tensor, name: str) -> None:
    if not torch.isfinite(scales).all():
        raise FormatError(f"tensor {name!r}: weights too large for float16 scales")


def make_gptq_quantize_fn(
    hessians: Mapping[str, torch.Tensor | HessianAccumulator], **kw
) -> Callable[[torch.Tensor, LayerSpec, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """A ``quantize_fn(weight, spec, name)`` for ``export_checkpoint`` backed by GPTQ.

    ``hessians`` maps module names (``name`` minus its ``.weight`` suffix; the full
    tensor name is accepted too) to a Hessian or a :class:`HessianAccumulator`.
    A layer without one (or whose accumulator saw no tokens) falls back to RTN
    with a warning. ``kw`` goes to
    :func:`quantize_gptq` (``damp``, ``block_size``, ``act_order``).
    """

    def quantize_fn(weight: torch.Tensor, spec: LayerSpec, name: str = "weight"):
        module = name[: -len(".weight")] if name.endswith(".weight") else name
        h = hessians.get(module)
        if h is None:
            h = hessians.get(name)
        if isinstance(h, HessianAccumulator):
            h = h.hessian() if h.n_samples else None
        if h is None:
            warnings.warn(f"GPTQ: no Hessian for {module!r}; falling back to RTN", stacklevel=2)
            return quantize_rtn(weight, spec, name)
        return quantize_gptq(weight, spec, h, name=name, **kw)

    return quantize_fn
