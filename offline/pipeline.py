"""The quantize pipeline as one library call: calibration -> capture -> entropy -> partition
-> search -> pack -> write.

:func:`quantize` is what ``qvlm quantize``, ``qvlm demo`` and the tests run. It reads the
checkpoint's adapter (:mod:`qvlm_offline.adapters`: which family, which layout), refuses
what the chosen output format cannot express before any calibration, runs the method
(``rtn``: no data; ``gptq``: GPTQ layer by layer on the streamed checkpoint; ``qvlm``: the
Q-VLM search, also streamed), and writes the output directory atomically in the qvlm or
the compressed-tensors format.

What it does not do: parse command lines (:mod:`qvlm_offline.cli`) or hold the float model
in memory (every calibrated method streams one decoder layer or block at a time).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .export import (
    ExportReport,
    _fixed_mmap_threshold,
    build_quant_config,
    check_output_dir,
    export_checkpoint,
    read_source,
)
from .report import peak_rss_gib
from .spill import SpilledTensors

METHODS = ("rtn", "gptq", "qvlm")
FORMATS = ("qvlm", "compressed-tensors")


@dataclass
class QuantizeOptions:
    """Everything ``qvlm quantize`` can be told (its ``--help`` explains each)."""

    scheme: str
    method: str = "rtn"
    group_size: int | None = None
    symmetric: bool = True
    format: str = "qvlm"
    scale_dtype: str = "float16"  # compressed-tensors only
    quantize_vision: bool = False
    quantize_lm_head: bool = False
    calib: str = "easyvqa"
    num_samples: int = 128
    seed: int = 0
    device: str = "auto"  # gptq/qvlm: cpu, cuda, cuda:N, auto (CUDA when available)
    search_dtype: str = "float32"  # gptq/qvlm: float32, bfloat16 (autocast), auto (bf16 where native)
    activation_dtype: str = "auto"  # gptq/qvlm: the activation store's dtype; auto = the search dtype
    search: dict = field(default_factory=dict)  # SearchConfig fields (method qvlm)
    max_shard_size: str | int = "2GB"
    overwrite: bool = False
    progress: bool = True


@dataclass
class QuantizeResult:
    export: ExportReport
    report: dict  # method, scheme, search report (qvlm), seconds


def _calibration_inputs(src: Path, opts: QuantizeOptions) -> list[dict]:
    from transformers import AutoProcessor

    from .calibration import build_model_inputs, load_calibration

    processor = AutoProcessor.from_pretrained(src)
    samples = load_calibration(opts.calib, opts.num_samples, opts.seed, processor=processor)  # its chat template
    return build_model_inputs(samples, processor)


def _placement(config: dict, table: dict, adapter, inputs: list[dict], opts: QuantizeOptions):
    """The run's device/precision/activation store, from the sizes this run will hold
    (:func:`~qvlm_offline.placement.memory_estimate`: the block on the device, the stored
    activations). ``config, table, adapter``: what :func:`~qvlm_offline.export.read_source` read."""
    import torch

    from .placement import choose_placement, layer_shape, memory_estimate, skeleton_params

    text = config.get("text_config") or config
    capture, head = skeleton_params(table, adapter)
    est = memory_estimate(opts.method, layer_shape(table, adapter), hidden=int(text["hidden_size"]),
                          tokens=sum(int(inp["input_ids"].shape[-1]) for inp in inputs), store_dtype=torch.float32,
                          capture_params=capture, head_params=head,
                          block_layers=int(opts.search.get("max_block_layers", 2)))
    return choose_placement(opts.device, opts.search_dtype, activation_dtype=opts.activation_dtype,
                            reserve=est["block_bytes"] + est["skeleton_bytes"], activation_need=est["activation_bytes"])


def _quantize_fn(tensors: dict, replaced: dict):
    """Export's quantize_fn: the method's stored tensors, RTN for what it did not solve."""
    from .rtn import quantize_rtn

    def quantize_fn(weight, spec, name):
        module = name.removesuffix(".weight")
        if module in tensors:
            return tensors[module]
        return quantize_rtn(replaced.get(name, weight), spec, name)

    return quantize_fn


def quantize(src: str | Path, out: str | Path, options: QuantizeOptions) -> QuantizeResult:
    """Quantize the checkpoint ``src`` into ``out`` (appears only when everything succeeded)."""
    t_start = time.perf_counter()
    src, out, opts = Path(src), Path(out), options
    if opts.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {opts.method!r}")
    if opts.format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {opts.format!r}")
    config, table, adapter = read_source(src)
    if not adapter.family.verified:
        warnings.warn(f"{src}: {adapter.family.name} ({adapter.family.model_class}) has an adapter but is not yet "
                      "verified end to end by this version's tests; check the output with `qvlm compare`",
                      stacklevel=2)
    qcfg = build_quant_config(opts.scheme, opts.group_size, opts.symmetric, opts.quantize_vision,
                              opts.quantize_lm_head, producer={}, adapter=adapter)
    export = export_checkpoint
    if opts.format == "compressed-tensors":  # refuse what it cannot express before calibrating
        from .compressed_tensors import export_compressed_tensors, preflight_export

        check_output_dir(src, out, opts.overwrite)
        preflight_export(src, opts.scheme, opts.group_size, opts.symmetric, opts.quantize_vision,
                         opts.quantize_lm_head)
        export = functools.partial(export_compressed_tensors, scale_dtype=opts.scale_dtype)
    else:
        check_output_dir(src, out, opts.overwrite)

    quantize_fn, replaced, report = None, None, {"method": opts.method}
    peaks = {}  # this process's peak RSS (GiB) after each phase: where the peak was reached
    _fixed_mmap_threshold()  # freed per-layer buffers go back to the OS (7B, 2 layers: peak 2.65 -> 2.33 GiB)
    with contextlib.ExitStack() as scratch:
        if opts.method != "rtn":
            inputs = _calibration_inputs(src, opts)
            peaks["calibration"] = peak_rss_gib()
            placement = _placement(config, table, adapter, inputs, opts)
            if opts.progress:
                print(f"{opts.method}: {placement}", file=sys.stderr)
            # finished layers wait on disk beside the output, not in memory, until the export
            store = scratch.enter_context(SpilledTensors(out.resolve().parent))
            if opts.method == "qvlm":
                from .qvlm import SearchConfig, qvlm_search

                result = qvlm_search(src, inputs, qcfg.layer_spec, SearchConfig(**opts.search),
                                     progress=opts.progress, placement=placement, store=store)
            else:
                from .gptq_streaming import gptq_sequential

                result = gptq_sequential(src, inputs, qcfg.layer_spec, progress=opts.progress, placement=placement,
                                         store=store)
            del inputs
            quantize_fn, replaced, report = _quantize_fn(result.tensors, result.replaced), result.replaced, result.report
            peaks |= report.pop("peak_rss_gib_after", {})
            if placement.device.type == "cuda":
                import torch

                report = report | {"peak_device_bytes": torch.cuda.max_memory_allocated(placement.device)}
        written = export(
            src, out, scheme=opts.scheme, group_size=opts.group_size, symmetric=opts.symmetric,
            quantize_vision=opts.quantize_vision, quantize_lm_head=opts.quantize_lm_head, method=opts.method,
            quantize_fn=quantize_fn, replace_tensors=replaced, max_shard_size=opts.max_shard_size,
            overwrite=opts.overwrite, progress=opts.progress,
        )
    peaks["export"] = peak_rss_gib()
    report = dict(report) | {"scheme": opts.scheme, "family": adapter.family.name, "layout": adapter.layout.name,
                             "peak_rss_gib_after": peaks,
                             "seconds_total": time.perf_counter() - t_start, "num_quantized": len(written.quantized)}
    return QuantizeResult(written, report)
