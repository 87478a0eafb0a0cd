"""Run vLLM generation jobs in a child process and return plain JSON results.

vLLM pins threads and keeps global state; a child process keeps that out of pytest. The
child is started by the project's one runner (:mod:`qvlm_offline.tools.child`: offline,
in-process engine) with this file as its script.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

from qvlm_offline.tools.child import child_main, run_child


def run_jobs(jobs: list[dict], workdir: Path, timeout: int = 900, env: dict | None = None) -> list[dict]:
    """``jobs``: dicts with ``model`` and optional ``quantization``, ``n_prompts``, ``max_tokens``,
    ``logprobs``, ``tensor_parallel_size``, ``dtype``, ``enforce_eager`` (default True: no
    torch.compile warm-up), ``kernel`` (a backend name forced through ``QVLM_KERNEL``), ``prompts``
    (texts for ``tiny_prompts``' images, default their llava-1.5 prompts), ``qvlm_layers`` (True:
    the result's ``qvlm_layers`` maps each vLLM layer running the qvlm linear method to its
    ``[K, N]``; one process only, tensor_parallel_size 1)."""
    return run_child("jobs", jobs, workdir, "vllm", script=__file__, timeout=timeout, env=env)


def _run(job: dict) -> dict:
    import time

    from vllm import LLM, SamplingParams

    from qvlm_offline.testmodels.tiny_llava import llava_prompt, tiny_prompts

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


def _run_all(jobs: list[dict]) -> list[dict]:
    return [_run(j) for j in jobs]


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:], {"jobs": _run_all}))
