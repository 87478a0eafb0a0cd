"""The benchmark (``qvlm_offline.tools.bench``): a smoke run of the tiny model (one scheme, one batch size, in
vLLM on CPU), and its planning for a CUDA machine (pure functions, and the whole orchestration with
fake child processes), which runs here without a GPU."""

import json
import math
from pathlib import Path

import pytest

from qvlm_offline.tools.bench import run_bench



def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
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
    assert on_disk["settings"]["device"] == "cpu" and on_disk["machine"]["device"] == "cpu"
    assert on_disk["machine"]["threads"] >= 1 and "gpu" not in on_disk["machine"]
    assert all(c["status"] == "ok" for c in on_disk["configs"])
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

    from qvlm_offline.tools.bench import add_bench_args, bench_kwargs

    p = argparse.ArgumentParser()
    add_bench_args(p)
    assert bench_kwargs(p.parse_args(argv))["compile"] is want


# ----------------------------------------------------------------------------- CUDA planning (no GPU needed)

from qvlm_offline.tools import bench as B  # noqa: E402


def test_resolve_device():
    assert B.resolve_device("auto", cuda_available=True) == "cuda"
    assert B.resolve_device("auto", cuda_available=False) == "cpu"
    assert B.resolve_device("cpu", cuda_available=True) == "cpu"
    assert B.resolve_device("cuda", cuda_available=False) == "cuda"
    with pytest.raises(ValueError):
        B.resolve_device("rocm")


def _parse(argv):
    import argparse

    p = argparse.ArgumentParser()
    B.add_bench_args(p)
    return B.bench_kwargs(p.parse_args(argv))


def test_batch_defaults_per_device():
    assert B.default_batch_sizes("cpu") == (1, 8)  # as before the CUDA support
    assert B.default_batch_sizes("cuda") == (1, 8, 32, 128)
    kw = _parse([])
    assert kw["batch_sizes"] is None and kw["device"] == "auto" and kw["kernels"] is None  # resolved per device
    kw = _parse(["--device", "cuda", "--batch-sizes", "1,4", "--kernels", "triton_w4a16",
                 "--gpu-memory-utilization", "0.5", "--no-cuda-graphs", "--child-timeout", "60", "--kv-cache-gib", "4"])
    assert kw["batch_sizes"] == (1, 4) and kw["kernels"] == ("triton_w4a16",)
    assert kw["gpu_memory_utilization"] == 0.5 and kw["cuda_graphs"] is False and kw["child_timeout"] == 60
    assert kw["kv_cache_gib"] == 4 and _parse([])["kv_cache_gib"] is None


def test_kernels_per_scheme():
    assert B.default_kernels("cpu") is None
    assert B.default_kernels("cuda") == ("vllm_mp", "vllm_scaled_mm", "triton_w4a16", "triton_w8a8", "triton_w4a8")
    assert B.default_kernels("cuda", vllm_kernels=False) == ("triton_w4a16", "triton_w8a8", "triton_w4a8")
    ks = B.default_kernels("cuda")
    assert B.kernel_candidates("w4a16", ks) == ["vllm_mp", "triton_w4a16"]
    assert B.kernel_candidates("w8a8", ks) == ["vllm_scaled_mm", "triton_w8a8"]
    assert B.kernel_candidates("w4a8", ks) == ["vllm_mp", "triton_w4a8"]
    assert B.kernel_candidates("w4a16", ["dequantized"]) == ["dequantized"]  # outside CUDA_KERNELS: every scheme
    assert B.kernel_candidates("w4a16", None) == []


def _probe(default, *candidates):
    return {"device": "cuda", "default": default,
            "candidates": [{"backend": b, "ok": why is None, "reason": why} for b, why in candidates]}


def test_plan_runs_cuda_rows():
    models = {
        "bf16": {},
        "w4a16": {"kernel_probe": _probe(["vllm_mp"], ("vllm_mp", None), ("triton_w4a16", None))},
        "w8a8": {"kernel_probe": _probe(["dequantized", "triton_w8a8"], ("vllm_scaled_mm", None), ("triton_w8a8", None))},
        "w4a8": {"kernel_probe": _probe(["triton_w4a8"], ("vllm_mp", "int4 x int8: no vLLM kernel"), ("triton_w4a8", None))},
    }
    runs, notes = B.plan_runs("cuda", ["w4a16", "w8a8", "w4a8"], models, B.default_kernels("cuda"))
    assert [r["name"] for r in runs] == ["bf16", "w4a16@vllm_mp", "w4a16@triton_w4a16",
                                         "w8a8", "w8a8@vllm_scaled_mm", "w8a8@triton_w8a8",
                                         "w4a8@vllm_mp", "w4a8@triton_w4a8"]
    by = {r["name"]: r for r in runs}
    # The dispatcher's own choice is measured once: as its SCHEME@KERNEL row, or as a plain row
    # where it is none of the candidates (here w8a8: two backends over its layers).
    assert by["w4a16@vllm_mp"]["dispatch_default"] and not by["w4a16@triton_w4a16"]["dispatch_default"]
    assert by["w8a8"]["force_kernel"] is None and by["w8a8"]["dispatch_default"]
    assert by["w4a8@triton_w4a8"]["dispatch_default"]
    assert by["w4a8@vllm_mp"]["skip"] == "int4 x int8: no vLLM kernel"
    assert [r["force_kernel"] for r in runs if r["force_kernel"]] == [
        "vllm_mp", "triton_w4a16", "vllm_scaled_mm", "triton_w8a8", "vllm_mp", "triton_w4a8"]
    assert notes == ["w4a8@vllm_mp skipped: int4 x int8: no vLLM kernel"]


def test_plan_runs_cpu_as_before():
    models = {"bf16": {}, "w4a16": {"vllm_builtin": {"backend": "cpu_wna16", "reason": None}},
              "w8a8": {"vllm_builtin": {"backend": None, "reason": "the w8a8 row already runs vLLM's cpu_amx_int8"}},
              "w4a8": {}}
    runs, notes = B.plan_runs("cpu", ["w4a16", "w8a8", "w4a8"], models)
    assert [(r["name"], r["force_kernel"]) for r in runs] == [
        ("bf16", None), ("w4a16", None), ("w4a16@cpu_wna16", "cpu_wna16"), ("w8a8", None), ("w4a8", None)]
    assert not any(r["skip"] for r in runs)
    assert notes == ["no vLLM-kernel row for w8a8: the w8a8 row already runs vLLM's cpu_amx_int8"]


def test_engine_and_llm_kwargs():
    job = {"model": "m", "quantization": "qvlm", "compile": False, "batch_sizes": [8, 1, 32, 128], "max_model_len": 768}
    cpu = B.llm_kwargs(job)
    assert cpu == dict(model="m", quantization="qvlm", dtype="bfloat16", enforce_eager=True, max_model_len=768,
                       max_num_seqs=128, seed=0, limit_mm_per_prompt={"image": 1}, distributed_executor_backend="uni",
                       enable_prefix_caching=False)  # the CPU engine as before
    assert B.engine_settings("cpu", False, True, [1])["description"] == (
        "vllm.LLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), enforce_eager, uni executor, prefix caching off, "
        "one child process per configuration")
    assert B.llm_kwargs({**job, "compile": True})["enforce_eager"] is False

    cuda = B.llm_kwargs({**job, "device": "cuda", "gpu_memory_utilization": 0.7})
    assert cuda["gpu_memory_utilization"] == 0.7 and cuda["enforce_eager"] is False
    assert cuda["compilation_config"] == {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                                          "cudagraph_capture_sizes": [1, 8, 32, 128]}
    assert "kv_cache_memory_bytes" not in cuda
    eager = B.llm_kwargs({**job, "device": "cuda", "cuda_graphs": False, "kv_cache_memory_bytes": 4 << 30})
    assert eager["enforce_eager"] is True and "compilation_config" not in eager and eager["kv_cache_memory_bytes"] == 4 << 30
    assert eager["gpu_memory_utilization"] == B.DEFAULT_GPU_MEMORY_UTILIZATION
    compiled = B.llm_kwargs({**job, "device": "cuda", "compile": True})
    assert compiled["enforce_eager"] is False and compiled["compilation_config"] == {"cudagraph_capture_sizes": [1, 8, 32, 128]}
    assert B.llm_kwargs({**job, "device": "cuda", "compile": True, "cuda_graphs": False})["compilation_config"] == {
        "cudagraph_mode": "NONE"}


def test_cuda_compilation_configs_are_valid_for_vllm():
    pytest.importorskip("vllm")
    from vllm.config import CompilationConfig
    from vllm.config.compilation import CompilationMode, CUDAGraphMode

    graphs = CompilationConfig(**B.engine_settings("cuda", False, True, [1, 8])["compilation_config"])
    assert graphs.mode == CompilationMode.NONE and graphs.cudagraph_mode == CUDAGraphMode.FULL_DECODE_ONLY
    assert graphs.cudagraph_capture_sizes == [1, 8]
    CompilationConfig(**B.engine_settings("cuda", True, True, [1, 8])["compilation_config"])
    assert CompilationConfig(**B.engine_settings("cuda", True, False, [1])["compilation_config"]).cudagraph_mode \
        == CUDAGraphMode.NONE


def test_child_env_per_device(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    from qvlm_offline.tools.child import child_env

    cpu = child_env(2)
    assert cpu["OMP_NUM_THREADS"] == "2" and cpu["VLLM_CPU_KVCACHE_SPACE"] == "1"
    cuda = child_env(None, "cuda")
    assert "OMP_NUM_THREADS" not in cuda and not any(k.startswith("VLLM_CPU_") for k in cuda)
    assert cuda["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and "TRITON_INTERPRET" not in cuda


def test_probe_kernels_reports_refusals(monkeypatch):
    """Which CUDA kernels can run a checkpoint's layers (Triton backends answer from the layer spec alone)."""
    pytest.importorskip("triton")
    from qvlm_kernels.format import LayerSpec

    w4a8 = LayerSpec(scheme="w4a8", bits=4, group_size=128, symmetric=True, act_bits=8, act_mode="int8_dynamic")
    monkeypatch.setattr(B, "_quantized_layers", lambda d: [("m.q_proj", w4a8, 4096, 4096)])
    probe = B._probe_kernels("unused", ["triton_w4a8", "triton_w4a16", "no_such_kernel"], "cuda")
    assert probe["default"] == ["triton_w4a8"]
    ok, refused, missing = probe["candidates"]
    assert ok == {"backend": "triton_w4a8", "ok": True, "reason": None}
    assert not refused["ok"] and refused["reason"].startswith("m.q_proj (K=4096, N=4096): ")
    assert not missing["ok"] and "no backend 'no_such_kernel'" in missing["reason"]


def _fake_children(tmp_path, fail: str):
    """A ``_run_child`` standing in for the prepare, bandwidth and measure children of a CUDA machine."""
    weights = {"total_bytes": 4 << 20, "quantized_linears": 15, "quantized_linear_bytes": 1 << 20,
               "quantized_linear_bf16_bytes": 4 << 20, "decode_step_bytes_stored": 2 << 20,
               "decode_step_bytes_bf16": 5 << 20, "files_bytes": 4 << 20}
    calls = []

    def run_child(task, job, workdir, name, threads, timeout, module="qvlm_offline.tools.bench", device="cpu"):
        calls.append((task, name, threads, device, job))
        log = workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        if task == "prepare":
            assert job["device"] == "cuda" and job["kernels"] == list(B.default_kernels("cuda"))
            models = {"bf16": {"path": "src", "weights": weights}}
            for s in job["schemes"]:
                cands = [(k, "int4 x int8: no vLLM kernel" if (s, k) == ("w4a8", "vllm_mp") else None)
                         for k in B.kernel_candidates(s, job["kernels"])]
                models[s] = {"path": s, "weights": weights,
                             "kernel_probe": _probe([cands[-1][0]], *cands)}  # the dispatcher picks Triton
            return {"models": models, "timings": {}}
        if task == "bandwidth":
            assert job["device"] == "cuda"
            return {"copy_GBps": 4000.0, "read_GBps": 4200.0, "array_mib": job["array_mib"], "repeats": 20,
                    "device": "cuda", "gpu": {"name": "NVIDIA H200", "compute_capability": "9.0",
                                              "total_memory_bytes": 141 << 30, "driver": "570.1",
                                              "driver_cuda": "12.8", "cuda_runtime": "12.8",
                                              "versions": {"vllm": "0.32.0", "torch": "2.13.0"}}}
        assert job["device"] == "cuda" and job["batch_sizes"] == [1, 8, 32, 128]
        assert job["kv_cache_memory_bytes"] == 2 << 30 and job["gpu_memory_utilization"] == 0.5
        if name == f"measure-{fail}":
            log.write_text("loading...\nRuntimeError: CUDA error: no kernel image is available\n")
            raise RuntimeError(f"child {name!r} failed (exit 1)")
        kernel = job["force_kernel"] or "bf16"
        detail = " [vLLM MacheteLinearKernel]" if kernel == "vllm_mp" else ""
        log.write_text(f"INFO Model loading took 3.1 GiB memory and 2.0 seconds\n"
                       f"qvlm: {job['scheme']} layers run on the {kernel} kernel{detail} (first: language_model."
                       f"model.layers.0.self_attn.qkv_proj, K=4096 N=12288); passed over: *: QVLM_KERNEL={kernel}\n")
        speed = 1.0 if job["scheme"] is None else 3.0
        return {"log": str(log), "import_s": 1.0, "load_s": 2.0, "ttft_s": 0.05, "ttft_runs_s": [0.05],
                "ttft_prompt_tokens": 600, "kernel": kernel, "kernel_source": "select_backend", "torch_threads": 16,
                "peak_rss_bytes": 1 << 30,
                "gpu_memory": {"peak_allocated_bytes": 20 << 30, "peak_reserved_bytes": 21 << 30,
                               "device_used_bytes": 120 << 30, "device_total_bytes": 141 << 30,
                               "kv_cache_tokens": 500000, "kv_cache_tokens_needed_max_batch": 128 * 50,
                               "kv_cache_fits_max_batch": True},
                "decode": {str(b): {"batch": b, "decode_tokens": 32, "prompt_tokens": 16, "step_s": 0.002 / speed,
                                    "tokens_per_s": b * 500.0 * speed} for b in job["batch_sizes"]}}

    return run_child, calls


def test_cuda_bench_json_and_table(tmp_path, monkeypatch):
    """The whole CUDA orchestration on fake children: the rows, the skipped and failed ones, the JSON fields."""
    run_child, calls = _fake_children(tmp_path, fail="w8a8@vllm_scaled_mm")
    monkeypatch.setattr(B, "_run_child", run_child)
    json_path = tmp_path / "out" / "bench.json"
    result = B.run_bench(tmp_path / "work", device="cuda", json_path=json_path, png_path=tmp_path / "out" / "b.png",
                         verbose=False, kv_cache_gib=2, gpu_memory_utilization=0.5)
    on_disk = json.loads(json_path.read_text())
    assert on_disk["configs"] == json.loads(json.dumps(result["configs"]))
    assert all(c[2] is None and c[3] == "cuda" for c in calls)  # no thread count, CUDA environment
    settings, machine = on_disk["settings"], on_disk["machine"]
    assert settings["device"] == "cuda" and settings["batch_sizes"] == [1, 8, 32, 128]
    assert settings["gpu_memory_utilization"] == 0.5 and settings["kv_cache_gib"] == 2 and settings["cuda_graphs"] is True
    assert settings["compilation_config"]["cudagraph_mode"] == "FULL_DECODE_ONLY" and "CUDA graphs" in settings["engine"]
    assert machine["device"] == "cuda" and machine["threads"] is None
    assert machine["gpu"]["name"] == "NVIDIA H200" and machine["gpu"]["driver"] == "570.1"
    assert machine["gpu"]["cuda_runtime"] == "12.8" and "gpu" not in machine["bandwidth"]

    by = {c["name"]: c for c in on_disk["configs"]}
    assert list(by) == ["bf16", "w4a16@vllm_mp", "w4a16@triton_w4a16", "w8a8@vllm_scaled_mm", "w8a8@triton_w8a8",
                        "w4a8@vllm_mp", "w4a8@triton_w4a8"]
    assert by["w4a8@vllm_mp"]["status"] == "skipped" and by["w4a8@vllm_mp"]["reason"] == "int4 x int8: no vLLM kernel"
    failed = by["w8a8@vllm_scaled_mm"]
    assert failed["status"] == "failed" and "no kernel image is available" in failed["reason"]
    assert "no kernel image" in failed["log_tail"] and failed["log"].endswith("measure-w8a8@vllm_scaled_mm.log")
    ok = by["w4a16@vllm_mp"]
    assert ok["status"] == "ok" and ok["kernel"] == "vllm_mp" and ok["kernel_source"] == "log"
    assert ok["kernel_detail"] == "vLLM MacheteLinearKernel" and by["w4a8@triton_w4a8"]["kernel_detail"] is None
    assert ok["forced_kernel"] == "vllm_mp" and not ok["dispatch_default"]
    assert by["w4a16@triton_w4a16"]["dispatch_default"]
    assert ok["gpu_memory"]["peak_allocated_bytes"] == 20 << 30 and ok["gpu_memory"]["model_load_gib_vllm"] == 3.1
    assert ok["decode"]["128"]["speedup_vs_bf16"] == pytest.approx(3.0) and ok["ttft_vs_bf16"] == pytest.approx(1.0)
    assert ok["decode"]["1"]["bandwidth_fraction"] == pytest.approx(1500 * (2 << 20) / 4000e9)
    assert set(on_disk["kernel_probes"]) == {"w4a16", "w8a8", "w4a8"}
    assert not (tmp_path / "out" / "bench.partial.json").exists()  # written after each row, gone at the end

    table = B.format_table(on_disk)
    assert "NVIDIA H200" in table and "GPU peak GiB" in table and "tok/s b128" in table
    assert "SKIPPED" in table and "FAILED" in table and "w4a8@vllm_mp skipped: int4 x int8" in table
    assert "triton_w4a16 (default)" in table and "vllm_mp [vLLM MacheteLinearKernel]" in table
    assert "Decode speed-up over bf16" in table
    if on_disk["png"]:
        assert Path(on_disk["png"]).stat().st_size > 0


def test_cpu_bench_still_raises_on_a_failed_child(tmp_path, monkeypatch):
    """On CPU a failing child stops the run, as before (only CUDA rows turn failures into rows)."""
    def run_child(task, job, workdir, name, threads, timeout, module="qvlm_offline.tools.bench", device="cpu"):
        assert device == "cpu" and threads >= 1
        raise RuntimeError("child failed")

    monkeypatch.setattr(B, "_run_child", run_child)
    with pytest.raises(RuntimeError, match="child failed"):
        B.run_bench(tmp_path, device="cpu", verbose=False)


def test_kernel_lines():
    msgs = ["qvlm: w4a16 layers run on the vllm_mp kernel [vLLM MarlinLinearKernel] (first: a, K=64 N=64); "
            "passed over: triton_w4a16: x",
            "qvlm: w4a16 layers run on the triton_w4a16 kernel (first: b, K=64 N=32)",
            "qvlm: w4a8 layers run on the triton_w4a8 kernel",
            "qvlm: w4a16 layers run on the cpu_wna16 kernel"]
    assert B.kernel_lines(msgs, "w4a16") == {"vllm_mp": "vLLM MarlinLinearKernel", "triton_w4a16": None,
                                             "cpu_wna16": None}
    assert B._kernel_from_logs(msgs, "w4a8") == ["triton_w4a8"]
