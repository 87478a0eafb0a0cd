"""Triton backends for NVIDIA GPUs: thin adapters from stored tensors to ``triton_ops``.

Imports Triton (through ``triton_ops``) at import time, so only ``dispatch`` imports
this module, and only when a CUDA device is in use.
"""

from __future__ import annotations

import torch

from . import triton_ops
from .backends import _INT8_LAYOUT_REFUSAL, Backend, Prepared, _shape, first_refusal
from .format import LayerSpec


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class TritonW4A16Backend(Backend):
    name = "triton_w4a16"

    @classmethod
    def can_implement(cls, spec: LayerSpec, in_features: int, out_features: int, act_dtype: torch.dtype):
        return first_refusal([(spec.bits == 4 and spec.act_mode == "none",
                               f"int4 weights with 16-bit activations only, not {spec.scheme}")])

    def prepare(self, qweight, scales, qzeros, spec, act_dtype):
        k, n = _shape(qweight, spec)
        return Prepared(spec, k, n, {"qweight": qweight.contiguous(), "scales": scales.contiguous(),
                                     "qzeros": None if qzeros is None else qzeros.contiguous()})

    def apply(self, p, x, bias):
        t = p.tensors
        y = triton_ops.w4a16_gemm(_flat(x), t["qweight"], t["scales"], t["qzeros"], p.spec.group_size, bias)
        return y.reshape(*x.shape[:-1], p.out_features)


class TritonW8A8Backend(Backend):
    name = "triton_w8a8"

    @classmethod
    def can_implement(cls, spec: LayerSpec, in_features: int, out_features: int, act_dtype: torch.dtype):
        return first_refusal([(spec.bits == 8 and spec.group_size == -1 and spec.symmetric
                               and spec.act_mode == "int8_dynamic", _INT8_LAYOUT_REFUSAL)])

    def prepare(self, qweight, scales, qzeros, spec, act_dtype):
        k, n = _shape(qweight, spec)
        w_s8 = (qweight.to(torch.int16) - spec.implicit_zero).to(torch.int8).contiguous()
        return Prepared(spec, k, n, {"qweight": w_s8, "w_scale": scales.to(torch.float32).reshape(n).contiguous()})

    def apply(self, p, x, bias):
        t = p.tensors
        y = triton_ops.w8a8_gemm(_flat(x), t["qweight"], t["w_scale"], bias)
        return y.reshape(*x.shape[:-1], p.out_features)


class TritonW4A8Backend(TritonW4A16Backend):
    name = "triton_w4a8"

    @classmethod
    def can_implement(cls, spec: LayerSpec, in_features: int, out_features: int, act_dtype: torch.dtype):
        return first_refusal([(spec.bits == 4 and spec.act_mode == "int8_dynamic",
                               f"int4 weights with per-token int8 activations only, not {spec.scheme}")])

    def apply(self, p, x, bias):
        t = p.tensors
        y = triton_ops.w4a8_gemm(_flat(x), t["qweight"], t["scales"], t["qzeros"], p.spec.group_size, bias)
        return y.reshape(*x.shape[:-1], p.out_features)
