"""Test helpers: random stored tensors for one layer, via the real writer's RTN."""

import torch

from qvlm_offline.rtn import quantize_rtn


def make_layer_tensors(k: int, n: int, spec, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    qweight, scales, qzeros = quantize_rtn(w, spec)
    out = {"qweight": qweight, "scales": scales}
    if qzeros is not None:
        out["qzeros"] = qzeros
    return out
