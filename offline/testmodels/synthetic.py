"""Random-weight llava-hf checkpoints of real model shapes, written shard by shard.

For benchmarks that need realistic sizes (LLaVA-1.5-7B / 13B widths, CLIP-L/14-336:
576 image tokens per image) without a model hub. The tensor list is the model class's
own (``LlavaForConditionalGeneration`` built on the meta device, names mapped to the hub
layout by the family adapter), so the checkpoint is complete: transformers, the
streaming pipeline and vLLM load it. Tensors are drawn and written one shard at a time,
so writing a multi-GB checkpoint needs about one shard of memory. With
``processor=True`` the tiny word-level tokenizer and a CLIP image processor are saved
too (:func:`~qvlm_offline.testmodels.tiny_llava.save_processor`), enough for
``qvlm quantize`` with calibration data; the answers of such a model are noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# (text hidden, intermediate, heads) of the Vicuna decoders LLaVA-1.5 is built on
# ("tiny": a smoke-test size with a small tower)
WIDTHS = {"7b": (4096, 11008, 32), "13b": (5120, 13824, 40), "tiny": (256, 512, 4)}
FULL_DEPTH = {"7b": 32, "13b": 40, "tiny": 32}
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336, patch_size=14)
TOWERS = {"7b": CLIP_L_336, "13b": CLIP_L_336,
          "tiny": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, image_size=64, patch_size=16)}
CLIP_L_DEPTH = 24


def llava_config(*, hidden: int, intermediate: int, heads: int, layers: int, vocab: int,
                 vision_layers: int, image_token_index: int, vision: dict | None = None):
    """A LLaVA-1.5 style config: Llama decoder + CLIP tower (CLIP-L/14-336 unless ``vision`` says)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    v = dict(CLIP_L_336) | (vision or {})
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**v, num_hidden_layers=vision_layers, projection_dim=768,
                                       hidden_act="quick_gelu", layer_norm_eps=1e-5),
        text_config=LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
        image_token_index=image_token_index,
        image_seq_length=(v["image_size"] // v["patch_size"]) ** 2,
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2,
        multimodal_projector_bias=True, tie_word_embeddings=False,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = "bfloat16"
    return config


def _init(name: str, shape, g: torch.Generator, std: float) -> torch.Tensor:
    if "norm" in name:  # layer/RMS norms: weight 1, bias 0
        return torch.full(shape, 1.0 if name.endswith("weight") else 0.0, dtype=torch.bfloat16)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    return torch.randn(*shape, generator=g, dtype=torch.float32).mul_(std).to(torch.bfloat16)


def write_random_llava(
    out_dir: str | Path,
    *,
    hidden: int = 4096,
    intermediate: int = 11008,
    heads: int = 32,
    layers: int = 2,
    vocab: int = 32064,
    vision_layers: int = 2,
    vision: dict | None = None,
    processor: bool = False,
    std: float = 0.02,
    shard_bytes: int = 256 * 2**20,
    seed: int = 0,
) -> int:
    """Write the checkpoint; returns its size in bytes. Defaults are LLaVA-1.5-7B widths (CLIP-L/336)."""
    from transformers import LlavaForConditionalGeneration

    from ..adapters import adapter_of
    from .tiny_llava import IMAGE, save_processor, tiny_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = llava_config(hidden=hidden, intermediate=intermediate, heads=heads, layers=layers, vocab=vocab,
                          vision_layers=vision_layers, image_token_index=IMAGE if processor else vocab - 64,
                          vision=vision)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    adapter = adapter_of("LlavaForConditionalGeneration")
    shapes = {adapter.hub_name(n): tuple(t.shape) for n, t in model.state_dict().items()}
    del model
    g = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    weight_map: dict[str, str] = {}
    files: list[str] = []

    def flush():
        name = f"part-{len(files):05d}.safetensors"
        save_file(shards[0], str(out / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update(dict.fromkeys(shards[0], name))
        shards[0] = {}

    pending = 0
    for name, shape in shapes.items():
        t = _init(name, shape, g, std)
        nbytes = t.numel() * 2
        if shards[0] and pending + nbytes > shard_bytes:
            flush()
            pending = 0
        shards[0][name] = t
        pending += nbytes
        size += nbytes
    flush()
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    config.save_pretrained(out)
    if processor:
        v = dict(CLIP_L_336) | (vision or {})
        save_processor(out, tiny_tokenizer(), image_size=v["image_size"], patch_size=v["patch_size"])
    return size
