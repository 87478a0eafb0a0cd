"""``qvlm demo``: build a small LLaVA, quantize it, and generate with vLLM — no downloads.

Shows the whole product path on any machine: a llava-hf checkpoint written
locally, ``qvlm quantize`` (RTN), and ``vllm.LLM`` with ``quantization="qvlm"``
answering image+text prompts next to the unquantized model. The weights are
random, so the answers are not meaningful English; what the demo shows is that
the quantized model loads, runs with images, and tracks the original model.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def vllm_engine_kwargs() -> dict:
    """Settings that keep a small model cheap on a CPU machine.

    The in-process engine (no engine-core process) loads a small model in seconds
    instead of a minute of process start-up and imports.
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return dict(enforce_eager=True, max_model_len=512, max_num_seqs=8, seed=0, limit_mm_per_prompt={"image": 1},
                distributed_executor_backend="uni")


def generate(model_dir: Path, prompts, max_tokens: int = 12, quantization: str | None = None):
    """Greedy generation with vLLM; returns (texts, token ids, seconds)."""
    from vllm import LLM, SamplingParams

    from .tiny_llava import llava_prompt

    llm = LLM(model=str(model_dir), quantization=quantization, dtype="bfloat16", **vllm_engine_kwargs())
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    inputs = [{"prompt": llava_prompt(q), "multi_modal_data": {"image": img}} for img, q in prompts]
    t0 = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    del llm
    return [o.outputs[0].text for o in outs], [list(o.outputs[0].token_ids) for o in outs], dt


def run_demo(workdir: Path, scheme: str = "w4a16", quantize_vision: bool = False, n_prompts: int = 4) -> int:
    from .export import export_checkpoint
    from .tiny_llava import build_tiny_llava, tiny_prompts

    workdir = Path(workdir)
    src, out = workdir / "tiny-llava", workdir / f"tiny-llava-{scheme}"
    if not (src / "config.json").exists():
        print(f"[1/3] building a small LLaVA (CLIP tower + Llama decoder) in {src}")
        build_tiny_llava(src)
    print(f"[2/3] quantizing to {scheme} -> {out}")
    rep = export_checkpoint(src, out, scheme=scheme, quantize_vision=quantize_vision, overwrite=True)
    print(f"      {len(rep.quantized)} linear layers, {rep.bytes_in / 2**20:.1f} MiB -> {rep.bytes_out / 2**20:.1f} MiB")

    prompts = tiny_prompts(n_prompts)
    print("[3/3] generating with vLLM (bf16 model, then the qvlm model)")
    ref_texts, ref_ids, ref_s = generate(src, prompts)
    q_texts, q_ids, q_s = generate(out, prompts, quantization="qvlm")
    agree = sum(a == b for r, q in zip(ref_ids, q_ids) for a, b in zip(r, q))
    total = sum(min(len(r), len(q)) for r, q in zip(ref_ids, q_ids))
    for (_, question), r, q in zip(prompts, ref_texts, q_texts):
        print(f"\nQ: {question}\n  bf16 : {r!r}\n  {scheme}: {q!r}")
    print(
        f"\ngreedy tokens identical to bf16: {agree}/{total}; generate time bf16 {ref_s:.2f}s, {scheme} {q_s:.2f}s"
    )
    return 0
