"""qvlm search-cost: runs every method on two depths and reports cost per layer and memory (tiny widths)."""

import json

from qvlm_offline.cli import build_parser
from qvlm_offline.tools.search_cost import _summarize, memory_formula, run_search_cost


def test_search_cost_runs_each_method_per_depth_and_extrapolates(tmp_path):
    args = build_parser().parse_args(["search-cost", "--workdir", str(tmp_path), "--widths", "tiny", "--layers", "1",
                                      "2", "--methods", "qvlm", "--samples", "4", "--iters", "3",
                                      "--vision-layers", "1", "--device", "cpu"])
    res = run_search_cost(tmp_path, args)
    assert [(r["method"], r["layers"], r["rc"]) for r in res["runs"]] == [("qvlm", 1, 0), ("qvlm", 2, 0)]
    for r in res["runs"]:
        assert r["peak_rss_bytes"] > 0 and r["cpu_s"] > 0 and r["tokens"] > 4 * 16  # 16 image tokens per sample
        assert r["placement"]["device"] == "cpu"
        assert r["formula"]["predicted_peak_bytes"] > res["import_baseline_rss_bytes"]
    q = next(s for s in res["summary"] if s["method"] == "qvlm")
    assert {"seconds_per_layer", "extrapolated_full_depth_s", "seconds_per_layer_at_150_steps"} <= set(q)
    assert res["machine"]["cpu_model"] and "threads" in res["machine"]
    step = res["step_seconds_one_layer"]
    assert step["float32"]["seconds"] > 0 and ("seconds" in step["bfloat16"] or "skipped" in step["bfloat16"])
    saved = json.loads((tmp_path / "search_cost.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(res["summary"]))
    assert not list(tmp_path.glob("out-*/config.json"))  # quantized outputs removed after each run (reports kept)
    assert (tmp_path / "out-L2-qvlm-4-report" / "report.json").exists()


def test_summary_slope_and_intercept():
    rows = [{"method": "gptq", "samples": 8, "rc": 0, "layers": L, "wall_s": 10 + 5 * L, "cpu_s": 20 + 10 * L,
             "peak_rss_bytes": 100 + L} for L in (2, 8)]
    rows += [{"method": "qvlm", "samples": 8, "rc": 0, "layers": L, "wall_s": 10 + 20 * L, "cpu_s": 1.0,
              "peak_rss_bytes": 100, "seconds_steps": 2 * L * 10} for L in (2, 8)]  # 10 steps: 2 s/step/layer
    g, q = _summarize(rows, full_depth=32, iters=10)
    assert abs(g["seconds_per_layer"] - 5) < 1e-9 and abs(g["fixed_seconds"] - 10) < 1e-9
    assert abs(g["extrapolated_full_depth_s"] - 170) < 1e-9 and abs(g["cpu_seconds_per_layer"] - 10) < 1e-9
    assert abs(q["per_layer_vs_gptq"] - 4) < 1e-9
    assert abs(q["seconds_per_layer_at_150_steps"] - (20 + 2 * 140)) < 1e-9


def test_memory_formula_block_phase_independent_of_depth_and_bf16_halves_activations(tmp_path):
    from qvlm_offline.testmodels.synthetic import TOWERS, write_random_llava

    est = {}
    for layers in (1, 3):
        src = tmp_path / f"L{layers}"
        write_random_llava(src, hidden=256, intermediate=512, heads=4, layers=layers, vision_layers=1,
                           vision=TOWERS["tiny"])
        for method in ("gptq", "qvlm"):
            for dtype in ("float32", "bfloat16"):
                est[layers, method, dtype] = memory_formula(src, 1000, method, 2, dtype)
    for method in ("gptq", "qvlm"):
        a, b = est[1, method, "float32"], est[1, method, "bfloat16"]
        assert b["activation_bytes"] * 2 == a["activation_bytes"]
        assert a["block_phase_bytes"] == est[3, method, "float32"]["block_phase_bytes"]
    assert est[1, "qvlm", "float32"]["skeleton_bytes"] == 4 * 32064 * 256  # lm_head kept for the last block's KL
    assert est[1, "gptq", "float32"]["skeleton_bytes"] == 0
    # gptq's layer: the 16-bit stored linears during the solves, float32 once dequantized
    lin = 4 * 256 * 256 + 3 * 256 * 512
    assert est[1, "gptq", "float32"]["block_bytes"] >= 4 * lin
