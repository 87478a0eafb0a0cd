"""Pack and unpack integer codes to and from the on-disk layout (see format.py).

Pure tensor functions, no I/O, no vLLM: the writer, the loader and the tests all
use these, so the bit layout is defined by exactly one implementation.
"""

from __future__ import annotations

import torch

from .format import FormatError

_NIBBLE_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # row j of a word -> bits 4j..4j+3
_BAND_ELEMENTS = 1 << 23  # codes packed per band (pack_int4's temporaries: 2 x 32 MB of int32)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """``[K, N]`` codes in ``[0, 15]`` -> ``int32 [K/8, N]``, 8 rows per word (row 8i+j in nibble j).

    Packed a band of rows at a time: the int32 temporaries stay near 32 MB whatever the
    layer's size (a whole-tensor pass would hold two int32 copies of the codes, 8x their size)."""
    if codes.dim() != 2 or codes.shape[0] % 8:
        raise FormatError(f"pack_int4 needs [K, N] codes with K % 8 == 0, got shape {tuple(codes.shape)}")
    k, n = codes.shape
    out = torch.empty(k // 8, n, dtype=torch.int32, device=codes.device)
    shifts = _NIBBLE_SHIFTS.to(codes.device).view(1, 8, 1)
    words = max(1, _BAND_ELEMENTS // max(8 * n, 1))
    for w0 in range(0, k // 8, words):
        w1 = min(w0 + words, k // 8)
        c = codes[8 * w0:8 * w1].to(torch.int32).reshape(w1 - w0, 8, n)
        if c.numel() and (int(c.min()) < 0 or int(c.max()) > 15):
            raise FormatError("pack_int4: codes must lie in [0, 15]")
        # Sum of disjoint shifted nibbles == bitwise OR; int32 wraps for the top nibble as intended.
        torch.sum(c << shifts, dim=1, dtype=torch.int32, out=out[w0:w1])
    return out


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """``int32 [K/8, N]`` -> ``uint8 [K, N]`` codes in ``[0, 15]``."""
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise FormatError(f"unpack_int4 needs an int32 [K/8, N] tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    k8, n = qweight.shape
    shifts = _NIBBLE_SHIFTS.to(qweight.device).view(1, 8, 1)
    return ((qweight.unsqueeze(1) >> shifts) & 0xF).reshape(k8 * 8, n).to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[K, N]`` in ``[0, 2**bits)`` -> the stored ``qweight`` tensor."""
    if bits == 4:
        return pack_int4(codes)
    if bits in (6, 8):
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
            raise FormatError(f"pack_codes: {bits}-bit codes must lie in [0, {(1 << bits) - 1}]")
        return codes.to(torch.uint8).contiguous()
    raise FormatError(f"unsupported weight bit-width {bits}")


def unpack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """The stored ``qweight`` tensor -> ``uint8 [K, N]`` codes."""
    if bits == 4:
        return unpack_int4(qweight)
    if bits in (6, 8):
        if qweight.dtype != torch.uint8:
            raise FormatError(f"{bits}-bit qweight must be uint8, got {qweight.dtype}")
        return qweight
    raise FormatError(f"unsupported weight bit-width {bits}")


def expand_groups(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """Per-group ``[G, N]`` -> per-row ``[K, N]`` (last group may be partial)."""
    if group_size == -1:
        return t.expand(in_features, t.shape[1])
    return t.repeat_interleave(group_size, dim=0)[:in_features]


def append_zero_rows(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, spec,
                     rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A layer's stored tensors with ``rows`` more input rows whose weights dequantize to exactly 0.

    The new rows' codes equal their zero point (``(u - z) * s == 0`` whatever the scale): in
    new groups of their own for group-wise layers (``rows`` a multiple of the group size,
    scale 1, the implicit zero point), in the existing per-channel group otherwise.
    """
    k, n = qweight.shape[0] * spec.pack_factor, qweight.shape[1]
    if spec.group_size != -1:
        if k % spec.group_size or rows % spec.group_size:
            raise FormatError(f"append_zero_rows: K={k} and rows={rows} must be multiples of the group size "
                              f"{spec.group_size}")
        new_groups = rows // spec.group_size
        zero_codes = torch.full((rows, n), spec.implicit_zero, dtype=torch.int32, device=qweight.device)
        scales = torch.cat([scales, torch.ones(new_groups, n, dtype=scales.dtype, device=scales.device)])
        if qzeros is not None:
            qzeros = torch.cat([qzeros, torch.full((new_groups, n), spec.implicit_zero, dtype=qzeros.dtype,
                                                   device=qzeros.device)])
    else:
        zp = (qzeros.to(torch.int32) if qzeros is not None
              else torch.full((1, n), spec.implicit_zero, dtype=torch.int32, device=qweight.device))
        zero_codes = zp.expand(rows, n)
    codes = torch.cat([unpack_codes(qweight, spec.bits).to(torch.int32), zero_codes])
    return pack_codes(codes, spec.bits), scales, qzeros
