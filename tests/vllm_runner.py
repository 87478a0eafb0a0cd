"""Run vLLM generation jobs in a child process and return plain JSON results.

vLLM pins threads and keeps global state; a child process keeps that out of pytest,
and the in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``uni`` executor)
loads a small model in seconds instead of a minute. Used as a script by ``run_jobs``.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path


def run_jobs(jobs: list[dict], workdir: Path, timeout: int = 900, env: dict | None = None) -> list[dict]:
    """``jobs``: dicts with ``model`` and optional ``quantization``, ``n_prompts``, ``max_tokens``,
    ``logprobs``, ``tensor_parallel_size``, ``dtype``, ``enforce_eager`` (default True: no
    torch.compile warm-up), ``kernel`` (a backend name forced through ``QVLM_KERNEL``), ``prompts``
    (texts for ``tiny_prompts``' images, default their llava-1.5 prompts), ``qvlm_layers`` (True:
    the result's ``qvlm_layers`` maps each vLLM layer running the qvlm linear method to its
    ``[K, N]``; one process only, tensor_parallel_size 1)."""
    workdir.mkdir(parents=True, exist_ok=True)
    jobs_file, out_file = workdir / "jobs.json", workdir / "results.json"
    jobs_file.write_text(json.dumps(jobs))
    env = {**os.environ, **(env or {})}
    env.update(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", VLLM_CPU_KVCACHE_SPACE="1")
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, __file__, str(jobs_file), str(out_file)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM child failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}")
    return json.loads(out_file.read_text())


def _run(job: dict) -> dict:
    import time

    from vllm import LLM, SamplingParams

    from qvlm_offline.tiny_llava import llava_prompt, tiny_prompts

    n = job.get("n_prompts", 2)
    tp = job.get("tensor_parallel_size", 1)
    t0 = time.perf_counter()
    if job.get("kernel"):  # a forced qvlm backend (QVLM_KERNEL) for this job only
        os.environ["QVLM_KERNEL"] = job["kernel"]
    else:
        os.environ.pop("QVLM_KERNEL", None)
    llm = LLM(model=job["model"], quantization=job.get("quantization"), dtype=job.get("dtype", "bfloat16"),
              enforce_eager=job.get("enforce_eager", True), max_model_len=512, max_num_seqs=job.get("max_num_seqs", max(n, 1)), limit_mm_per_prompt={"image": 1},
              distributed_executor_backend="uni" if tp == 1 else "mp", tensor_parallel_size=tp, seed=0)
    t1 = time.perf_counter()
    qvlm_layers = llm.apply_model(_qvlm_layers)[0] if job.get("qvlm_layers") else None
    # "prompts": the model's own chat-formatted texts for tiny_prompts' questions (other families)
    texts = job.get("prompts") or [llava_prompt(q) for _, q in tiny_prompts(n)]
    requests = [{"prompt": t, "multi_modal_data": {"image": img}} for t, (img, _) in zip(texts, tiny_prompts(n))]
    params = SamplingParams(temperature=0.0, max_tokens=job.get("max_tokens", 8), logprobs=job.get("logprobs", 5),
                            ignore_eos=True)
    outs = llm.generate(requests, params, use_tqdm=False)
    t2 = time.perf_counter()
    result = {
        "job": job, "load_s": t1 - t0, "generate_s": t2 - t1,
        "qvlm_plugin_loaded": "vllm_qvlm" in sys.modules,
        "qvlm_layers": qvlm_layers,
        "outputs": [
            {
                "prompt_token_ids": list(o.prompt_token_ids),
                "token_ids": list(o.outputs[0].token_ids),
                "logprobs": [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs],
                "text": o.outputs[0].text,
            }
            for o in outs
        ],
    }
    del llm
    gc.collect()
    return result


def _qvlm_layers(model) -> dict[str, list[int]]:
    """vLLM module name -> [K, N] of every layer the qvlm linear method runs (fused layers: the
    sum of their shards' N)."""
    from vllm_qvlm.linear import QVLMLinearMethod

    return {name: list(m.qvlm_in_out) for name, m in model.named_modules()
            if isinstance(getattr(m, "quant_method", None), QVLMLinearMethod)}


if __name__ == "__main__":
    jobs = json.loads(Path(sys.argv[1]).read_text())
    results = [_run(j) for j in jobs]
    Path(sys.argv[2]).write_text(json.dumps(results))
