"""The offline tiny LLaVA: loads in transformers and in vLLM, in the hub checkpoint layout.

The slow test runs vLLM in a child process through ``vllm_runner.run_jobs`` (engine
in-process there: one Python start, and vLLM's CPU thread binding stays out of pytest).
"""

import json
import statistics

import pytest
import torch

from qvlm_offline.testmodels.tiny_llava import IMAGE, build_tiny_llava, llava_prompt, tiny_prompts
from vllm_runner import run_jobs

N_PROMPTS = 2
N_TOKENS = 8


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava") / "model")


def _hf(model_dir, dtype=torch.float32):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(
        model_dir, dtype=dtype, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval(), AutoProcessor.from_pretrained(model_dir)


def _hf_greedy(model, processor, image, question, n_tokens):
    """Greedy tokens plus, per step, the top-5 ids and the top-1/top-2 logit gap (fp32)."""
    inputs = processor(images=image, text=llava_prompt(question), return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=n_tokens,
            min_new_tokens=n_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    top5, margins = [], []
    for s in out.scores:
        vals, ids = s[0].float().topk(5)
        top5.append(ids.tolist())
        margins.append((vals[0] - vals[1]).item())
    return inputs["input_ids"][0].tolist(), tokens, top5, margins


def test_build_load_forward(tiny_dir):
    from safetensors import safe_open

    with safe_open(tiny_dir / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert f.get_tensor("language_model.lm_head.weight").dtype == torch.bfloat16
    prefixes = {
        "language_model.model.",
        "language_model.lm_head.weight",
        "vision_tower.vision_model.",
        "multi_modal_projector.",
    }
    assert all(any(k.startswith(p) for p in prefixes) for k in keys), keys
    for p in prefixes:
        assert any(k.startswith(p) for k in keys), p
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in keys
    assert not any(k.startswith(("model.", "lm_head", "vision_tower.embeddings")) for k in keys)

    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["model_type"] == "llava"
    assert cfg["vision_feature_select_strategy"] == "default"
    assert cfg["vision_feature_layer"] == -2

    model, processor = _hf(tiny_dir)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == cfg["image_token_index"] == IMAGE
    # Every linear of the default model is a multiple of 32 wide on both sides.
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert mod.in_features % 32 == 0 and mod.out_features % 32 == 0, name

    image, question = tiny_prompts(1)[0]
    prompt = llava_prompt(question)
    assert prompt.count("<image>") == 1
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    n_image_tokens = (64 // 16) ** 2  # CLS dropped by the "default" strategy
    assert int((inputs["input_ids"] == IMAGE).sum()) == n_image_tokens
    assert inputs["pixel_values"].shape == (1, 3, 64, 64)
    # No word of the question is unknown to the tiny tokenizer.
    assert 0 not in inputs["input_ids"][0].tolist()
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], cfg["text_config"]["vocab_size"])
    assert torch.isfinite(logits).all()

    # Same chat format from the processor's template.
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    assert processor.apply_chat_template(msgs, add_generation_prompt=True).strip() == prompt

    # Peaked next-token distributions: greedy decoding is not tie-prone.
    margins = []
    for image, question in tiny_prompts(2):
        margins += _hf_greedy(model, processor, image, question, 10)[3]
    assert statistics.median(margins) > 1.0, margins

    # bf16 forward (the checkpoint dtype) stays finite.
    model_bf16, _ = _hf(tiny_dir, torch.bfloat16)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        assert torch.isfinite(model_bf16(**inputs).logits).all()


def test_build_deterministic_and_odd_intermediate(tmp_path):
    from safetensors.torch import load_file

    a = load_file(build_tiny_llava(tmp_path / "a", text_intermediate=688, seed=3) / "model.safetensors")
    b = load_file(build_tiny_llava(tmp_path / "b", text_intermediate=688, seed=3) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["language_model.model.layers.0.mlp.down_proj.weight"].shape == (256, 688)
    model, processor = _hf(tmp_path / "a")
    image, question = tiny_prompts(1, seed=5)[0]
    inputs = processor(images=image, text=llava_prompt(question), return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_vllm_greedy_matches_transformers(tiny_dir, tmp_path):
    """vLLM (bf16 weights and activations) vs transformers (fp32 activations on the same bf16
    weights): same expanded prompt ids; same greedy tokens for the first N_TOKENS, except
    that a divergence is tolerated at a near tie (fp32 gap < 1 nat, each side's token in the
    other's top 5), after which the comparison stops."""
    result = run_jobs([{"model": str(tiny_dir), "n_prompts": N_PROMPTS, "max_tokens": N_TOKENS, "logprobs": 5}],
                      tmp_path / "run")[0]
    got = {"outputs": [
        {**o, "top5": [[int(t) for t, _ in sorted(lp.items(), key=lambda kv: -kv[1])][:5] for lp in o["logprobs"]]}
        for o in result["outputs"]
    ]}

    model, processor = _hf(tiny_dir, torch.float32)
    full_matches = 0
    for (image, question), v in zip(tiny_prompts(N_PROMPTS), got["outputs"]):
        prompt_ids, tokens, top5, margins = _hf_greedy(model, processor, image, question, N_TOKENS)
        assert v["prompt_token_ids"] == prompt_ids  # same <image> expansion as transformers
        vt = v["token_ids"][:N_TOKENS]
        assert len(vt) == N_TOKENS
        diverged = next((i for i, (x, y) in enumerate(zip(vt, tokens)) if x != y), None)
        if diverged is None:
            full_matches += 1
            continue
        i = diverged
        assert margins[i] < 1.0, (i, vt, tokens, margins)
        assert vt[i] in top5[i] and tokens[i] in v["top5"][i], (i, vt, tokens)
    assert full_matches >= 1
