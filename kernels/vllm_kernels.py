"""vLLM's own kernel layers behind qvlm layers: its mixed-precision and int8 scaled-mm selections.

On NVIDIA GPUs vLLM ships kernels tuned for exactly our layouts: for int4 weights with 16-bit
activations Machete (Hopper) and Marlin (Turing and newer), chosen by
``choose_mp_linear_kernel`` from an ``MPLinearLayerConfig``; for int8 x int8 CUTLASS, chosen by
its scaled-mm selection. This module puts a qvlm layer on them:

1. pure functions repack our stored tensors, exactly, into the layout those kernel classes
   read from compressed-tensors checkpoints (``to_mp_layout``, ``to_int8_layout``);
2. ``mp_layer_config`` / ``int8_layer_config`` describe the layer to vLLM, whose selection
   (every kernel's ``can_implement -> (ok, reason)``, in vLLM's order for the platform) picks
   the kernel, or says why none fits;
3. the chosen kernel's own ``process_weights_after_loading`` repacks once more for itself
   (Marlin tiles, Machete prepack, oneDNN handles) on a small holder module, and
   ``apply_weights`` runs it.

Layout facts the repacking relies on (vLLM 0.32): our ``qweight [K/8, N]`` int32 with row
``8i+j`` in nibble ``j`` of word ``i`` *is* GPTQ's packing along K (``input_dim = packed_dim = 0``);
symmetric codes with the implicit zero 8 are vLLM's ``uint4b8``; asymmetric layers are
``uint4`` with zero points packed 8 per int32 along N and stored ``[N/8, G]``
(compressed-tensors' ``weight_zero_point``); scales are ``[G, N]`` in the activation dtype. A
partial last group (K not a multiple of the group size) is re-expressed exactly with
``gcd(K, group size)``-row groups that repeat the scales, where the kernel takes that size.

What it does not do: choose between vLLM's kernels and ours (``dispatch`` does), or run
w4a8/w6a6/w4a4 (vLLM's int4 x int8 paths quantize activations differently from the scheme).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from .backends import _INT8_LAYOUT_REFUSAL, Backend, Prepared, _int8_per_channel_x_int8, _shape, first_refusal, regroup
from .format import LayerSpec
from .pack import pack_int4, unpack_codes

# ---- pure layout functions (no vLLM import) ----------------------------------------------


@dataclass
class MPTensors:
    """A w4a16 layer in the layout vLLM's mixed-precision kernels read (compressed-tensors/GPTQ)."""

    weight_packed: torch.Tensor  # int32 [K/8, N], packed along K
    weight_scale: torch.Tensor  # [G, N], activation dtype
    weight_zero_point: torch.Tensor | None  # int32 [N/8, G], packed along N; None when symmetric
    group_size: int  # the kernel's group size (-1: per channel)


def mp_group_size(in_features: int, group_size: int) -> int:
    """The group size handed to vLLM: the stored one, or for a partial last group the largest
    size that divides K and repeats the stored groups exactly."""
    if group_size == -1 or in_features % group_size == 0:
        return group_size
    return math.gcd(in_features, group_size)


def to_mp_layout(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, spec: LayerSpec,
                 act_dtype: torch.dtype) -> MPTensors:
    """Our stored int4 layer -> the tensors vLLM's mixed-precision kernel classes take (exact)."""
    k, n = _shape(qweight, spec)
    gs = mp_group_size(k, spec.group_size)
    s = scales if gs == spec.group_size else regroup(scales, spec.group_size, k, gs)
    zp = None
    if qzeros is not None:
        z = qzeros if gs == spec.group_size else regroup(qzeros, spec.group_size, k, gs)
        zp = pack_int4(z.to(torch.int32).t().contiguous()).contiguous()  # [N/8, G]: 8 columns per word
    return MPTensors(qweight.to(torch.int32).contiguous(), s.to(act_dtype).contiguous(), zp, gs)


def to_int8_layout(qweight: torch.Tensor, scales: torch.Tensor, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Our stored w8a8 layer -> (``weight`` int8 ``[N, K]``, ``weight_scale`` float32 ``[N, 1]``), as
    vLLM's int8 scaled-mm kernels read compressed-tensors' ``int-quantized`` weights."""
    n = qweight.shape[1]
    w = (unpack_codes(qweight, 8).to(torch.int16) - spec.implicit_zero).to(torch.int8).t().contiguous()
    return w, scales.to(torch.float32).reshape(n, 1).contiguous()


# ---- vLLM's kernel layer ----------------------------------------------------------------


def _vllm_missing() -> str | None:
    try:
        import vllm.model_executor.kernels.linear  # noqa: F401
    except Exception as e:  # no vLLM, or a build without the kernel layer
        return f"vLLM's kernel layer does not import: {e}"
    return None


def mp_layer_config(spec: LayerSpec, in_features: int, out_features: int, act_dtype: torch.dtype):
    """vLLM's description of one w4a16 layer (this rank's shard: our loader keeps shards group-aligned)."""
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
    from vllm.scalar_type import scalar_types

    return MPLinearLayerConfig(
        full_weight_shape=(in_features, out_features),
        partition_weight_shape=(in_features, out_features),
        weight_type=scalar_types.uint4b8 if spec.symmetric else scalar_types.uint4,
        act_type=act_dtype,
        group_size=mp_group_size(in_features, spec.group_size),
        zero_points=not spec.symmetric,
    )


def choose_mp_kernel(config):
    """``(kernel class, None)`` or ``(None, vLLM's reasons)`` from vLLM's mixed-precision selection."""
    from vllm.model_executor.kernels.linear import choose_mp_linear_kernel

    try:
        return choose_mp_linear_kernel(config), None
    except ValueError as e:  # vLLM lists every kernel's refusal
        return None, " ".join(str(e).split())


def int8_layer_config():
    from vllm.model_executor.kernels.linear.scaled_mm.ScaledMMLinearKernel import Int8ScaledMMLinearLayerConfig

    # our w8a8: per-channel weight scales, dynamic symmetric per-token activations
    return Int8ScaledMMLinearLayerConfig(is_static_input_scheme=False, is_channelwise=True, input_symmetric=True)


def choose_int8_kernel(config):
    """``(kernel class, None)`` or ``(None, vLLM's reasons)`` from vLLM's int8 scaled-mm selection."""
    from vllm.model_executor.kernels.linear import _POSSIBLE_INT8_KERNELS, choose_scaled_mm_linear_kernel

    try:
        return choose_scaled_mm_linear_kernel(config, _POSSIBLE_INT8_KERNELS, quantization="int8_w8a8"), None
    except ValueError as e:
        return None, " ".join(str(e).split())


def _cpu_wna16_runs_w4a8(kernel_cls, act_dtype: torch.dtype) -> bool:
    """vLLM's CPU int4 kernel quantizes activations to int8 on AMX processors for bf16
    (``VLLM_CPU_INT4_W4A8``, on by default): w4a8 arithmetic, not a w4a16 layer's."""
    if kernel_cls.__name__ != "CPUWNA16LinearKernel" or act_dtype != torch.bfloat16:
        return False
    from vllm import envs

    return bool(envs.VLLM_CPU_INT4_W4A8) and torch.cpu._is_amx_tile_supported()


class _KernelLayer(torch.nn.Module):
    """The attributes a vLLM kernel class reads from a linear layer, and nothing else.

    The bias is a copy of the layer's: kernels transform it at load (Marlin permutes it, the
    CPU kernels keep a float32 copy) and fuse it into their epilogue.
    """

    def __init__(self, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.logical_widths = [out_features]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """vLLM prepares weights with the model dtype as torch's default (oneDNN handles read it)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _no_loader(*_args, **_kwargs):
    raise RuntimeError("qvlm: a repacked kernel parameter is not loaded from a checkpoint")


class _VllmKernelBackend(Backend):
    """Shared verbs: a vLLM kernel instance prepares a holder layer once; apply runs it.

    ``apply``'s ``bias`` says whether to add the bias (vLLM passes None on row-parallel ranks
    after the first); the kernel adds the copy it prepared at load, or, for a layer prepared
    without one, the bias given is added to its output.
    """

    takes_bias = True

    def detail(self, p: Prepared) -> str:
        return f"vLLM {type(p.tensors['kernel']).__name__}"

    def apply(self, p, x, bias):
        layer = p.tensors["layer"]
        x2 = x.reshape(-1, x.shape[-1])
        if bias is None or layer.bias is not None:
            y = p.tensors["kernel"].apply_weights(layer, x2, None if bias is None else layer.bias)
        else:
            y = p.tensors["kernel"].apply_weights(layer, x2, None) + bias
        return y.reshape(*x.shape[:-1], p.out_features)


class VllmMixedPrecisionBackend(_VllmKernelBackend):
    """w4a16 on the kernel vLLM's mixed-precision selection picks (Machete, Marlin, ... on CUDA)."""

    name = "vllm_mp"

    @classmethod
    def can_implement(cls, spec, in_features, out_features, act_dtype):
        ok, reason = first_refusal([
            (spec.bits == 4 and spec.act_mode == "none", f"int4 weights with 16-bit activations only, not {spec.scheme}"),
            (act_dtype in (torch.float16, torch.bfloat16), f"fp16/bf16 activations only, not {act_dtype}"),
            (spec.symmetric or out_features % 8 == 0, f"zero points pack 8 columns per word: N={out_features}"),
            (lambda: _vllm_missing() is None, _vllm_missing),
        ])
        if not ok:
            return ok, reason
        kernel_cls, why = choose_mp_kernel(mp_layer_config(spec, in_features, out_features, act_dtype))
        if kernel_cls is None:
            return False, why
        if _cpu_wna16_runs_w4a8(kernel_cls, act_dtype):
            return False, "vLLM's CPUWNA16 quantizes bf16 activations to int8 on AMX (VLLM_CPU_INT4_W4A8=1): w4a8, not w4a16"
        return True, None

    def prepare(self, qweight, scales, qzeros, spec, act_dtype, bias=None):
        from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter

        k, n = _shape(qweight, spec)
        config = mp_layer_config(spec, k, n, act_dtype)
        kernel_cls, why = choose_mp_kernel(config)
        if kernel_cls is None:
            raise ValueError(f"vLLM has no mixed-precision kernel for this {spec.scheme} layer: {why}")
        t = to_mp_layout(qweight, scales, qzeros, spec, act_dtype)
        layer = _KernelLayer(n, bias)
        layer.register_parameter("weight_packed", PackedvLLMParameter(
            data=t.weight_packed, input_dim=0, output_dim=1, packed_dim=0, packed_factor=8, weight_loader=_no_loader))
        layer.register_parameter("weight_scale", GroupQuantScaleParameter(
            data=t.weight_scale, input_dim=0, output_dim=1, weight_loader=_no_loader))
        zp_name = None
        if t.weight_zero_point is not None:
            zp_name = "weight_zero_point"
            layer.register_parameter(zp_name, PackedvLLMParameter(
                data=t.weight_zero_point, input_dim=1, output_dim=0, packed_dim=0, packed_factor=8,
                weight_loader=_no_loader))
        kernel = kernel_cls(config, "weight_packed", "weight_scale", zp_name)
        with _default_dtype(act_dtype):
            kernel.process_weights_after_loading(layer)
        return Prepared(spec, k, n, {"kernel": kernel, "layer": layer})


class VllmScaledMMBackend(_VllmKernelBackend):
    """w8a8 on the kernel vLLM's int8 scaled-mm selection picks (CUTLASS on CUDA, oneDNN/AMX on CPU)."""

    name = "vllm_scaled_mm"

    @classmethod
    def can_implement(cls, spec, in_features, out_features, act_dtype):
        ok, reason = first_refusal([
            (_int8_per_channel_x_int8(spec), _INT8_LAYOUT_REFUSAL),
            (act_dtype in (torch.float16, torch.bfloat16), f"fp16/bf16 activations only, not {act_dtype}"),
            (lambda: _vllm_missing() is None, _vllm_missing),
        ])
        if not ok:
            return ok, reason
        kernel_cls, why = choose_int8_kernel(int8_layer_config())
        return (True, None) if kernel_cls is not None else (False, why)

    def prepare(self, qweight, scales, qzeros, spec, act_dtype, bias=None):
        from vllm.model_executor.parameter import ChannelQuantScaleParameter, ModelWeightParameter

        k, n = _shape(qweight, spec)
        config = int8_layer_config()
        kernel_cls, why = choose_int8_kernel(config)
        if kernel_cls is None:
            raise ValueError(f"vLLM has no int8 scaled-mm kernel for this w8a8 layer: {why}")
        w, w_scale = to_int8_layout(qweight, scales, spec)
        layer = _KernelLayer(n, bias)
        layer.register_parameter("weight", ModelWeightParameter(data=w, input_dim=1, output_dim=0,
                                                                weight_loader=_no_loader))
        layer.register_parameter("weight_scale", ChannelQuantScaleParameter(data=w_scale, output_dim=0,
                                                                            weight_loader=_no_loader))
        for name in ("input_scale", "input_zero_point", "azp_adj"):
            setattr(layer, name, None)
        kernel = kernel_cls(config, ["weight", "weight_scale", "input_scale", "input_zero_point", "azp_adj"])
        with _default_dtype(act_dtype):
            kernel.process_weights_after_loading(layer)
        return Prepared(spec, k, n, {"kernel": kernel, "layer": layer})
