"""vLLM plugin for qvlm checkpoints (``quantization="qvlm"``).

Loaded by vLLM through the ``vllm.general_plugins`` entry point in every process;
``register`` is idempotent and cheap. Importing this package does not import vLLM.
"""

__all__ = ["register"]


def register() -> None:
    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.model_executor.layers.quantization import get_quantization_config
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    from .config import QVLMConfig

    if "qvlm" in QUANTIZATION_METHODS:
        try:
            if get_quantization_config("qvlm") is QVLMConfig:
                return
        except ValueError:
            pass
    register_quantization_config("qvlm")(QVLMConfig)
