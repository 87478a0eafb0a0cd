"""vLLM linear method for qvlm checkpoints: declare, prepare, apply.

``create_weights`` declares the stored tensors with vLLM's parameter classes so
fused ``qkv_proj``/``gate_up_proj`` load shard by shard and tensor parallelism
shards them (K along rows for row-parallel layers, N for column-parallel);
``process_weights_after_loading`` hands them to the kernel chosen by
``qvlm_kernels.dispatch``; ``apply`` is one kernel call.

Row-parallel shards of schemes that quantize activations per token (w8a8, w4a8, and the
fake-quantized w6a6/w4a4) must use the scale of the *whole* row, as TP=1 does, not of their
slice: each shard's weights get zero-weight input rows appended at load, and ``apply`` fills
the matching input columns with the row's absolute maximum over all ranks (one all-gather of a
value per token). Every kernel's own dynamic quantizer then picks TP=1's scale, and the extra
columns add exactly nothing.
"""

from __future__ import annotations

import math

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    PackedvLLMParameter,
)

from qvlm_kernels.dispatch import choose_backend
from qvlm_kernels.format import QWEIGHT, QZEROS, SCALES, FormatError, LayerSpec, num_groups
from qvlm_kernels.pack import append_zero_rows

logger = init_logger("vllm.qvlm")  # under vLLM's logger tree, so its handlers print it
_logged_backends: set[tuple[str, str]] = set()


def _lm_head_loader(layer: VocabParallelEmbedding):
    """Load a stored ``[rows, vocab]`` tensor into this rank's ``[rows, padded vocab shard]`` parameter.

    vLLM pads the vocabulary (to a multiple of 64) and shards it along N; the padding
    columns get zero scales, so their logits are 0 (vLLM drops them anyway).
    """

    def load(param: torch.nn.Parameter, loaded: torch.Tensor) -> None:
        idx = layer.shard_indices
        start, size = idx.org_vocab_start_index, idx.org_vocab_end_index - idx.org_vocab_start_index
        if loaded.shape[1] != layer.org_vocab_size:
            raise FormatError(f"lm_head: stored tensor has {loaded.shape[1]} columns, the vocabulary is "
                              f"{layer.org_vocab_size}")
        param.data[:, :size].copy_(loaded[:, start : start + size])
        param.data[:, size:].zero_()

    return load


@register_weight_loader_v2_supported_method
class QVLMLinearMethod(LinearMethodBase):
    def __init__(self, spec: LayerSpec, prefix: str):
        self.spec = spec
        self.prefix = prefix

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ):
        spec = self.spec
        k, n = input_size_per_partition, sum(output_partition_sizes)
        spec.check_shape(k, where=f"{self.prefix}: ")
        if input_size != k and spec.group_size != -1 and k % spec.group_size:
            raise FormatError(
                f"{self.prefix}: row-parallel shards of {k} of its {input_size} input rows do not start "
                f"on {spec.group_size}-row group boundaries; quantize with a --group-size that divides "
                f"{k} (e.g. {math.gcd(k, spec.group_size)}) or use a tensor_parallel_size that keeps "
                f"shards group-aligned"
            )
        loader = extra_weight_attrs["weight_loader"]
        if isinstance(layer, VocabParallelEmbedding):  # a quantized lm_head: vocab-padded, N-sharded
            loader = _lm_head_loader(layer)
        groups = num_groups(k, spec.group_size)
        if spec.bits == 4:
            qweight = PackedvLLMParameter(
                data=torch.empty(k // spec.pack_factor, n, dtype=torch.int32),
                input_dim=0, output_dim=1, packed_dim=0, packed_factor=spec.pack_factor, weight_loader=loader,
            )
        else:
            qweight = ModelWeightParameter(
                data=torch.empty(k, n, dtype=torch.uint8), input_dim=0, output_dim=1, weight_loader=loader
            )

        def per_group(dtype: torch.dtype):
            data = torch.empty(groups, n, dtype=dtype)
            if spec.group_size == -1:  # one row per output channel: replicated across row shards
                return ChannelQuantScaleParameter(data=data, output_dim=1, weight_loader=loader)
            return GroupQuantScaleParameter(data=data, input_dim=0, output_dim=1, weight_loader=loader)

        layer.register_parameter(QWEIGHT, qweight)
        layer.register_parameter(SCALES, per_group(torch.float16))
        if not spec.symmetric:
            layer.register_parameter(QZEROS, per_group(torch.uint8))
        layer.qvlm_act_dtype = params_dtype
        layer.qvlm_in_out = (k, n)
        # a row-parallel shard (K split over ranks) of a per-token activation-quantized scheme
        layer.qvlm_row_scale_pad = shared_row_scale_pad(spec) if input_size != k and spec.act_mode != "none" else 0

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        qweight, scales = layer.qweight.data, layer.scales.data
        qzeros = layer.qzeros.data if hasattr(layer, QZEROS) else None
        k, n = layer.qvlm_in_out
        if layer.qvlm_row_scale_pad:  # zero-weight rows that will carry the whole row's max
            qweight, scales, qzeros = append_zero_rows(qweight, scales, qzeros, self.spec, layer.qvlm_row_scale_pad)
            k += layer.qvlm_row_scale_pad
        backend, refused = choose_backend(self.spec, k, n, layer.qvlm_act_dtype, qweight.device)
        extra = {}
        if backend.takes_bias and getattr(layer, "bias", None) is not None:
            extra["bias"] = layer.bias.data
        prepared = backend.prepare(qweight, scales, qzeros, self.spec, layer.qvlm_act_dtype, **extra)
        key = (backend.name, self.spec.scheme)
        if key not in _logged_backends:  # once per scheme and kernel, with why the ones before it were passed over
            _logged_backends.add(key)
            why = "; ".join(f"{name}: {reason}" for name, reason in refused)
            logger.info("qvlm: %s layers run on the %s kernel%s (first: %s, K=%d N=%d)%s", self.spec.scheme,
                        backend.name, f" [{d}]" if (d := backend.detail(prepared)) else "", self.prefix, k, n,
                        f"; passed over: {why}" if why else "")
        for name in (QWEIGHT, SCALES, QZEROS):
            if hasattr(layer, name):
                delattr(layer, name)
        layer.qvlm_backend = backend
        layer.qvlm_prepared = prepared

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.qvlm_row_scale_pad:
            x = with_row_absmax(x, layer.qvlm_row_scale_pad)
        return layer.qvlm_backend.apply(layer.qvlm_prepared, x, bias)


def shared_row_scale_pad(spec: LayerSpec) -> int:
    """Input rows appended to a row-parallel shard: whole groups, and a multiple of 128 so the
    kernels' K alignments (32, 128) still hold."""
    return 128 if spec.group_size == -1 else math.lcm(128, spec.group_size)


def with_row_absmax(x: torch.Tensor, pad: int) -> torch.Tensor:
    """``x`` (this rank's slice of each token row) with ``pad`` columns holding the row's absolute
    maximum over all tensor-parallel ranks."""
    from vllm.distributed import tensor_model_parallel_all_gather

    amax = x.abs().amax(dim=-1, keepdim=True)
    amax = tensor_model_parallel_all_gather(amax, dim=-1).amax(dim=-1, keepdim=True)
    return torch.cat([x, amax.expand(*x.shape[:-1], pad)], dim=-1)
