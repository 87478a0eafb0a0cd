"""``qvlm compare``: how far quantized models are from their float model, measured in vLLM.

For easy-VQA **test** questions (image + question, the model's chat template), the float
model answers greedily first. Then every model — the float one included, each in its own
vLLM process with ``quantization="qvlm"`` auto-detected from config.json — is asked for
the next-token distribution at each position of that float answer (teacher forcing:
prompt + the first j answer tokens, j = 0 .. answer_tokens - 1). Reported per model:

* **KL** = mean over positions of KL(P_fp || P_q). vLLM returns top-k log-probabilities,
  not full distributions, so both are coarsened to the float model's top ``k_fp`` tokens
  plus one "rest" bucket (a lower bound of the full KL, by the data-processing
  inequality; exact when the rest carries no mass). The quantized model's log-probability
  of each of those tokens comes from its top ``k_q`` list (``k_q`` >> ``k_fp``); a token
  missing there gets the smallest log-probability the list holds (an upper bound).
* **top-1 agreement**: argmax of P_q equals argmax of P_fp, over the same positions.
* **accuracy**: the model's own greedy answer, scored against the easy-VQA reference
  (:mod:`qvlm_offline.vqa_data`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from .child import child_main, run_child


def _messages(question: str) -> list[dict]:
    from ..vqa_data import vqa_question

    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": vqa_question(question)}]}]


def _measure(job: dict) -> dict:
    """Child: one model in vLLM; greedy answers, and top-k log-probs at the given token prompts."""
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from ..vqa_data import load_test_examples

    examples = load_test_examples(job["questions"], offset=job["offset"])
    processor = AutoProcessor.from_pretrained(job["model"])
    llm = LLM(model=job["model"], dtype=job["dtype"], enforce_eager=True, max_model_len=job["max_model_len"],
              seed=0, limit_mm_per_prompt={"image": 1}, distributed_executor_backend="uni",
              max_logprobs=job["k"], max_num_seqs=16)
    images = [ex.image() for ex in examples]
    prompts = [{"prompt": processor.apply_chat_template(_messages(ex.question), add_generation_prompt=True),
                "multi_modal_data": {"image": img}} for ex, img in zip(examples, images)]
    t0 = time.perf_counter()
    gen = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=job["answer_tokens"]), use_tqdm=False)
    answers = [{"text": o.outputs[0].text, "token_ids": list(o.outputs[0].token_ids),
                "prompt_token_ids": list(o.prompt_token_ids)} for o in gen]
    positions = job.get("positions")
    if positions == "own":  # the float model: teacher-force along its own answers
        positions = answer_positions(answers, job["answer_tokens"])
    dists = None
    if positions:  # [(question index, token ids)] from the float model's answers
        reqs = [{"prompt_token_ids": ids, "multi_modal_data": {"image": images[i]}} for i, ids in positions]
        outs = llm.generate(reqs, SamplingParams(temperature=0.0, max_tokens=1, logprobs=job["k"]), use_tqdm=False)
        dists = [{str(t): lp.logprob for t, lp in o.outputs[0].logprobs[0].items()} for o in outs]
    seconds = time.perf_counter() - t0
    return {"answers": answers, "dists": dists, "positions": positions, "seconds": seconds,
            "reference": [ex.answer for ex in examples], "decode": _decode_speed(llm, prompts[0], job)}


def _decode_speed(llm, prompt: dict, job: dict) -> dict | None:
    """Batch-1 greedy decode speed on the first question (``decode_tokens`` new tokens, EOS
    ignored, best of ``decode_repeats`` after one warm-up): tokens per second after the first."""
    n = job.get("decode_tokens")
    if not n:
        return None
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    one = SamplingParams(temperature=0.0, max_tokens=1)
    llm.generate([prompt], params, use_tqdm=False)  # warm-up
    best = math.inf
    for _ in range(job.get("decode_repeats", 3)):
        t0 = time.perf_counter()
        llm.generate([prompt], one, use_tqdm=False)
        t1 = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        t2 = time.perf_counter()
        best = min(best, (t2 - t1) - (t1 - t0))  # the prompt's share subtracted
    return {"tokens": n, "tokens_per_s": (n - 1) / best if best > 0 else None}


def answer_positions(answers: list[dict], answer_tokens: int) -> list[tuple[int, list[int]]]:
    """(question, prompt + first j answer tokens) for j < answer_tokens: where distributions are compared."""
    return [(i, a["prompt_token_ids"] + a["token_ids"][:j])
            for i, a in enumerate(answers) for j in range(min(answer_tokens, len(a["token_ids"])))]


def _kl_coarse(p: dict[str, float], q: dict[str, float], k_fp: int) -> float:
    top = sorted(p.items(), key=lambda kv: -kv[1])[:k_fp]
    floor = min(q.values())
    kl, pm, qm = 0.0, 0.0, 0.0
    for t, lp in top:
        lq = q.get(t, floor)
        pi, qi = math.exp(lp), math.exp(lq)
        kl += pi * (lp - lq)
        pm += pi
        qm += qi
    rest_p, rest_q = max(1.0 - pm, 0.0), max(1.0 - qm, 1e-12)
    if rest_p > 0:
        kl += rest_p * math.log(rest_p / rest_q)
    return max(kl, 0.0)


def summarize(fp: dict, q: dict, k_fp: int) -> dict:
    from ..vqa_data import is_correct

    kls, agree = [], []
    for p, d in zip(fp["dists"], q["dists"]):
        kls.append(_kl_coarse(p, d, k_fp))
        agree.append(max(p, key=p.get) == max(d, key=d.get))
    correct = [is_correct(a["text"], ref) for a, ref in zip(q["answers"], q["reference"])]
    return {"kl": sum(kls) / len(kls), "top1_agreement": sum(agree) / len(agree),
            "accuracy": sum(correct) / len(correct), "positions": len(kls), "questions": len(correct)}


def _fingerprint(model: Path) -> list:
    """What identifies a model directory's contents cheaply: every file's name, size and mtime."""
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(model).iterdir() if f.is_file())


def _run_child(task: str, job: dict, workdir: Path, name: str, threads: int, timeout: int) -> dict:
    return run_child(task, job, workdir, name, module="qvlm_offline.tools.compare", threads=threads, timeout=timeout)


def _measure_cached(job: dict, workdir: Path, name: str, threads: int, timeout: int) -> dict:
    """Run (or reuse) one model's measurement: results are cached in ``workdir/cache`` under a
    key of the job and the model directory's fingerprint, so adding a model to a comparison
    does not re-run the float model or the others."""
    import hashlib

    key = hashlib.sha256(json.dumps([job, _fingerprint(job["model"])], sort_keys=True).encode()).hexdigest()[:16]
    cache = workdir / "cache" / f"{name}-{key}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    res = _run_child("measure", job, workdir, name, threads, timeout)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(res))
    return res


def run_compare(fp_model: Path, models: list[Path], *, questions: int = 200, offset: int = 0, answer_tokens: int = 4,
                k_fp: int = 20, k_q: int = 100, dtype: str = "float32", workdir: Path = Path("qvlm-compare"),
                threads: int | None = None, max_model_len: int = 1024, timeout: int = 3600,
                decode_tokens: int = 0, say=print) -> dict:
    """Float model first (its answers fix the positions), then each model. Per model: the
    summary of :func:`summarize`, its greedy answers, and with ``decode_tokens`` its batch-1
    decode speed; ``reference`` holds the easy-VQA answers."""
    import os

    threads = threads or len(os.sched_getaffinity(0))
    workdir.mkdir(parents=True, exist_ok=True)
    base = {"questions": questions, "offset": offset, "answer_tokens": answer_tokens, "dtype": dtype,
            "max_model_len": max_model_len}
    if decode_tokens:
        base["decode_tokens"] = decode_tokens
    say(f"[compare] float model {fp_model}: greedy answers and next-token distributions along them")
    fp = _measure_cached({**base, "model": str(fp_model), "k": k_q, "positions": "own"}, workdir, "fp",
                         threads, timeout)
    positions = fp["positions"]
    runs = {}
    for m in models:
        say(f"[compare] {m}: {len(positions)} next-token distributions")
        runs[str(m)] = _measure_cached({**base, "model": str(m), "k": k_q, "positions": positions}, workdir,
                                       m.name, threads, timeout)
    fp_acc = summarize(fp, fp, k_fp)["accuracy"]
    results = {name: summarize(fp, r, k_fp) | _outputs(r) for name, r in runs.items()}
    return {"float_model": str(fp_model), "float_accuracy": fp_acc, "settings": base | {"k_fp": k_fp, "k_q": k_q},
            "float": _outputs(fp), "reference": fp["reference"], "models": results}


def _outputs(run: dict) -> dict:
    """What a model itself produced: its greedy answers, the largest token id it generated (an
    image token or vocabulary padding means a broken model), its decode speed, its time."""
    return {"answers": [a["text"] for a in run["answers"]], "seconds": run["seconds"], "decode": run.get("decode"),
            "max_token_id": max((max(a["token_ids"], default=-1) for a in run["answers"]), default=-1)}


def format_table(res: dict) -> str:
    speed = res["float"]["decode"] is not None

    def tok_s(d):
        return f" {d['tokens_per_s']:.1f} |" if d and d.get("tokens_per_s") else " - |"

    lines = [f"float model {res['float_model']}: easy-VQA accuracy {100 * res['float_accuracy']:.1f}%"
             + (f", batch-1 decode {res['float']['decode']['tokens_per_s']:.1f} tok/s" if speed else ""),
             "| model | KL(fp‖q) | top-1 agreement | accuracy |" + (" decode tok/s |" if speed else ""),
             "|---|---|---|---|" + ("---|" if speed else "")]
    for name, r in res["models"].items():
        lines.append(f"| {name} | {r['kl']:.4f} | {100 * r['top1_agreement']:.1f}% | {100 * r['accuracy']:.1f}% |"
                     + (tok_s(r.get("decode")) if speed else ""))
    return "\n".join(lines)


def add_compare_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "compare", help="KL / top-1 agreement / easy-VQA accuracy of quantized models vs their float model, in vLLM",
        description="Runs the float model and each quantized model in vLLM (own process each) on easy-VQA test "
        "questions with images and reports the next-token KL divergence to the float model (teacher-forced along "
        "the float model's greedy answer), top-1 agreement and answer accuracy.",
    )
    p.add_argument("float_model", type=Path, help="the unquantized model directory")
    p.add_argument("models", type=Path, nargs="+", help="quantized model directories (qvlm checkpoints)")
    p.add_argument("--questions", type=int, default=200, help="easy-VQA test questions (default: 200)")
    p.add_argument("--offset", type=int, default=0, help="first test question (default: 0)")
    p.add_argument("--answer-tokens", type=int, default=4,
                   help="positions per question: the first N tokens of the float model's answer (default: 4)")
    p.add_argument("--k-fp", type=int, default=20, help="float model's top tokens kept in the KL (default: 20)")
    p.add_argument("--k-q", type=int, default=100, help="top log-probs asked of each model (default: 100)")
    p.add_argument("--dtype", default="float32", help="vLLM dtype for every model (default: float32)")
    p.add_argument("--workdir", type=Path, default=Path("qvlm-compare"),
                   help="logs and cached per-model results go here; a model whose directory is unchanged is not "
                   "re-run (default: ./qvlm-compare)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS per vLLM process (default: all CPUs)")
    p.add_argument("--decode-tokens", type=int, default=0,
                   help="also measure each model's batch-1 decode speed over this many new tokens (default: 0, off)")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    p.set_defaults(func=cmd_compare)
    return p


def cmd_compare(args: argparse.Namespace) -> int:
    res = run_compare(args.float_model, args.models, questions=args.questions, offset=args.offset,
                      answer_tokens=args.answer_tokens, k_fp=args.k_fp, k_q=args.k_q, dtype=args.dtype,
                      workdir=args.workdir, threads=args.threads, decode_tokens=args.decode_tokens, say=lambda m: print(m, file=sys.stderr))
    print(format_table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


_CHILD_TASKS = {"measure": _measure}

if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:], _CHILD_TASKS))
