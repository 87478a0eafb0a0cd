"""End to end: `qvlm quantize` -> vLLM (`quantization="qvlm"`, images) vs a transformers reference.

The reference is the *same math* in float32: the float model whose quantized linears
carry the dequantized codes (and, for w8a8, per-token int8 fake-quantized inputs).

Tolerances, and why (measured numbers from this machine in brackets):
* float32, weight-only schemes: only summation order differs from the reference, so
  greedy tokens agree at every step and vLLM's top-5 log-probabilities match within
  ``FP32_TOL`` nats [4e-5 .. 9e-5].
* float32, schemes with dynamic int8 activations: per-token activation quantization is
  discontinuous; a 1e-6 relative change of the pixels flips int8 codes and moved the
  reference's own log-probabilities of *unlikely* tokens by up to 1.7 nats on this
  small, sharply peaked model. Greedy tokens must still agree at every step, and the
  chosen token's log-probability within ``FP32_ACT_TOL`` [0.021].
* bfloat16 (the serving dtype, where integer kernels run): bf16 keeps 8 significant
  bits and the fallback kernel rounds dequantized weights to bf16; even vLLM's
  unquantized bf16 model differs from float32 transformers by up to 0.95 nats on the
  top-5. Greedy tokens must agree except at near ties (< ``NEAR_TIE`` nats), and the
  chosen token's log-probability within ``BF16_TOL`` [0.03 unquantized, 0.13 w4a16,
  0.09 w8a8]. The same holds in vLLM's default torch.compile mode (``bfloat16-compiled``:
  the qvlm ops traced through their fake kernels, norms and activations fused by inductor).
"""

import math

import pytest
import torch

from offline_helpers import dequantized_llava
from qvlm_kernels.checkpoint import load_quant_config
from qvlm_offline.export import export_checkpoint
from qvlm_offline.testmodels.tiny_llava import build_tiny_llava, llava_prompt, tiny_prompts
from vllm_runner import run_jobs

pytestmark = pytest.mark.slow

N_PROMPTS, N_TOKENS = 3, 8
FP32_TOL = 0.02  # nats, see module docstring
FP32_ACT_TOL = 0.1
BF16_TOL = 0.25
BF16_CASES = ["w4a16", "w8a8-vision"]
VLLM_KERNEL_LAYER_CASES = {"w4a16-asym-vision": "vllm_mp", "w8a8-vision": "vllm_scaled_mm"}
NEAR_TIE = 1.0  # nats: below this top-1/top-2 gap, bf16 may legitimately pick the other token

CASES = {
    "w4a16": dict(scheme="w4a16"),
    "w4a16-asym-vision": dict(scheme="w4a16", symmetric=False, quantize_vision=True),
    "w8a8": dict(scheme="w8a8"),
    "w8a8-vision": dict(scheme="w8a8", quantize_vision=True),
    "w4a16-688": dict(scheme="w4a16", group_size=128),  # intermediate 688: partial last group
    "w4a16-lm-head": dict(scheme="w4a16", group_size=64, quantize_lm_head=True),  # vLLM ParallelLMHead path
    # Q-VLM search export: searched rounding and scales, smoothing folded into the norms (replaced
    # float tensors). Weight-only, so the comparison stays continuous and tight; with int8
    # activations smoothing makes single code flips cost more (one step measured 0.13 nats).
    "w4a16-qvlm-smooth": dict(scheme="w4a16", method="qvlm"),
}


def _export(src, out, scheme, method="rtn", **kw):
    if method == "rtn":
        export_checkpoint(src, out, scheme=scheme, progress=False, **kw)
        return
    from qvlm_offline.cli import main

    assert main(["quantize", str(src), str(out), "--scheme", scheme, "--method", method, "--quiet",
                 "--num-samples", "4", "--iters", "5", "--smooth"]) == 0


def _wna16_here() -> bool:
    from qvlm_kernels.backends import CpuWNA16Backend
    from qvlm_kernels.format import QVLMQuantConfig

    spec = QVLMQuantConfig(scheme="w4a16").layer_spec("m")
    return CpuWNA16Backend.supports(spec, 256, 96, torch.bfloat16)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    src = build_tiny_llava(root / "src")
    src688 = build_tiny_llava(root / "src688", text_intermediate=688)
    models = {}
    for name, kw in CASES.items():
        s = src688 if name.endswith("688") else src
        _export(s, root / name, **kw)
        models[name] = (s, root / name)
    common = {"n_prompts": N_PROMPTS, "max_tokens": N_TOKENS}
    jobs = {}
    for i, (name, (_, q)) in enumerate(models.items()):
        # The first model is auto-detected from config.json; the rest name the method explicitly.
        quant = None if i == 0 else "qvlm"
        jobs[(name, "float32")] = {"model": str(q), "dtype": "float32", "quantization": quant, "max_num_seqs": 1,
                                   **common}
        if name in BF16_CASES:
            jobs[(name, "bfloat16")] = {"model": str(q), "dtype": "bfloat16", "quantization": quant, **common}
            # vLLM's default mode (torch.compile, the ops traced through their fake kernels).
            jobs[(name, "bfloat16-compiled")] = {"model": str(q), "dtype": "bfloat16", "quantization": quant,
                                                 "enforce_eager": False, **common}
    results = dict(zip(jobs, run_jobs(list(jobs.values()), root / "run")))
    if _wna16_here():
        # vLLM's own int4 op, compiled, as `qvlm bench`'s w4a16@cpu_wna16 row runs it; in a process
        # of its own, where no other backend has loaded vLLM's ops before torch.compile traces it.
        job = {"model": str(models["w4a16"][1]), "dtype": "bfloat16", "quantization": "qvlm",
               "enforce_eager": False, "kernel": "cpu_wna16", **common}
        results[("w4a16", "bfloat16-compiled-cpu_wna16")] = run_jobs([job], root / "run-wna16")[0]
    # vLLM's own kernel layers (what runs on CUDA: Marlin/Machete, CUTLASS), reached on CPU by name:
    # its CPUWNA16 kernel for int4 with zero points and biased vision linears (traced by
    # torch.compile, as vLLM serves by default), its int8 scaled-mm (eager).
    layer_jobs = {(case, f"bfloat16-{kernel}"): {"model": str(models[case][1]), "dtype": "bfloat16",
                                                 "quantization": "qvlm", "kernel": kernel,
                                                 "enforce_eager": kernel != "vllm_mp", **common}
                  for case, kernel in VLLM_KERNEL_LAYER_CASES.items()}
    results.update(zip(layer_jobs, run_jobs(list(layer_jobs.values()), root / "run-vllm-layers")))
    return models, results


def dequantized_reference(src, qdir):
    from transformers import AutoProcessor

    return dequantized_llava(src, qdir), AutoProcessor.from_pretrained(src)


def teacher_forced_logprobs(model, processor, image, question, tokens):
    inputs = processor(images=image, text=llava_prompt(question), return_tensors="pt")
    ids = torch.cat([inputs["input_ids"], torch.tensor([tokens])], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0].float()
    n = inputs["input_ids"].shape[1]
    return torch.log_softmax(logits[n - 1 : n - 1 + len(tokens)], dim=-1), inputs["input_ids"][0].tolist()


def compare(result, model, processor, chosen_only=False):
    """(steps compared, max |logprob diff| over vLLM's top-5 or the chosen token, steps where greedy tokens agree)."""
    steps, worst, agree = 0, 0.0, 0
    for (image, question), out in zip(tiny_prompts(N_PROMPTS), result["outputs"]):
        lp, prompt_ids = teacher_forced_logprobs(model, processor, image, question, out["token_ids"])
        assert out["prompt_token_ids"] == prompt_ids
        for i, (tok, top) in enumerate(zip(out["token_ids"], out["logprobs"])):
            ref_top2 = lp[i].topk(2)
            margin = (ref_top2.values[0] - ref_top2.values[1]).item()
            if tok == ref_top2.indices[0].item():
                agree += 1
            elif margin >= NEAR_TIE:
                raise AssertionError(f"step {i}: vLLM chose {tok}, reference {ref_top2.indices[0].item()} "
                                     f"with a {margin:.2f}-nat margin")
            else:
                break  # near tie: continuations legitimately differ from here
            steps += 1
            if chosen_only:
                top = {str(tok): top[str(tok)]}
            worst = max(worst, max(abs(v - lp[i, int(t)].item()) for t, v in top.items()))
    return steps, worst, agree


def assert_bf16_close(result, src, qdir):
    """A bf16 run's greedy tokens and chosen-token log-probs against the dequantized reference."""
    model, processor = dequantized_reference(src, qdir)
    steps, worst, _ = compare(result, model, processor, chosen_only=True)
    assert steps >= N_PROMPTS * N_TOKENS // 2, f"only {steps} steps before a near tie"
    assert math.isfinite(worst) and worst < BF16_TOL, f"chosen-token |logprob diff| {worst:.4f} nats"


@pytest.mark.parametrize("case", list(CASES))
def test_vllm_qvlm_fp32_matches_dequantized_reference(e2e, case):
    models, results = e2e
    src, qdir = models[case]
    model, processor = dequantized_reference(src, qdir)
    act_quant = load_quant_config(qdir).layer_spec("language_model.model.layers.0.mlp.down_proj").act_mode != "none"
    steps, worst, agree = compare(results[(case, "float32")], model, processor, chosen_only=act_quant)
    assert steps == agree == N_PROMPTS * N_TOKENS, "greedy tokens must agree at every step in float32"
    assert worst < (FP32_ACT_TOL if act_quant else FP32_TOL), f"max |logprob diff| {worst:.5f} nats"


@pytest.mark.parametrize("mode", ["bfloat16", "bfloat16-compiled"])
@pytest.mark.parametrize("case", BF16_CASES)
def test_vllm_qvlm_bf16_matches_dequantized_reference(e2e, case, mode):
    models, results = e2e
    src, qdir = models[case]
    assert_bf16_close(results[(case, mode)], src, qdir)


def test_vllm_cpu_int4_op_under_torch_compile(e2e):
    """vLLM-CPU's cpu_gemm_wna16 forced on the w4a16 checkpoint, in torch.compile mode."""
    models, results = e2e
    if ("w4a16", "bfloat16-compiled-cpu_wna16") not in results:
        pytest.skip("this vLLM-CPU build/processor has no cpu_gemm_wna16")
    src, qdir = models["w4a16"]
    assert_bf16_close(results[("w4a16", "bfloat16-compiled-cpu_wna16")], src, qdir)


@pytest.mark.parametrize("case,kernel", list(VLLM_KERNEL_LAYER_CASES.items()))
def test_vllm_kernel_layers_match_dequantized_reference(e2e, case, kernel):
    """The checkpoint on vLLM's mixed-precision / scaled-mm kernel layer (our repacking, vLLM's
    weight preparation and kernel), in vLLM on this CPU."""
    models, results = e2e
    src, qdir = models[case]
    assert_bf16_close(results[(case, f"bfloat16-{kernel}")], src, qdir)


def test_quantization_is_really_applied(e2e):
    """vLLM's qvlm outputs follow the dequantized reference, not the float model."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    models, results = e2e
    src, qdir = models["w4a16"]
    fp = LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(src)
    deq, _ = dequantized_reference(src, qdir)
    gaps = []
    for (image, question), out in zip(tiny_prompts(N_PROMPTS), results[("w4a16", "float32")]["outputs"]):
        lp_fp, _ = teacher_forced_logprobs(fp, processor, image, question, out["token_ids"])
        lp_q, _ = teacher_forced_logprobs(deq, processor, image, question, out["token_ids"])
        for i, top in enumerate(out["logprobs"]):
            for t, v in top.items():
                gaps.append((abs(v - lp_fp[i, int(t)].item()), abs(v - lp_q[i, int(t)].item())))
    to_fp = sum(g[0] for g in gaps) / len(gaps)
    to_q = sum(g[1] for g in gaps) / len(gaps)
    assert to_q * 3 < to_fp, (to_q, to_fp)


def test_bad_checkpoint_fails_in_vllm_with_the_file_and_tensor_named(e2e, tmp_path):
    import shutil

    models, _ = e2e
    bad = tmp_path / "bad"
    shutil.copytree(models["w4a16"][1], bad)
    shard = bad / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4096])
    with pytest.raises(RuntimeError) as e:
        run_jobs([{"model": str(bad), "n_prompts": 1, "max_tokens": 1}], tmp_path / "run")
    assert f"{shard}: truncated: tensor" in str(e.value)
