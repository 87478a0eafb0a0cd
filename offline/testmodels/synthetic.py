"""Random-weight llava-hf checkpoints of real model shapes, written shard by shard.

For benchmarks that need realistic sizes (LLaVA-1.5-7B widths) without a model hub:
tensors are generated and written one shard at a time, so writing a multi-GB
checkpoint needs about one shard of memory. Only weights and config.json are
written (no tokenizer): enough for ``qvlm quantize``, not for generation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def llava_tensor_shapes(
    hidden: int, intermediate: int, layers: int, vocab: int,
    vision_hidden: int, vision_intermediate: int, vision_layers: int,
) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "language_model.model.embed_tokens.weight": (vocab, hidden),
        "language_model.model.norm.weight": (hidden,),
        "language_model.lm_head.weight": (vocab, hidden),
        "multi_modal_projector.linear_1.weight": (hidden, vision_hidden),
        "multi_modal_projector.linear_1.bias": (hidden,),
        "multi_modal_projector.linear_2.weight": (hidden, hidden),
        "multi_modal_projector.linear_2.bias": (hidden,),
    }
    for i in range(layers):
        p = f"language_model.model.layers.{i}."
        for n in "qkvo":
            shapes[f"{p}self_attn.{n}_proj.weight"] = (hidden, hidden)
        shapes[f"{p}mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    for i in range(vision_layers):
        p = f"vision_tower.vision_model.encoder.layers.{i}."
        for n in ("q", "k", "v", "out"):
            shapes[f"{p}self_attn.{n}_proj.weight"] = (vision_hidden, vision_hidden)
            shapes[f"{p}self_attn.{n}_proj.bias"] = (vision_hidden,)
        shapes[f"{p}mlp.fc1.weight"] = (vision_intermediate, vision_hidden)
        shapes[f"{p}mlp.fc1.bias"] = (vision_intermediate,)
        shapes[f"{p}mlp.fc2.weight"] = (vision_hidden, vision_intermediate)
        shapes[f"{p}mlp.fc2.bias"] = (vision_hidden,)
    return shapes


def write_random_llava(
    out_dir: str | Path,
    *,
    hidden: int = 4096,
    intermediate: int = 11008,
    layers: int = 2,
    vocab: int = 32064,
    vision_hidden: int = 1024,
    vision_intermediate: int = 4096,
    vision_layers: int = 2,
    shard_bytes: int = 256 * 2**20,
    seed: int = 0,
) -> int:
    """Write the checkpoint; returns its size in bytes. Defaults are LLaVA-1.5-7B widths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shapes = llava_tensor_shapes(hidden, intermediate, layers, vocab, vision_hidden, vision_intermediate, vision_layers)
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
        t = torch.randn(*shape, generator=g, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
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
    config = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "text_config": {"model_type": "llama", "hidden_size": hidden, "intermediate_size": intermediate,
                        "num_hidden_layers": layers, "vocab_size": vocab},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": vision_hidden,
                          "intermediate_size": vision_intermediate, "num_hidden_layers": vision_layers},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return size
