"""Smoke test of the benchmark (``qvlm_offline.bench``): the tiny model, one scheme, one batch size."""

import json
import math

import pytest

from qvlm_offline.bench import run_bench

pytestmark = pytest.mark.slow


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_tiny_smoke(tmp_path):
    json_path = tmp_path / "out" / "bench.json"
    result = run_bench(tmp_path / "work", tiny=True, schemes=("w4a16",), batch_sizes=(1,), decode_tokens=4,
                       json_path=json_path, png_path=tmp_path / "out" / "bench.png", verbose=False)
    on_disk = json.loads(json_path.read_text())
    assert on_disk["configs"] == json.loads(json.dumps(result["configs"]))

    assert on_disk["model"]["text_layers"] == 2 and on_disk["model"]["vision_layers"] == 2
    assert "decoder layers" in on_disk["model"]["note"]
    bw = on_disk["machine"]["bandwidth"]
    assert _positive(bw["copy_GBps"]) and _positive(bw["read_GBps"])
    assert on_disk["settings"]["batch_sizes"] == [1] and on_disk["settings"]["decode_tokens"] == 4
    assert on_disk["settings"]["compile"] is False and "enforce_eager" in on_disk["settings"]["engine"]
    assert (on_disk["png"] is None) == ("png_skipped" in on_disk)

    names = [c["name"] for c in on_disk["configs"]]
    assert names[:2] == ["bf16", "w4a16"]
    bf16, w4 = on_disk["configs"][:2]
    # vLLM's own int4 kernel on the same checkpoint, where this processor's vLLM build has it.
    assert names[2:] in ([], ["w4a16@cpu_wna16"])
    for c in on_disk["configs"][2:]:
        assert c["forced_kernel"] == "cpu_wna16" and c["kernel"] == "cpu_wna16" and c["scheme"] == "w4a16"
        assert c["weights"] == w4["weights"]
    assert bf16["kernel"] == "bf16" and bf16["scheme"] is None
    assert w4["scheme"] == "w4a16" and w4["kernel"] and w4["kernel_source"] in ("log", "select_backend")
    for c in on_disk["configs"]:
        w = c["weights"]
        for key in ("total_bytes", "quantized_linear_bytes", "quantized_linear_bf16_bytes",
                    "decode_step_bytes_stored", "decode_step_bytes_bf16"):
            assert isinstance(w[key], int) and w[key] > 0, (c["name"], key)
        assert w["quantized_linears"] == 15  # 2 layers x (q, k, v, o, gate, up, down) + lm_head (bench default)
        for key in ("ttft_s", "load_s", "decode_bytes_read_per_step"):
            assert _positive(c[key]), (c["name"], key)
        assert c["ttft_prompt_tokens"] > 16  # the image's 16 patch tokens and the question
        d = c["decode"]["1"]
        for key in ("tokens_per_s", "step_s", "bandwidth_fraction", "bound_tokens_per_s_runtime_bytes",
                    "bound_tokens_per_s_stored_bytes"):
            assert _positive(d[key]), (c["name"], key)
        assert d["bandwidth_fraction"] < 1.5  # a decode step cannot stream weights much faster than memory
    # 4-bit linears: 4 bits + one fp16 scale per 128 weights, against 16 bits.
    ratio = w4["weights"]["quantized_linear_bytes"] / w4["weights"]["quantized_linear_bf16_bytes"]
    assert 0.25 < ratio < 0.3
    assert bf16["weights"]["quantized_linear_bytes"] == bf16["weights"]["quantized_linear_bf16_bytes"]
    assert w4["weights"]["quantized_linear_bf16_bytes"] == bf16["weights"]["quantized_linear_bf16_bytes"]


@pytest.mark.parametrize("argv, want", [([], False), (["--compile"], True), (["--no-compile"], False)])
def test_bench_compile_flag_reaches_run_bench(argv, want):
    import argparse

    from qvlm_offline.bench import add_bench_args, bench_kwargs

    p = argparse.ArgumentParser()
    add_bench_args(p)
    assert bench_kwargs(p.parse_args(argv))["compile"] is want
