"""Pure-torch reference ops for every scheme: the oracle that tests compare kernels to.

Slow on purpose: plain float32 math that states the format's semantics directly.
"""

from __future__ import annotations

import torch

from .format import LayerSpec
from .pack import expand_groups, unpack_codes


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    spec: LayerSpec,
) -> torch.Tensor:
    """Stored tensors -> float32 ``w [K, N]`` with ``y = x @ w``."""
    codes = unpack_codes(qweight, spec.bits).to(torch.float32)
    k = codes.shape[0]
    s = expand_groups(scales.to(torch.float32), spec.group_size, k)
    if qzeros is None:
        z = float(spec.implicit_zero)
    else:
        z = expand_groups(qzeros.to(torch.float32), spec.group_size, k)
    return (codes - z) * s


def quantize_codes(
    w: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, spec: LayerSpec
) -> torch.Tensor:
    """float ``w [K, N]`` on a given grid -> unsigned codes ``[K, N]`` (round to nearest)."""
    k = w.shape[0]
    s = expand_groups(scales.to(torch.float32), spec.group_size, k)
    z = float(spec.implicit_zero) if qzeros is None else expand_groups(qzeros.to(torch.float32), spec.group_size, k)
    q = torch.round(w.to(torch.float32) / s) + z
    return q.clamp(0, (1 << spec.bits) - 1).to(torch.uint8)


def quantize_per_token(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic per-token quantization: ``x ~= q * scale`` with ``q`` in ``[-(2^(b-1)-1), 2^(b-1)-1]``."""
    qmax = (1 << (bits - 1)) - 1
    xf = x.to(torch.float32)
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10) / qmax
    q = torch.round(xf / scale).clamp(-qmax - 1, qmax)
    return q, scale


def fake_quantize_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    q, scale = quantize_per_token(x, bits)
    return (q * scale).to(x.dtype)


def linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    spec: LayerSpec,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference quantized linear, including the scheme's activation quantization."""
    w = dequantize(qweight, scales, qzeros, spec)
    xf = x.to(torch.float32)
    if spec.act_mode != "none":
        q, s = quantize_per_token(xf, spec.act_bits)
        xf = q * s
    y = xf @ w
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
