"""``qvlm bench``: the subcommand wiring for :mod:`qvlm_offline.tools.bench` (imports nothing heavy)."""

from __future__ import annotations

import argparse


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_kwargs, run_bench

    run_bench(args.workdir, **bench_kwargs(args))
    return 0


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` to a ``build_parser()`` subparsers object; returns the new parser."""
    from .bench import add_bench_args

    b = subparsers.add_parser(
        "bench", help="decode tokens/s, TTFT and weight bytes of bf16 vs qvlm schemes in vLLM (7B widths)",
        description="Builds a random-weight LLaVA of LLaVA-1.5-7B widths with fewer layers (stated in the "
        "output), quantizes it to each scheme, and measures each configuration in its own vLLM child process: "
        "decode tokens/s per batch size, time to first token with one image, checkpoint weight bytes, the "
        "kernel each scheme runs on, and the fraction of the machine's memory bandwidth a decode step uses. "
        "On an NVIDIA GPU (--device cuda, or auto where torch sees one) it measures batches 1,8,32,128 and each "
        "scheme on each CUDA kernel meant for it (SCHEME@KERNEL rows: vllm_mp, vllm_scaled_mm, triton_*), a "
        "kernel that cannot run a scheme there giving a skipped or failed row with the reason. "
        "Prints a table, writes JSON, saves a PNG bar chart if matplotlib is importable.",
    )
    add_bench_args(b)
    b.set_defaults(func=cmd_bench)
    return b
