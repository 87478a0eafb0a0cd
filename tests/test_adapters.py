"""Model adapters: one place per family says where its parts are, in every hub layout."""

import json

import pytest

from qvlm_offline.adapters import (
    FAMILIES,
    UnsupportedModelError,
    adapter_for,
    adapter_of,
    supported_architectures,
)
from qvlm_offline.testmodels.tiny_llava import build_tiny_llava


def _fake_checkpoint(tmp_path, config, names):
    """A directory whose config.json and safetensors header carry ``names`` (no real data needed)."""
    import struct

    d = tmp_path / "m"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config))
    header = {n: {"dtype": "BF16", "shape": [2, 2], "data_offsets": [8 * i, 8 * i + 8]} for i, n in enumerate(names)}
    raw = json.dumps(header).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * (8 * len(names)))
    return d


def test_tiny_llava_gets_the_llava_hf_layout(tmp_path):
    src = build_tiny_llava(tmp_path / "src")
    ad = adapter_for(src)
    assert (ad.family.name, ad.layout.name, ad.text_model_type) == ("llava", "llava-hf", "llama")
    assert ad.layer_prefix(1) == "language_model.model.layers.1"
    assert ad.is_decoder_linear("language_model.model.layers.1.mlp.down_proj")
    assert not ad.is_decoder_linear("language_model.model.layers.1.input_layernorm")
    assert ad.is_vision_linear("vision_tower.vision_model.encoder.layers.0.self_attn.out_proj")
    assert ad.is_vision_linear("multi_modal_projector.linear_2") and ad.is_lm_head("language_model.lm_head")
    assert ad.transformers_name("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight") == \
        "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert ad.projector == "multi_modal_projector." and ad.projector_module == "model.multi_modal_projector"


@pytest.mark.parametrize("arch,names,layout,layer0,vision", [
    ("LlavaForConditionalGeneration", ["model.language_model.layers.0.mlp.up_proj.weight"], "transformers>=4.52",
     "model.language_model.layers.0", "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1"),
    ("LlavaNextForConditionalGeneration", ["language_model.model.layers.0.mlp.up_proj.weight", "image_newline"],
     "llava-hf", "language_model.model.layers.0", "vision_tower.vision_model.encoder.layers.0.mlp.fc1"),
    ("Qwen2VLForConditionalGeneration", ["model.layers.0.mlp.up_proj.weight", "visual.blocks.0.attn.qkv.weight"],
     "qwen", "model.layers.0", "visual.merger.mlp.0"),
    ("Qwen2_5_VLForConditionalGeneration", ["model.language_model.layers.0.mlp.up_proj.weight"],
     "transformers>=4.52", "model.language_model.layers.0", "model.visual.merger.mlp.2"),
])
def test_layouts_are_detected_from_the_tensor_names(tmp_path, arch, names, layout, layer0, vision):
    ad = adapter_for(_fake_checkpoint(tmp_path, {"architectures": [arch], "num_hidden_layers": 2}, names))
    assert ad.layout.name == layout and ad.layer_prefix(0) == layer0
    assert ad.is_vision_linear(vision)
    # transformers' name and back
    for n in (f"{layer0}.mlp.up_proj.weight", f"{vision}.weight"):
        assert ad.hub_name(ad.transformers_name(n)) == n
        assert ad.transformers_name(n).startswith(("model.language_model.", "model.vision_tower.",
                                                   "model.multi_modal_projector.", "model.visual."))


def test_ignore_patterns_match_hub_vllm_and_transformers_names():
    import re

    for arch, names in [
        ("LlavaForConditionalGeneration", ["vision_tower.vision_model.encoder.layers.0.mlp.fc1",
                                           "model.vision_tower.encoder.layers.0.mlp.fc1", "multi_modal_projector.linear_1",
                                           "model.multi_modal_projector.linear_1"]),
        ("Qwen2VLForConditionalGeneration", ["visual.merger.mlp.0", "model.visual.blocks.0.attn.qkv"]),
    ]:
        ad = adapter_of(arch)
        pats = [p.removeprefix("re:") for p in ad.ignore_vision]
        for n in names:
            assert any(re.match(p, n) for p in pats), (arch, n)
        assert not any(re.match(p, ad.decoder_linears(0)[0]) for p in pats)
        head = ad.ignore_lm_head[0].removeprefix("re:")
        assert re.match(head, "lm_head") and re.match(head, "language_model.lm_head")


def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path):
    d = _fake_checkpoint(tmp_path, {"architectures": ["Idefics3ForConditionalGeneration"]}, ["x.weight"])
    with pytest.raises(UnsupportedModelError) as e:
        adapter_for(d)
    msg = str(e.value)
    assert "Idefics3ForConditionalGeneration is not supported" in msg and str(d / "config.json") in msg
    for arch in supported_architectures():
        assert arch in msg
    assert len(supported_architectures()) == sum(len(f.architectures) for f in FAMILIES) == 5


def test_unsupported_text_model_and_layout_are_named(tmp_path):
    cfg = {"architectures": ["LlavaForConditionalGeneration"], "text_config": {"model_type": "gemma"}}
    with pytest.raises(UnsupportedModelError, match="'gemma' text model is not supported; supported text models: "
                                                    "llama, mistral, qwen2"):
        adapter_for(_fake_checkpoint(tmp_path, cfg, ["language_model.model.layers.0.mlp.up_proj.weight"]))
    cfg["text_config"]["model_type"] = "mistral"
    with pytest.raises(UnsupportedModelError, match="no decoder layers found under any llava layout"):
        adapter_for(_fake_checkpoint(tmp_path / "b", cfg, ["transformer.h.0.mlp.weight"]))


def test_qwen2_vl_vision_quantization_is_refused_clearly():
    with pytest.raises(UnsupportedModelError, match="--quantize-vision: the qwen2-vl vision side"):
        adapter_of("Qwen2VLForConditionalGeneration").check_quantize_vision(True)
    with pytest.raises(UnsupportedModelError, match="a projector vLLM does not quantize"):
        adapter_of("LlavaOnevisionForConditionalGeneration").check_quantize_vision(True)
    adapter_of("LlavaNextForConditionalGeneration").check_quantize_vision(True)


def test_cli_reports_an_unsupported_model_in_one_line(tmp_path, capsys):
    from qvlm_offline.cli import main

    d = _fake_checkpoint(tmp_path, {"architectures": ["PaliGemmaForConditionalGeneration"]}, ["x.weight"])
    assert main(["quantize", str(d), str(tmp_path / "out"), "--scheme", "w4a16", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qvlm quantize: error: ") and "PaliGemmaForConditionalGeneration" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_appended_tokens_see_the_positions_generation_saw(tmp_path):
    """Teacher forcing over prompt + generated tokens: Qwen2-VL's per-token ``mm_token_type_ids``
    (its M-RoPE positions) extended as text, the same log-probabilities as ``generate``."""
    import torch
    from transformers import AutoProcessor

    from qvlm_offline.testmodels.tiny_families import build_tiny_family, family_prompt
    from qvlm_offline.testmodels.tiny_llava import tiny_prompts

    src = build_tiny_family(tmp_path / "q", "qwen2_vl")
    ad = adapter_for(src)
    model = ad.model_class().from_pretrained(src, dtype=torch.float32).eval()
    (image, question), = tiny_prompts(1)
    inputs = AutoProcessor.from_pretrained(src)(images=[image], text=family_prompt("qwen2_vl", question),
                                                return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        tokens = gen.sequences[0, n:].tolist()
        full = ad.append_text_tokens(inputs, tokens)
        assert full["mm_token_type_ids"][0, n:].tolist() == [0] * 4 and full["attention_mask"].shape == (1, n + 4)
        logits = model(**full).logits[0, n - 1: n + 3]
    for step, (tf_logits, gen_logits) in enumerate(zip(logits, gen.logits)):
        diff = (torch.log_softmax(tf_logits, -1) - torch.log_softmax(gen_logits[0], -1)).abs().max().item()
        assert diff < 1e-4, (step, diff)


def test_an_unknown_per_token_processor_output_is_refused():
    import torch

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    ad = adapter_of("LlavaForConditionalGeneration")
    out = ad.append_text_tokens({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                 "pixel_values": torch.zeros(1, 3, 4, 4)}, [1, 2])
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2]] and out["attention_mask"].tolist() == [[1] * 7]
    with pytest.raises(UnsupportedModelError, match="'token_type_ids' runs along the tokens"):
        ad.append_text_tokens({"input_ids": ids, "token_type_ids": torch.zeros_like(ids)}, [1])
