"""Round-to-nearest (RTN) weight quantization onto the qvlm grid.

The baseline every search is compared with, and the initial grid of the searches:
min/max (asymmetric) or absmax (symmetric) scales per group, codes rounded to
nearest. Scales are rounded to the stored float16 first, so the codes are exact
for the scales that are written.
"""

from __future__ import annotations

import torch

from qvlm_kernels.format import FormatError, LayerSpec, num_groups
from qvlm_kernels.pack import pack_codes
from qvlm_kernels.reference import quantize_codes

_MIN_SCALE = 2.0**-24  # smallest positive float16


def to_float16_at_least(s: torch.Tensor) -> torch.Tensor:
    """Round scales *up* to float16, so the stored grid still spans the range it was fit to."""
    h = s.clamp(min=_MIN_SCALE).to(torch.float16)
    low = h.to(torch.float32) < s
    return torch.where(low, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def group_view(wt: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[K, N]`` -> ``[G, group, N]``, zero-padding a partial last group."""
    k, n = wt.shape
    gs = k if group_size == -1 else group_size
    g = num_groups(k, group_size)
    if g * gs != k:
        wt = torch.cat([wt, wt.new_zeros(g * gs - k, n)])
    return wt.reshape(g, gs, n)


def rtn_grid(wt: torch.Tensor, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (float16 ``[G, N]``) and zero points (uint8 or None) for ``wt [K, N]``.

    Zero padding of a partial group cannot change the result: both grids include 0.
    """
    groups = group_view(wt.to(torch.float32), spec.group_size)  # one column block at a time
    qmax = (1 << spec.bits) - 1
    if spec.symmetric:
        absmax = groups.abs().amax(dim=1)
        scales = to_float16_at_least(absmax / (spec.implicit_zero - 1))
        return scales, None
    lo = groups.amin(dim=1).clamp(max=0)
    hi = groups.amax(dim=1).clamp(min=0)
    scales = to_float16_at_least((hi - lo) / qmax)
    zeros = torch.round(-lo / scales.to(torch.float32)).clamp(0, qmax).to(torch.uint8)
    return scales, zeros


def quantize_rtn(
    weight: torch.Tensor, spec: LayerSpec, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Dense ``weight [N, K]`` -> stored ``(qweight, scales, qzeros)``."""
    if weight.dim() != 2:
        raise FormatError(f"tensor {name!r}: expected a 2-D linear weight, got shape {list(weight.shape)}")
    wt = weight.t()
    if not torch.isfinite(wt).all():
        raise FormatError(f"tensor {name!r}: contains NaN or Inf")
    spec.check_shape(wt.shape[0], where=f"tensor {name!r}: ")
    # Output channels are independent: work on column blocks to bound temporaries.
    parts = [_quantize_columns(wt[:, i : i + _COLUMNS], spec, name) for i in range(0, wt.shape[1], _COLUMNS)]
    qweight, scales, zeros = (torch.cat(p, dim=1) if p[0] is not None else None for p in zip(*parts))
    return qweight, scales, zeros


_COLUMNS = 1024


def _quantize_columns(wt: torch.Tensor, spec: LayerSpec, name: str):
    scales, zeros = rtn_grid(wt, spec)
    if not torch.isfinite(scales).all():
        raise FormatError(f"tensor {name!r}: weights too large for float16 scales")
    codes = quantize_codes(wt, scales, zeros, spec)
    return pack_codes(codes, spec.bits), scales, zeros
