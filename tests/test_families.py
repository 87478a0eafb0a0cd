"""Model families end to end: every method and scheme quantizes, loads in vLLM, and its greedy
tokens follow a transformers reference running the dequantized weights (float32 both sides).

Tiny random checkpoints in the hub layout, each with its real processor: LLaVA assembled from
a Mistral and from a Qwen2 text model (q/k/v biases kept 16-bit) with CLIP and SigLIP towers,
widths that are not a multiple of the group size (partial last groups), and a LLaVA that kept
its text LLM's string-only chat template (calibration renders the placeholder into the
string). Then the other families of ``qvlm_offline.testmodels.tiny_families`` (LLaVA-NeXT's anyres tiles,
LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL with their own vision transformers, M-RoPE and the
names vLLM gives their modules), every method at w4a16. Every model runs in one vLLM child
process. Besides the tokens, every quantized module of the checkpoint must run on the qvlm
linear method in vLLM (the plugin gave each renamed or fused layer its spec). Tolerances as
tests/test_e2e_vllm.py's float32 ones. The test writes the family x method x scheme table the
README shows (``QVLM_FAMILY_TABLE=path`` to keep it).
"""

import json
import os
from collections import Counter

import pytest
import torch

from offline_helpers import dequantized_llava
from qvlm_kernels.checkpoint import load_quant_config, validate_checkpoint
from qvlm_offline.adapters import adapter_for
from qvlm_offline.calibration import format_prompt
from qvlm_offline.pipeline import QuantizeOptions, quantize
from qvlm_offline.testmodels.tiny_llava import build_tiny_llava, tiny_prompts
from vllm_runner import run_jobs

pytestmark = pytest.mark.slow
pytest.importorskip("easy_vqa")

N_PROMPTS, N_TOKENS = 2, 6
FP32_TOL, FP32_ACT_TOL = 0.02, 0.1  # nats, as tests/test_e2e_vllm.py
STRING_ONLY_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)
WIDTHS = dict(text_hidden=192, text_intermediate=208, text_heads=3, text_kv_heads=1)  # partial groups, head_dim 64
FAMILIES = {
    "llava / mistral + clip": dict(text_model="mistral", vision_model="clip", **WIDTHS),
    "llava / qwen2 + siglip": dict(text_model="qwen2", vision_model="siglip", **WIDTHS),
    "llava / llama, string-only template": dict(chat_template=STRING_ONLY_TEMPLATE),
}
# Families built by qvlm_offline.testmodels.tiny_families (their own processors: anyres tiles, SigLIP,
# Qwen2-VL's dynamic resolution and M-RoPE): every method on w4a16.
OTHER_FAMILIES = {
    "llava-next / mistral + clip": ("llava_next", "mistral", "clip"),
    "llava-onevision / qwen2 + siglip": ("llava_onevision", "qwen2", "siglip"),
    "qwen2-vl": ("qwen2_vl", None, None),
    "qwen2.5-vl": ("qwen2_5_vl", None, None),
}
# the string-only template is about calibration, which every scheme shares: one scheme is enough
FAMILY_SCHEMES = {"llava / llama, string-only template": ("w4a16",), **{f: ("w4a16",) for f in OTHER_FAMILIES}}
METHODS = ("rtn", "gptq", "qvlm")
SCHEMES = ("w4a16", "w8a8", "w4a8")


def _prompts(src):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(src)
    return processor, [format_prompt(((q, None),), has_image=True, processor=processor)
                       for _, q in tiny_prompts(N_PROMPTS)]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    models, jobs = {}, []
    from qvlm_offline.testmodels.tiny_families import build_tiny_family

    builders = {fam: (lambda d, kw=kw: build_tiny_llava(d, **kw)) for fam, kw in FAMILIES.items()}
    builders |= {fam: (lambda d, a=args: build_tiny_family(d, a[0], text=a[1], vision=a[2]))
                 for fam, args in OTHER_FAMILIES.items()}
    for i, (fam, build) in enumerate(builders.items()):
        src = build(root / f"f{i}")
        _, prompts = _prompts(src)
        for method in METHODS:
            for scheme in FAMILY_SCHEMES.get(fam, SCHEMES):
                out = root / f"f{i}-{method}-{scheme}"
                opts = QuantizeOptions(scheme=scheme, method=method, num_samples=4, progress=False,
                                       search=dict(iters=4, eval_every=2))
                quantize(src, out, opts)
                models[(fam, method, scheme)] = (src, out)
                jobs.append({"model": str(out), "dtype": "float32", "quantization": "qvlm", "max_num_seqs": 1,
                             "n_prompts": N_PROMPTS, "max_tokens": N_TOKENS, "prompts": prompts,
                             "qvlm_layers": True})
    results = dict(zip(models, run_jobs(jobs, root / "run", timeout=1500)))
    return models, results


def _teacher_forced(model, adapter, processor, image, prompt, tokens):
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    with torch.no_grad():  # the family's per-token inputs (Qwen2-VL's M-RoPE token types) extended too
        logits = model(**adapter.append_text_tokens(inputs, tokens)).logits[0].float()
    n = inputs["input_ids"].shape[1]
    return torch.log_softmax(logits[n - 1: n - 1 + len(tokens)], dim=-1), inputs["input_ids"][0].tolist()


def _compare(result, src, qdir):
    """(greedy steps agreeing with the reference, steps, worst |logprob diff| of the chosen or top-5 tokens)."""
    processor, prompts = _prompts(src)
    model = dequantized_llava(src, qdir)
    adapter = adapter_for(src)
    act = load_quant_config(qdir).layer_spec(adapter.decoder_linears(0)[-1]).act_mode != "none"
    agree = steps = 0
    worst = 0.0
    for (image, _), prompt, out in zip(tiny_prompts(N_PROMPTS), prompts, result["outputs"]):
        lp, prompt_ids = _teacher_forced(model, adapter, processor, image, prompt, out["token_ids"])
        assert out["prompt_token_ids"] == prompt_ids, "vLLM and the processor tokenized the prompt differently"
        for i, (tok, top) in enumerate(zip(out["token_ids"], out["logprobs"])):
            steps += 1
            agree += tok == lp[i].argmax().item()
            items = {str(tok): top[str(tok)]} if act else top
            worst = max(worst, max(abs(v - lp[i, int(t)].item()) for t, v in items.items()))
    return agree, steps, worst, act


def _by_input_width(shapes) -> Counter:
    """{K: total N} over (K, N) shapes: fused layers (qkv_proj, gate_up_proj) sum their shards' N."""
    out = Counter()
    for k, n in shapes:
        out[k] += n
    return out


def test_every_family_method_and_scheme_matches_its_dequantized_reference(families):
    models, results = families
    rows, failures = [], []
    for (fam, method, scheme), (src, qdir) in models.items():
        res = results[(fam, method, scheme)]
        stored = _by_input_width(validate_checkpoint(qdir).values())
        served = _by_input_width(res["qvlm_layers"].values())
        if served != stored:  # a quantized module vLLM did not run on the qvlm method (or ran twice)
            failures.append(f"{fam} {method} {scheme}: quantized (K: N) stored {dict(stored)}, served by "
                            f"the qvlm method in vLLM {dict(served)} ({sorted(res['qvlm_layers'])})")
        agree, steps, worst, act = _compare(res, src, qdir)
        ok = agree == steps and worst < (FP32_ACT_TOL if act else FP32_TOL)
        rows.append((fam, method, scheme, res["qvlm_plugin_loaded"], agree, steps, worst))
        if not ok:
            failures.append(f"{fam} {method} {scheme}: {agree}/{steps} tokens, |dlogp| {worst:.4f}")
    table = ["| family | method | scheme | quantize | vLLM loads (qvlm) | greedy tokens = reference | max abs dlogp |",
             "|---|---|---|---|---|---|---|"]
    table += [f"| {f} | {m} | {s} | ok | {'yes' if loaded else 'no'} | {a}/{n} | {w:.4f} |"
              for f, m, s, loaded, a, n, w in rows]
    text = "\n".join(table) + "\n"
    print(text)
    if os.environ.get("QVLM_FAMILY_TABLE"):
        with open(os.environ["QVLM_FAMILY_TABLE"], "w") as fh:
            fh.write(text)
    assert all(r[3] for r in rows), "the qvlm plugin was not loaded"
    assert not failures, "\n".join(failures)


def test_qwen2_biases_stay_16_bit_and_partial_groups_are_covered(families):
    from qvlm_kernels.checkpoint import tensor_table

    models, _ = families
    src, qdir = models[("llava / qwen2 + siglip", "qvlm", "w4a16")]
    table = tensor_table(qdir)
    bias = table["language_model.model.layers.0.self_attn.q_proj.bias"]
    assert bias.dtype_name == "bfloat16" and "language_model.model.layers.0.self_attn.q_proj.qweight" in table
    # K = 208 with group 128: one full group and a partial one
    assert tuple(table["language_model.model.layers.0.mlp.down_proj.scales"].shape) == (2, 192)
    assert json.loads((qdir / "config.json").read_text())["quantization_config"]["group_size"] == 128
