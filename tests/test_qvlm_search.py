"""The Q-VLM search on the tiny LLaVA: lower block error than RTN, deterministic, exported faithfully.

CI's small version of the comparison in docs/results.md: a handful of easy-VQA train
samples, a few dozen steps per block.
"""

import json

import pytest
import torch

from offline_helpers import dequantized_llava
from qvlm_kernels.checkpoint import load_quant_config, read_tensor, tensor_table
from qvlm_offline.adapters import adapter_for
from qvlm_offline.calibration import build_model_inputs, load_calibration
from qvlm_offline.cli import main
from qvlm_offline.export import build_quant_config
from qvlm_offline.qvlm import SearchConfig, qvlm_search
from qvlm_offline.testmodels.tiny_llava import build_tiny_llava

pytest.importorskip("easy_vqa")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoProcessor

    src = build_tiny_llava(tmp_path_factory.mktemp("qvlm") / "src")
    inputs = build_model_inputs(load_calibration("easyvqa", 8, 0), AutoProcessor.from_pretrained(src))
    return src, inputs


def _search(tiny, scheme, **kw):
    src, inputs = tiny
    spec_for = build_quant_config(scheme, None, True, False, False, {}, adapter_for(src)).layer_spec
    return qvlm_search(src, inputs, spec_for, SearchConfig(**kw), progress=False)


@pytest.mark.parametrize("scheme", ["w4a16", "w4a8"])
def test_search_beats_rtn_and_never_loses_to_its_start(tiny, scheme):
    res = _search(tiny, scheme, iters=30, eval_every=10)
    rep = res.report
    assert [b["start"] for b in rep["blocks"]] == [p["start"] for p in rep["partition"]]
    for b in rep["blocks"]:
        assert b["error_final"] < b["error_rtn"], b
        if b["end"] < len(rep["layers"]):  # the last block trades hidden-state error for the KL term
            assert b["error_final"] <= b["error_gptq"], b
    assert len(res.tensors) == 7 * len(rep["layers"])
    assert all(d["entropy"] > 0 for d in rep["layers"])
    assert rep["layers"][0]["dependency_next"] > 0


def test_search_is_deterministic_with_a_seed(tiny):
    a = _search(tiny, "w4a8", iters=6, eval_every=3, seed=3)
    b = _search(tiny, "w4a8", iters=6, eval_every=3, seed=3)
    assert a.tensors.keys() == b.tensors.keys() and a.replaced.keys() == b.replaced.keys()
    for k in a.tensors:
        for x, y in zip(a.tensors[k], b.tensors[k]):
            assert (x is None and y is None) or torch.equal(x, y), k
    for k in a.replaced:
        assert torch.equal(a.replaced[k], b.replaced[k]), k


def _mean_kl(src, qdir, inputs):
    from transformers import LlavaForConditionalGeneration

    fp = LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    q = dequantized_llava(src, qdir)
    kls = []
    with torch.no_grad():
        for inp in inputs:
            p = torch.log_softmax(fp(**inp).logits.float(), -1)
            r = torch.log_softmax(q(**inp).logits.float(), -1)
            kls.append((p.exp() * (p - r)).sum(-1).mean().item())
    return sum(kls) / len(kls)


def test_cli_qvlm_export_and_report_beat_rtn_end_to_end(tiny, tmp_path):
    from transformers import AutoProcessor

    src, _ = tiny
    common = ["--scheme", "w4a8", "--quiet", "--num-samples", "8"]
    assert main(["quantize", str(src), str(tmp_path / "rtn"), *common]) == 0
    assert main(["quantize", str(src), str(tmp_path / "qvlm"), *common, "--method", "qvlm", "--iters", "30",
                 "--report", str(tmp_path / "rep")]) == 0
    assert load_quant_config(tmp_path / "qvlm").producer["method"] == "qvlm"
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["peak_rss_gib"] > 0 and rep["seconds_total"] > 0 and rep["blocks"]
    assert (tmp_path / "rep" / "entropy_dependency.png").stat().st_size > 1000
    assert (tmp_path / "rep" / "block_error.png").stat().st_size > 1000
    # smoothing (w4a8) rewrote the RMSNorm weights that fold the factors
    table = tensor_table(tmp_path / "qvlm")
    src_table = tensor_table(src)
    norm = "language_model.model.layers.0.post_attention_layernorm.weight"
    assert rep["blocks"][0]["smoothing_alpha"][0] == 0.0 or not torch.equal(
        read_tensor(table[norm]), read_tensor(src_table[norm]))
    # held-out samples (a different seed of the train split): next-token KL to the float model
    held_out = build_model_inputs(load_calibration("easyvqa", 8, 123), AutoProcessor.from_pretrained(src))
    kl_rtn = _mean_kl(src, tmp_path / "rtn", held_out)
    kl_qvlm = _mean_kl(src, tmp_path / "qvlm", held_out)
    assert kl_qvlm < kl_rtn, (kl_qvlm, kl_rtn)


def test_visual_stage_keeps_the_best_projector_and_measures_the_dependency(tiny):
    res = _search(tiny, "w4a8", iters=4, eval_every=2, optimize_vision=True, vision_iters=6)
    v = res.report["vision"]
    assert v["kl_final"] <= v["kl_start"]
    assert len(v["dependency_after"]) == len(res.report["layers"]) - 1
    assert v["mean_dependency_after"] > 0 and v["mean_dependency_before"] > 0
    assert any(k.startswith("multi_modal_projector.") for k in res.replaced)


@pytest.mark.parametrize("k, group_size", [(256, 128), (160, 64)])
def test_soft_weight_paths_agree(k, group_size):
    """The searched weight and its gradients: the per-group broadcast (even and ragged last group)
    equals the per-column gather it replaced; the compiled soft weight equals the eager one."""
    from qvlm_kernels.format import LayerSpec
    from qvlm_offline.qvlm import SearchLinear, _group_index
    from qvlm_offline.rtn import quantize_rtn

    torch.manual_seed(0)
    lin = torch.nn.Linear(k, 96, bias=False)
    spec = LayerSpec("w4a16", 4, group_size, False, None, "none")
    sl = SearchLinear(lin, spec, *quantize_rtn(lin.weight.detach(), spec), None)
    with torch.no_grad():
        sl.v.add_(torch.randn_like(sl.v))
        sl.log_mult.add_(0.01 * torch.randn_like(sl.log_mult))
    g = torch.randn(96, k)
    gidx = _group_index(k, group_size)

    def run(compile: bool, gather: bool = False):
        sl.hard, sl.compiled = False, compile
        sl.v.grad = sl.log_mult.grad = None
        w = ((sl.codes() - sl.z[gidx].t()) * sl.scales()[gidx].t()) if gather else sl.weight()
        (w * g).sum().backward()
        return w.detach(), sl.v.grad.clone(), sl.log_mult.grad.clone()

    eager, gathered = run(False), run(False, gather=True)
    assert torch.equal(eager[0], gathered[0]) and torch.equal(eager[1], gathered[1])
    torch.testing.assert_close(eager[2], gathered[2], rtol=1e-5, atol=1e-6)  # a sum in another order
    if k == 256:  # one shape compiled (a compile costs ~20 s on 2 cores)
        compiled = run(True)
        torch.testing.assert_close(compiled[0], eager[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(compiled[2], eager[2], rtol=1e-5, atol=1e-6)
    sl.hard = True
    hard = sl.weight()
    assert torch.equal(hard, (sl.codes() - sl.z[gidx].t()) * sl.scales()[gidx].t())


def test_patience_stops_a_block_where_the_held_out_error_stops_improving(tiny):
    r = _search(tiny, "w4a16", iters=30, eval_every=3, patience=1)
    for b in r.report["blocks"]:
        assert b["steps"] <= min(30, b["best_step"] + 3), b  # one check without a new best ends the block
    assert any(b["steps"] < 30 for b in r.report["blocks"]), r.report["blocks"]
