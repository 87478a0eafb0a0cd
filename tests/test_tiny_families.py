"""The tiny family checkpoints: hub layout, transformers load + forward, vLLM-CPU greedy == transformers.

Every (family, text, vision) row of ``FAMILIES`` is built once per module (plus two
odd-width variants).  The fast tests load each with transformers (no missing or unexpected
keys, processor placeholder expansion, chat template, a finite forward that depends on the
image).  The slow test runs all of them in vLLM (float32, unquantized) in ONE child
process -- this file is also that child's script (``python test_tiny_families.py jobs out``):
vLLM pins threads and keeps global state, and the in-process engine loads a small model in
seconds -- and requires the same expanded prompt ids, the same 8 greedy tokens as
transformers' float32 ``generate`` and the chosen tokens' log-probabilities within
``LOGPROB_TOL`` nats; it also checks the vLLM module names of the quantizable linears.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from qvlm_offline.tools.child import child_main, run_child

from qvlm_offline.testmodels.tiny_families import (
    ARCHITECTURES,
    FAMILIES,
    QWEN_TOKENS,
    build_tiny_family,
    family_prompt,
    placeholder_token,
)

N_TOKENS = 8
IMAGE_SIZE = 56
LOGPROB_TOL = 2e-3  # nats; float32 on both sides, only summation order differs
# (family, text, vision, hidden_size): text widths that are not multiples of 128, MLP
# widths (2 * hidden + 16 = 208 / 336) that are not multiples of 32.
ODD_WIDTHS = [("llava", "llama", "clip", 96), ("qwen2_vl", "qwen2", "qwen2_vl", 160)]
QWEN = ("qwen2_vl", "qwen2_5_vl")

HUB_PREFIXES = {
    "llava": {"language_model.model.", "language_model.lm_head.weight", "vision_tower.vision_model.",
              "multi_modal_projector."},
    "qwen2_vl": {"model.", "lm_head.weight", "visual."},
}
HUB_PREFIXES["llava_next"] = HUB_PREFIXES["llava_onevision"] = HUB_PREFIXES["llava"] | {"image_newline"}
HUB_PREFIXES["qwen2_5_vl"] = HUB_PREFIXES["qwen2_vl"]

# vLLM module names (suffixes of decoder layer 0 / vision block 0) that must exist.
VLLM_LINEARS = {
    "llava": ["language_model.model.layers.0.self_attn.qkv_proj", "language_model.model.layers.0.self_attn.o_proj",
              "language_model.model.layers.0.mlp.gate_up_proj", "language_model.model.layers.0.mlp.down_proj",
              "language_model.lm_head", "multi_modal_projector.linear_1", "multi_modal_projector.linear_2",
              "vision_tower.vision_model.encoder.layers.0.self_attn.qkv_proj",
              "vision_tower.vision_model.encoder.layers.0.self_attn.out_proj",
              "vision_tower.vision_model.encoder.layers.0.mlp.fc1",
              "vision_tower.vision_model.encoder.layers.0.mlp.fc2"],
    "qwen2_vl": ["language_model.model.layers.0.self_attn.qkv_proj", "language_model.model.layers.0.mlp.down_proj",
                 "language_model.lm_head", "visual.blocks.0.attn.qkv", "visual.blocks.0.attn.proj",
                 "visual.blocks.0.mlp.fc1", "visual.blocks.0.mlp.fc2", "visual.merger.mlp.0", "visual.merger.mlp.2"],
    "qwen2_5_vl": ["language_model.model.layers.0.self_attn.qkv_proj", "language_model.lm_head",
                   "visual.blocks.0.attn.qkv", "visual.blocks.0.attn.proj", "visual.blocks.0.mlp.gate_up_proj",
                   "visual.blocks.0.mlp.down_proj", "visual.merger.mlp.0", "visual.merger.mlp.2"],
}
VLLM_LINEARS["llava_next"] = VLLM_LINEARS["llava"]
# vLLM 0.32's LlavaOnevisionMultiModalProjector is two plain torch.nn.Linear: no quant_config
# reaches it (a quantized projector cannot be served; it must stay in the float checkpoint).
VLLM_LINEARS["llava_onevision"] = [n for n in VLLM_LINEARS["llava"] if not n.startswith("multi_modal_projector.")]
PLAIN_LINEARS = {"llava_onevision": ["multi_modal_projector.linear_1", "multi_modal_projector.linear_2"]}

ALL = [(f, t, v, None) for f, t, v in FAMILIES] + ODD_WIDTHS


def _id(row) -> str:
    f, t, v, h = row
    return f"{f}-{t}-{v}" + (f"-h{h}" if h else "")


def _image_question(seed: int = 0):
    from qvlm_offline.testmodels.tiny_llava import tiny_prompts

    return tiny_prompts(1, image_size=IMAGE_SIZE, seed=seed)[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_families")
    return {_id(r): build_tiny_family(root / _id(r), r[0], text=r[1], vision=r[2], hidden_size=r[3]) for r in ALL}


def _hf(model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, info = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32,
                                                              output_loading_info=True)
    assert not any(info.values()), info  # missing / unexpected / mismatched keys, errors
    return model.eval(), AutoProcessor.from_pretrained(model_dir)


def _inputs(family, processor, image, question):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    assert prompt == family_prompt(family, question)
    return processor(text=prompt, images=[image], return_tensors="pt")


def _hf_greedy(model, inputs, n_tokens=N_TOKENS):
    """Greedy tokens, the chosen tokens' raw log-probabilities and the top-1/top-2 gaps."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    logprobs, margins = [], []
    for tok, logits in zip(tokens, out.logits):
        lp = torch.log_softmax(logits[0].float(), -1)
        logprobs.append(lp[tok].item())
        top2 = logits[0].float().topk(2).values
        margins.append((top2[0] - top2[1]).item())
    return tokens, logprobs, margins


@pytest.mark.parametrize("row", ALL, ids=_id)
def test_hub_layout_transformers_load_forward(built, row):
    from safetensors import safe_open

    family, text, vision, hidden = row
    model_dir = built[_id(row)]
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["model_type"] == family and cfg["architectures"] == [ARCHITECTURES[family]]

    with safe_open(model_dir / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert f.get_tensor(keys[0]).dtype == torch.bfloat16
    prefixes = HUB_PREFIXES[family]
    assert all(k.startswith(tuple(prefixes)) for k in keys), keys
    assert all(any(k.startswith(p) for k in keys) for p in prefixes)
    # Not transformers 5's save_pretrained names.
    assert not any(k.startswith(("model.language_model.", "model.vision_tower.", "model.visual.",
                                 "vision_tower.embeddings", "vision_tower.encoder")) for k in keys)
    if family in QWEN:
        assert "visual.blocks.0.attn.qkv.weight" in keys and "visual.merger.mlp.0.weight" in keys
        assert "model.layers.0.self_attn.q_proj.bias" in keys
        assert ("visual.blocks.0.mlp.gate_proj.weight" in keys) == (family == "qwen2_5_vl")
    else:
        assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in keys
        assert ("language_model.model.layers.0.self_attn.q_proj.bias" in keys) == (text == "qwen2")
        assert ("vision_tower.vision_model.embeddings.class_embedding" in keys) == (vision == "clip")
        assert not any(".head." in k for k in keys)  # SigLIP without the pooling head (vision_use_head=False)
    h = hidden or 128
    down = "model.layers.0.mlp.down_proj.weight" if family in QWEN else "language_model.model.layers.0.mlp.down_proj.weight"
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        assert tuple(f.get_slice(down).get_shape()) == (h, 352 if h == 128 else 2 * h + 16)

    model, processor = _hf(model_dir)
    tok = processor.tokenizer
    ph = placeholder_token(family)
    ph_id = tok.convert_tokens_to_ids(ph)
    assert ph_id == cfg.get("image_token_index", cfg.get("image_token_id"))
    if family in QWEN:
        for t in QWEN_TOKENS:
            assert tok.convert_tokens_to_ids(t) != tok.unk_token_id
        assert tok.convert_tokens_to_ids("<|vision_start|>") == cfg["vision_start_token_id"]

    image, question = _image_question()
    inputs = _inputs(family, processor, image, question)
    ids = inputs["input_ids"][0].tolist()
    assert tok.unk_token_id not in ids  # every word of the question is in the vocabulary
    n_image = ids.count(ph_id)
    expected = {"llava": 16, "llava_next": 16 + 8 * 8 + 8, "qwen2_vl": 4, "qwen2_5_vl": 4}.get(family)
    if expected is not None:
        assert n_image == expected, n_image
    assert n_image > 0
    with torch.no_grad():
        logits = model(**inputs).logits
        assert logits.shape == (1, len(ids), len(tok)) and torch.isfinite(logits).all()
        # The image reaches the logits (vision tower + projector/merger are wired in).
        other = _inputs(family, processor, _image_question(seed=7)[0], question)
        assert other["input_ids"].shape == inputs["input_ids"].shape
        diff = (model(**other).logits[0, -1] - logits[0, -1]).abs().max().item()
    assert diff > 1e-2, diff
    tokens, _, margins = _hf_greedy(model, inputs)
    assert len(tokens) == N_TOKENS
    specials = set(tok.all_special_ids) | {tok.convert_tokens_to_ids(t) for t in QWEN_TOKENS}
    assert not specials & set(tokens), tokens  # near-zero lm_head rows: never emitted
    assert sorted(margins)[N_TOKENS // 2] > 1.0, margins  # peaked next-token distributions


def test_deterministic_and_invalid(tmp_path):
    from safetensors.torch import load_file

    a = load_file(build_tiny_family(tmp_path / "a", "qwen2_5_vl", seed=3) / "model.safetensors")
    b = load_file(build_tiny_family(tmp_path / "b", "qwen2_5_vl", seed=3) / "model.safetensors")
    c = load_file(build_tiny_family(tmp_path / "c", "qwen2_5_vl", seed=4) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    with pytest.raises(ValueError, match="valid"):
        build_tiny_family(tmp_path / "x", "llava_next", vision="siglip")
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny_family(tmp_path / "x", "llama")


def test_string_only_template(tmp_path):
    """A text LLM's template on a LLaVA: list content kills apply_chat_template."""
    from transformers import AutoProcessor

    model_dir = build_tiny_family(tmp_path / "m", "llava", string_only_template=True)
    processor = AutoProcessor.from_pretrained(model_dir)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}]
    with pytest.raises(TypeError, match=r'can only concatenate str \(not "list"\) to str'):
        processor.apply_chat_template(msgs, add_generation_prompt=True)
    with pytest.raises(TypeError, match=r'can only concatenate str \(not "list"\) to str'):
        processor.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    text = processor.apply_chat_template([{"role": "user", "content": "<image>\nWhat color is it?"}],
                                         add_generation_prompt=True)
    assert text == "USER: <image>\nWhat color is it? ASSISTANT:"


# ----------------------------------------------------------------------------- vLLM


def _run_vllm_jobs(jobs: list[dict], workdir: Path, timeout: int = 600) -> list[dict]:
    return run_child("jobs", jobs, workdir, "vllm", script=__file__, timeout=timeout)


def _linear_names(model) -> dict[str, list[str]]:
    """vLLM linears (LinearBase: a quant_config can replace them, plus the lm_head) and plain
    torch.nn.Linear modules (always float)."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    mods = list(model.named_modules())
    return {"vllm": sorted(n for n, m in mods if isinstance(m, (LinearBase, ParallelLMHead))),
            "torch": sorted(n for n, m in mods if type(m) is torch.nn.Linear)}


def _child_run(job: dict) -> dict:
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=job["model"], dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=1,
              limit_mm_per_prompt={"image": 1, "video": 0}, distributed_executor_backend="uni", seed=0)
    t1 = time.perf_counter()
    image, question = _image_question()
    params = SamplingParams(temperature=0.0, max_tokens=N_TOKENS, logprobs=1, ignore_eos=True)
    out = llm.generate([{"prompt": family_prompt(job["family"], question), "multi_modal_data": {"image": image}}],
                       params, use_tqdm=False)[0]
    t2 = time.perf_counter()
    tokens = list(out.outputs[0].token_ids)
    result = {
        "job": job, "load_s": t1 - t0, "generate_s": t2 - t1,
        "prompt_token_ids": list(out.prompt_token_ids), "token_ids": tokens,
        "logprobs": [step[t].logprob for t, step in zip(tokens, out.outputs[0].logprobs)],
        "linears": llm.apply_model(_linear_names)[0],
    }
    del llm
    gc.collect()
    return result


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_vllm_greedy_matches_transformers(built, tmp_path):
    jobs = [{"id": _id(r), "family": r[0], "model": str(built[_id(r)])} for r in ALL]
    t0 = time.perf_counter()
    results = {r["job"]["id"]: r for r in _run_vllm_jobs(jobs, tmp_path / "run")}
    print(f"\nvLLM child: {time.perf_counter() - t0:.1f}s for {len(jobs)} models")
    image, question = _image_question()
    failures = []
    for row in ALL:
        family = row[0]
        got = results[_id(row)]
        print(f"  {_id(row)}: load {got['load_s']:.1f}s generate {got['generate_s']:.2f}s")
        missing = [n for n in VLLM_LINEARS[family] if n not in got["linears"]["vllm"]]
        assert not missing, (_id(row), missing, got["linears"])
        assert got["linears"]["torch"] == PLAIN_LINEARS.get(family, []), (_id(row), got["linears"])
        if family.startswith("llava"):
            # vision_feature_layer=-2 (CLIP): vLLM builds only the layers it uses; the last
            # layer's (and post_layernorm's) checkpoint tensors are skipped at load.
            last = "vision_tower.vision_model.encoder.layers.1.mlp.fc1"
            assert (last in got["linears"]["vllm"]) == (row[2] == "siglip"), _id(row)
        model, processor = _hf(built[_id(row)])
        inputs = _inputs(family, processor, image, question)
        tokens, logprobs, margins = _hf_greedy(model, inputs)
        assert got["prompt_token_ids"] == inputs["input_ids"][0].tolist(), _id(row)  # same placeholder expansion
        if got["token_ids"] != tokens:
            failures.append((_id(row), got["token_ids"], tokens, margins))
            continue
        err = max(abs(a - b) for a, b in zip(got["logprobs"], logprobs))
        if err > LOGPROB_TOL:
            failures.append((_id(row), "logprob", err))
    assert not failures, failures


if __name__ == "__main__":  # the vLLM child: python test_tiny_families.py _child jobs JOB OUT
    # Registry inspection in this process instead of one Python start per architecture not yet
    # in ~/.cache/vllm/modelinfos (10-40 s each on 2 cores).  On CPU there is no CUDA state for
    # the subprocess to protect.
    import vllm.model_executor.models.registry as _registry

    _registry._run_in_subprocess = lambda fn: fn()
    sys.exit(child_main(sys.argv[1:], {"jobs": lambda jobs: [_child_run(j) for j in jobs]}))
