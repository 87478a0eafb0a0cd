"""vLLM ``QuantizationConfig`` for qvlm checkpoints.

Reads ``quantization_config`` through the shared schema (``qvlm_kernels.format``),
validates the checkpoint's tensors against it before vLLM loads a byte (clear
errors naming file and tensor), and hands each linear layer its ``LayerSpec``.
Layers the config ignores fall back to vLLM's unquantized method.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

from qvlm_kernels.checkpoint import check_trusted, load_quant_config, validate_checkpoint
from qvlm_kernels.format import QUANT_METHOD, FormatError, LayerSpec, QVLMQuantConfig

from .linear import QVLMLinearMethod


class QVLMConfig(QuantizationConfig):
    def __init__(self, schema: QVLMQuantConfig | None = None):
        super().__init__()
        # None when vLLM builds the config without arguments (--quantization qvlm on a
        # model whose config.json it did not read): filled in by maybe_update_config.
        self.schema = schema
        self.quantized_modules: dict[str, tuple[int, int]] | None = None
        self.model_dir: str | None = None
        # vLLM module name -> checkpoint module name, where the model renames (hf_to_vllm_mapper)
        self.hub_names: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"QVLMConfig({self.schema.to_dict() if self.schema else None})"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 75  # Triton int8 dot and bf16 need Turing or newer; unused on CPU

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QVLMConfig":
        return cls(QVLMQuantConfig.from_dict(config, source="quantization_config"))

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None):
        """Read and check the checkpoint once, in the process that builds the engine config."""
        self.model_dir = model_name
        check_trusted(model_name)
        if self.schema is None:
            self.schema = load_quant_config(model_name)
        self.quantized_modules = validate_checkpoint(model_name, self.schema)

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        """Learn vLLM's names of the checkpoint's modules (e.g. Qwen2-VL's ``model.layers.N`` ->
        ``language_model.model.layers.N``), so the config, which speaks checkpoint names, answers
        for vLLM's prefixes."""
        if self.model_dir is None:
            return
        from qvlm_kernels.checkpoint import tensor_table

        modules = {n.rpartition(".")[0] for n in tensor_table(self.model_dir)}
        for m in modules:
            mapped = hf_to_vllm_mapper.map_name(f"{m}.weight")
            if mapped is not None and mapped != f"{m}.weight":
                self.hub_names[mapped.removesuffix(".weight")] = m

    def _shard_names(self, prefix: str) -> list[str]:
        proj = prefix.rsplit(".", 1)[-1]
        shards = self.packed_modules_mapping.get(proj)
        if not shards:
            return [prefix]
        head = prefix[: -len(proj)]
        return [head + s for s in shards]

    def spec_for(self, prefix: str) -> LayerSpec | None:
        if self.schema is None:
            raise FormatError("qvlm: quantization_config was not loaded (no model directory seen)")
        names = [self.hub_names.get(n, n) for n in self._shard_names(prefix)]
        specs = {self.schema.layer_spec(n) for n in names}
        if len(specs) > 1:
            raise FormatError(f"{prefix}: fused shards {names} have different qvlm settings {specs}")
        spec = specs.pop()
        if spec is not None and self.quantized_modules is not None:
            missing = [n for n in names if n not in self.quantized_modules]
            if missing:
                raise FormatError(
                    f"{self.model_dir}: quantization_config quantizes {missing[0]!r} but the checkpoint "
                    f"has no tensor '{missing[0]}.qweight'"
                )
        return spec

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, ParallelLMHead):  # lm_head: quantized when the checkpoint says so
            spec = self.spec_for(prefix)
            return None if spec is None else QVLMLinearMethod(spec, prefix)
        if not isinstance(layer, LinearBase):
            return None
        spec = self.spec_for(prefix)
        if spec is None:
            return UnquantizedLinearMethod()
        return QVLMLinearMethod(spec, prefix)
