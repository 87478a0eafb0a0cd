"""Test helpers: random stored tensors for one layer (via the real writer's RTN), and the
float32 transformers model that runs exactly what a qvlm checkpoint stores."""

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


def write_fake_llava(
    d, *, hidden: int = 64, intermediate: int = 128, layers: int = 1, vision: int = 32, vocab: int = 50, seed: int = 0
):
    """A llava-hf layout checkpoint with random tensors (no tokenizer, no transformers): for export tests."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.05).to(torch.bfloat16)

    t = {"language_model.model.embed_tokens.weight": r(vocab, hidden), "language_model.lm_head.weight": r(vocab, hidden),
         "language_model.model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
         "multi_modal_projector.linear_1.weight": r(hidden, vision), "multi_modal_projector.linear_1.bias": r(hidden),
         "multi_modal_projector.linear_2.weight": r(hidden, hidden), "multi_modal_projector.linear_2.bias": r(hidden)}
    for i in range(layers):
        p = f"language_model.model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            t[p + f"self_attn.{n}_proj.weight"] = r(hidden, hidden)
        t[p + "mlp.gate_proj.weight"] = r(intermediate, hidden)
        t[p + "mlp.up_proj.weight"] = r(intermediate, hidden)
        t[p + "mlp.down_proj.weight"] = r(hidden, intermediate)
        t[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        v = f"vision_tower.vision_model.encoder.layers.{i}."
        for n in ("q", "k", "v", "out"):
            t[v + f"self_attn.{n}_proj.weight"] = r(vision, vision)
            t[v + f"self_attn.{n}_proj.bias"] = r(vision)
        t[v + "mlp.fc1.weight"] = r(4 * vision, vision)
        t[v + "mlp.fc2.weight"] = r(vision, 4 * vision)
    save_file(t, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}))
    (d / "tokenizer.json").write_text("{}")
    (d / "chat_template.jinja").write_text("{{ messages }}")
    return d, t


def dequantized_llava(src, qdir):
    """transformers float32 model of ``src``'s family (its adapter's class and names: LLaVA,
    LLaVA-NeXT, OneVision, Qwen2-VL, Qwen2.5-VL) running what ``qdir`` stores: every quantized linear carries its
    dequantized codes (int-activation schemes also fake-quantize its input per token), and every
    float tensor comes from ``qdir`` too (searches may rewrite norms)."""
    from qvlm_kernels import reference
    from qvlm_kernels.checkpoint import load_quant_config, read_tensor, tensor_table, validate_checkpoint
    from qvlm_offline.adapters import adapter_for

    adapter = adapter_for(src)
    transformers_module_name = adapter.transformers_name
    model = adapter.model_class().from_pretrained(src, dtype=torch.float32).eval()
    cfg, table = load_quant_config(qdir), tensor_table(qdir)
    params = dict(model.named_parameters())
    for name, info in table.items():
        p = params.get(transformers_module_name(name))
        if p is not None:
            p.data = read_tensor(info).to(torch.float32)
    modules = dict(model.named_modules())
    for m in validate_checkpoint(qdir, cfg):
        spec = cfg.layer_spec(m)
        qz = table.get(f"{m}.qzeros")
        w = reference.dequantize(read_tensor(table[f"{m}.qweight"]), read_tensor(table[f"{m}.scales"]),
                                 None if qz is None else read_tensor(qz), spec)
        lin = modules[transformers_module_name(m)]
        lin.weight.data = w.t().contiguous()
        if spec.act_mode != "none":
            lin.register_forward_pre_hook(lambda _, a, b=spec.act_bits: (reference.fake_quantize_per_token(a[0], b),))
    return model
