"""``qvlm search-cost``: what rtn, gptq and the Q-VLM search cost at LLaVA-1.5 widths, per layer.

What it measures, in one run (:func:`run_search_cost`):

1. Writes random-weight LLaVA-1.5 checkpoints of **7B or 13B widths** (Llama decoder
   4096/11008 or 5120/13824; CLIP-L/14-336 tower: 576 image tokens per sample; the tiny
   word-level tokenizer and a CLIP processor) with **N decoder layers instead of 32/40**
   (:func:`qvlm_offline.testmodels.synthetic.write_random_llava`, shard by shard).
2. Runs ``qvlm quantize --method M`` on each depth, for each method and calibration size,
   in its own child process (easy-VQA calibration samples, the given ``--device`` and
   ``--search-dtype``), and records the child's wall time, CPU time (user + system) and
   peak RSS (``os.wait4``: that child alone), the pipeline's report (per-block seconds,
   the search steps' share), and on CUDA the peak device memory.
3. Per method and calibration size: cost per decoder layer = the slope between the
   shallowest and deepest run, fixed cost = the intercept, **extrapolated** to the full
   depth (32 / 40 layers: stated as an extrapolation), and for qvlm also to the default
   150 steps when the run used fewer (from the measured time per step). Memory: peak RSS
   per depth next to the formula skeleton + one block + activations per sample
   (:func:`memory_formula`).

Writes ``search_cost.json`` and a PNG (time per layer vs layers; peak RSS vs layers) in the
work directory. The machine (CPU model, ISA flags, threads, torch) is recorded.

What it does not measure: quality (random weights; see ``qvlm compare`` on smol-llava).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from .child import run_measured

WIDTHS_HELP = "7b (4096/11008, 32 heads), 13b (5120/13824, 40 heads) or tiny (a smoke test)"


def _machine(threads: int | None, device: str) -> dict:
    import torch

    from .bench import _cpu_features, _cpu_name, _usable_cpus

    out = {"cpu_model": _cpu_name(), "cpu_features": _cpu_features(), "usable_cpus": _usable_cpus(),
           "threads": threads or _usable_cpus(), "python": platform.python_version(), "torch": torch.__version__}
    if device != "cpu" and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def _quantize_child(src: Path, out: Path, method: str, samples: int, args, env) -> dict:
    report_dir = out.with_name(out.name + "-report")
    cmd = ["-m", "qvlm_offline.cli", "quantize", str(src), str(out), "--scheme", args.scheme,
           "--method", method, "--calib", "easyvqa", "--num-samples", str(samples), "--seed", "0",
           "--device", args.device, "--search-dtype", args.search_dtype,
           "--activation-dtype", getattr(args, "activation_dtype", "auto"), "--max-shard-size", "512MB",
           "--overwrite", "--quiet", "--report", str(report_dir)]
    if method == "qvlm":
        cmd += ["--iters", str(args.iters), "--max-block-layers", str(args.max_block_layers)]
    t0 = time.perf_counter()
    rc, out_text, usage = run_measured(cmd, env)
    wall = time.perf_counter() - t0
    row = {"method": method, "samples": samples, "rc": rc, "wall_s": wall,
           "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_bytes": usage.ru_maxrss * 1024}
    if rc:
        row["error"] = out_text[-2000:]
        return row
    rep = json.loads((report_dir / "report.json").read_text())
    row |= {"seconds_pipeline": rep.get("seconds_total"), "placement": rep.get("placement"),
            "tokens": rep.get("tokens"), "peak_device_bytes": rep.get("peak_device_bytes")}
    if method == "qvlm":
        blocks = rep.get("blocks", [])
        row |= {"seconds_blocks": sum(b["seconds"] for b in blocks),
                "seconds_steps": sum(b.get("seconds_steps", 0.0) for b in blocks),
                "profile_seconds": rep.get("profile_seconds"), "num_blocks": len(blocks),
                "iters": args.iters}
    shutil.rmtree(out, ignore_errors=True)
    return row


def memory_formula(src: str | Path, tokens: int, method: str, block_layers: int, activation_dtype: str) -> dict:
    """Predicted peak bytes of ``method`` on the checkpoint ``src`` (without the import
    baseline): :func:`qvlm_offline.placement.memory_estimate`, the account the pipeline places
    its activations by, on the shapes read from ``src``'s tensor table."""
    import torch

    from qvlm_kernels.checkpoint import read_config, tensor_table

    from ..adapters import adapter_for
    from ..placement import layer_shape, memory_estimate, skeleton_params

    table, config = tensor_table(src), read_config(src)
    adapter = adapter_for(src, config=config, tensor_names=table)
    capture, head = skeleton_params(table, adapter)
    text = config.get("text_config") or config
    store = torch.bfloat16 if activation_dtype == "bfloat16" else torch.float32
    return memory_estimate(method, layer_shape(table, adapter), tokens=tokens, hidden=int(text["hidden_size"]),
                           store_dtype=store, capture_params=capture, head_params=head, block_layers=block_layers)


def step_seconds(widths: str, tokens: int = 600, dtypes=("float32", "bfloat16"), repeats: int = 2,
                 samples: int = 4) -> dict:
    """Seconds of one search step (the soft weights built once, forward + backward of ``samples``
    samples of ``tokens`` tokens, as ``SearchConfig.batch_samples``) through one decoder layer, per
    search dtype that this machine runs natively (best of ``repeats``): with eager soft weights,
    and compiled where the search compiles them (``SearchConfig.compile="auto"``)."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from qvlm_kernels.format import LayerSpec, get_scheme

    from ..adapters import LLAMA_STYLE_LAYER
    from ..placement import Placement, resolve_search_dtype
    from ..qvlm import Block, SearchConfig, SearchLinear, _rel_err, _set, weights_once
    from ..rtn import quantize_rtn
    from ..sequential import LayerInputs
    from ..testmodels.synthetic import WIDTHS

    hidden, inter, heads = WIDTHS[widths]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=heads, num_hidden_layers=1)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(cfg, 0).eval().requires_grad_(False)
    w4 = get_scheme("w4a16")
    spec = LayerSpec("w4a16", w4.weight_bits, 128, True, w4.act_bits, w4.act_mode)
    slins, auto = [], SearchConfig()
    for name in LLAMA_STYLE_LAYER.linears:
        lin = layer.get_submodule(name)
        torch.nn.init.normal_(lin.weight, std=0.02)
        sl = SearchLinear(lin, spec, *quantize_rtn(lin.weight, spec, name), None, compile=auto.compiles(lin))
        _set(layer, name, sl)
        slins.append(sl)
    modes = {"seconds": False} | ({"seconds_compiled": True} if any(s.compiled for s in slins) else {})
    x = torch.randn(1, tokens, hidden)
    pos = LlamaRotaryEmbedding(cfg)(x, torch.arange(tokens).unsqueeze(0))
    sample = LayerInputs(x, {"position_embeddings": pos, "attention_mask": None, "use_cache": False})
    target = [torch.randn(1, tokens, hidden)]
    out = {}
    for name in dtypes:
        try:
            dtype = resolve_search_dtype(name, torch.device("cpu"))
        except ValueError as e:
            out[name] = {"skipped": str(e)}
            continue
        block = Block([layer], LLAMA_STYLE_LAYER.linears, Placement(torch.device("cpu"), dtype))
        out[name] = {}
        for key, compiled in modes.items():
            for s in slins:
                s.hard, s.compiled = False, compiled
            times = []
            for _ in range(repeats + compiled):  # a compiled run's first step compiles: not timed
                t0 = time.perf_counter()
                with weights_once(slins, True, block.dtype):
                    with block.autocast():
                        loss = sum(_rel_err(block.outputs(sample)[-1], target[0]) for _ in range(samples))
                    loss.backward()
                times.append(time.perf_counter() - t0)
            out[name][key] = min(times[1:] if compiled else times)
    if "seconds" in out.get("bfloat16", {}) and "seconds" in out.get("float32", {}):
        out["bf16_speedup"] = out["float32"]["seconds"] / out["bfloat16"]["seconds"]
    return {"widths": widths, "tokens": tokens, "samples": samples, **out}


def run_search_cost(workdir: str | Path, args) -> dict:
    from ..testmodels.synthetic import CLIP_L_DEPTH, FULL_DEPTH, TOWERS, WIDTHS, write_random_llava

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    hidden, inter, heads = WIDTHS[args.widths]
    baseline = run_measured(["-c", "import torch, transformers, qvlm_offline.pipeline"], env)[2].ru_maxrss * 1024
    rows = []
    for layers in args.layers:
        src = work / f"llava-{args.widths}-L{layers}"
        if not (src / "config.json").exists():
            print(f"writing {src} ({layers} decoder layers, {args.vision_layers} CLIP layers)", flush=True)
            write_random_llava(src, hidden=hidden, intermediate=inter, heads=heads, layers=layers,
                               vision_layers=args.vision_layers, vision=TOWERS[args.widths], processor=True)
        size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        for method in args.methods:
            for samples in (args.samples if method != "rtn" else args.samples[:1]):
                print(f"L{layers} {method} {samples} samples ...", flush=True)
                row = _quantize_child(src, work / f"out-L{layers}-{method}-{samples}", method, samples, args, env)
                row |= {"layers": layers, "checkpoint_bytes": size}
                if row["rc"] == 0 and row.get("tokens"):
                    store = args.activation_dtype if args.activation_dtype != "auto" else args.search_dtype
                    row["formula"] = memory_formula(src, row["tokens"], method, args.max_block_layers, store)
                    row["formula"]["predicted_peak_bytes"] += baseline
                print(f"  wall {row['wall_s']:.0f} s, cpu {row['cpu_s']:.0f} s, peak RSS "
                      f"{row['peak_rss_bytes'] / 2**30:.2f} GiB" + (f", FAILED rc={row['rc']}" if row["rc"] else ""),
                      flush=True)
                rows.append(row)
    summary = _summarize(rows, FULL_DEPTH[args.widths], args.iters)
    step = step_seconds(args.widths) if args.device in ("cpu", "auto") and not _cuda() else None
    result = {"machine": _machine(args.threads, args.device), "widths": args.widths, "vision_layers": args.vision_layers,
              "full_depth": FULL_DEPTH[args.widths], "full_vision_depth": CLIP_L_DEPTH, "scheme": args.scheme,
              "device": args.device, "search_dtype": args.search_dtype,
              "activation_dtype": getattr(args, "activation_dtype", "auto"), "iters": args.iters,
              "max_block_layers": args.max_block_layers, "import_baseline_rss_bytes": baseline,
              "runs": rows, "summary": summary, "step_seconds_one_layer": step,
              "command": "qvlm search-cost " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["search-cost"] else sys.argv[1:])}
    (work / "search_cost.json").write_text(json.dumps(result, indent=2))
    _plot(result, work / "search_cost.png")
    _print_summary(result)
    return result


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _summarize(rows: list[dict], full_depth: int, iters: int, default_iters: int = 150) -> list[dict]:
    out = []
    keys = sorted({(r["method"], r["samples"]) for r in rows if r["rc"] == 0})
    for method, samples in keys:
        rs = sorted((r for r in rows if r["method"] == method and r["samples"] == samples and r["rc"] == 0),
                    key=lambda r: r["layers"])
        s = {"method": method, "samples": samples,
             "peak_rss_bytes": {r["layers"]: r["peak_rss_bytes"] for r in rs}}
        if len(rs) >= 2:
            a, b = rs[0], rs[-1]
            dl = b["layers"] - a["layers"]
            per_layer = (b["wall_s"] - a["wall_s"]) / dl
            fixed = a["wall_s"] - per_layer * a["layers"]
            s |= {"seconds_per_layer": per_layer, "cpu_seconds_per_layer": (b["cpu_s"] - a["cpu_s"]) / dl,
                  "fixed_seconds": fixed, "extrapolated_full_depth_s": fixed + per_layer * full_depth,
                  "rss_growth": b["peak_rss_bytes"] / a["peak_rss_bytes"] - 1}
            if method == "qvlm" and iters and iters != default_iters:
                step_per_layer = (b["seconds_steps"] - a["seconds_steps"]) / dl / iters
                at_default = per_layer + step_per_layer * (default_iters - iters)
                s |= {"step_seconds_per_layer": step_per_layer, f"seconds_per_layer_at_{default_iters}_steps": at_default,
                      f"extrapolated_full_depth_s_at_{default_iters}_steps": fixed + at_default * full_depth}
        out.append(s)
    gptq = {s["samples"]: s for s in out if s["method"] == "gptq"}
    for s in out:
        g = gptq.get(s["samples"])
        if s["method"] == "qvlm" and g and g.get("seconds_per_layer"):
            s["per_layer_vs_gptq"] = s["seconds_per_layer"] / g["seconds_per_layer"]
            if "seconds_per_layer_at_150_steps" in s:
                s["per_layer_vs_gptq_at_150_steps"] = s["seconds_per_layer_at_150_steps"] / g["seconds_per_layer"]
    return out


def _print_summary(result: dict) -> None:
    print(f"\nsearch cost at LLaVA-1.5-{result['widths']} widths on {result['machine'].get('cpu_model')} "
          f"({result['machine']['threads']} threads), {result['scheme']}, device {result['device']}, "
          f"search dtype {result['search_dtype']}; full depth {result['full_depth']} layers is EXTRAPOLATED")
    print("| run | layers | samples | wall s | CPU s | peak RSS GiB | predicted GiB | checkpoint GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["runs"]:
        pred = r.get("formula", {}).get("predicted_peak_bytes")
        print(f"| {r['method']} | {r['layers']} | {r['samples']} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | "
              f"{r['peak_rss_bytes'] / 2**30:.2f} | {pred / 2**30 if pred else float('nan'):.2f} | "
              f"{r['checkpoint_bytes'] / 2**30:.2f} |")
    step = result.get("step_seconds_one_layer")
    if step:
        print(f"one search step, one layer, {step['samples']} samples of {step['tokens']} tokens: "
              + ", ".join(f"{k} {v['seconds']:.2f} s" + (f" ({v['seconds_compiled']:.2f} s compiled)"
                                                        if "seconds_compiled" in v else "")
                          for k, v in step.items() if isinstance(v, dict) and "seconds" in v)
              + (f" (bf16 {step['bf16_speedup']:.2f}x faster)" if "bf16_speedup" in step else ""))
    for s in result["summary"]:
        if "seconds_per_layer" not in s:
            continue
        line = (f"{s['method']} ({s['samples']} samples): {s['seconds_per_layer']:.0f} s/layer, fixed "
                f"{s['fixed_seconds']:.0f} s, {result['full_depth']} layers ~ {s['extrapolated_full_depth_s'] / 3600:.2f} h; "
                f"peak RSS +{100 * s['rss_growth']:.0f}% from fewest to most layers")
        if "seconds_per_layer_at_150_steps" in s:
            line += (f"; at 150 steps {s['seconds_per_layer_at_150_steps']:.0f} s/layer, "
                     f"{s['extrapolated_full_depth_s_at_150_steps'] / 3600:.1f} h")
        if "per_layer_vs_gptq" in s:
            line += f"; {s['per_layer_vs_gptq']:.1f}x gptq per layer"
            if "per_layer_vs_gptq_at_150_steps" in s:
                line += f" ({s['per_layer_vs_gptq_at_150_steps']:.1f}x at 150 steps)"
        print(line)


def _plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in sorted({(r["method"], r["samples"]) for r in result["runs"] if r["rc"] == 0}):
        rs = sorted((r for r in result["runs"] if (r["method"], r["samples"]) == key and r["rc"] == 0),
                    key=lambda r: r["layers"])
        xs = [r["layers"] for r in rs]
        ax1.plot(xs, [r["wall_s"] / r["layers"] for r in rs], "o-", label=f"{key[0]} ({key[1]} samples)")
        ax2.plot(xs, [r["peak_rss_bytes"] / 2**30 for r in rs], "o-", label=f"{key[0]} ({key[1]} samples)")
    ax1.set(xlabel="decoder layers", ylabel="wall seconds per layer", title="cost per layer")
    ax2.set(xlabel="decoder layers", ylabel="peak RSS (GiB)", title="memory")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.suptitle(f"LLaVA-1.5-{result['widths']} widths, {result['search_dtype']} search, "
                 f"{result['machine']['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_search_cost_args(p: argparse.ArgumentParser) -> None:
    from ..placement import ACTIVATION_DTYPES, DEVICES_HELP, SEARCH_DTYPES

    p.add_argument("--workdir", type=Path, default=Path("qvlm-search-cost"),
                   help="checkpoints, outputs and search_cost.json/png go here (default: ./qvlm-search-cost)")
    p.add_argument("--widths", choices=["7b", "13b", "tiny"], default="7b", help=f"model widths: {WIDTHS_HELP} (default: 7b)")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 8],
                   help="decoder-layer depths to build and run; per-layer cost is the slope between the "
                   "shallowest and the deepest (default: 2 8)")
    p.add_argument("--vision-layers", type=int, default=2,
                   help="CLIP-L/336 layers (24 in the real tower; the capture's cost and memory scale with it) "
                   "(default: 2)")
    p.add_argument("--methods", nargs="+", choices=["rtn", "gptq", "qvlm"], default=["rtn", "gptq", "qvlm"],
                   help="methods to run (default: all three)")
    p.add_argument("--samples", type=int, nargs="+", default=[32, 128],
                   help="calibration set sizes (easy-VQA, one image each) (default: 32 128)")
    p.add_argument("--scheme", default="w4a16", help="scheme (default: w4a16)")
    p.add_argument("--iters", type=int, default=150,
                   help="qvlm steps per block; with fewer than 150 the summary also extrapolates to 150 from the "
                   "measured time per step (default: 150)")
    p.add_argument("--max-block-layers", type=int, default=2, help="qvlm block size bound (default: 2)")
    p.add_argument("--device", default="auto", help=f"{DEVICES_HELP} (default: auto)")
    p.add_argument("--search-dtype", default="float32", choices=SEARCH_DTYPES, help="(default: float32)")
    p.add_argument("--activation-dtype", default="auto", choices=ACTIVATION_DTYPES,
                   help="the calibration activations' storage: auto = the search dtype; bfloat16 halves them "
                   "(default: auto)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run (default: all CPUs)")


def add_search_cost_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "search-cost", help="time and memory of rtn/gptq/qvlm per decoder layer at LLaVA-1.5-7B/13B widths",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_search_cost_args(p)
    p.set_defaults(func=cmd_search_cost)
    return p


def cmd_search_cost(args: argparse.Namespace) -> int:
    run_search_cost(args.workdir, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_search_cost_args(ap)
    args = ap.parse_args(argv)
    run_search_cost(args.workdir, args)
    return 0
