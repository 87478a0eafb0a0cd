"""CPU linear-layer microbenchmark: bf16 vs the dequantized fallback vs qvlm's and vLLM's quantized kernels.

For LLaVA-7B's language-model shapes (K x N) and token counts M (1 and 8: decode, 588:
an image prompt's prefill) it prints the median time of

* ``bf16 onednn_mm``: vLLM-CPU's oneDNN bf16 GEMM on a prepacked weight (what vLLM runs for
  unquantized linears of these sizes; AMX on processors that have it), the baseline of the
  ``x bf16`` column, and plain ``F.linear`` for comparison,
* ``dequantized``: qvlm's fallback backend (a dequantized bf16 weight, fake-quant activations;
  decode only, at prefill it is the bf16 row's GEMM),
* ``qvlm_cpu_*``: qvlm's CPU kernels (kernels/csrc), once per instruction-set level
  (``[avx2]``, ``[avx512]``, ``[amx]``; ``--isa`` picks levels),
* vLLM's own CPU ops where this build/processor has them: ``cpu_wna16`` (``cpu_gemm_wna16``,
  w4a16), ``cpu_amx_w4a8`` (``int4_scaled_mm_cpu``: vLLM's default for int4 GPTQ/AWQ weights
  with bf16 on AMX processors; it quantizes activations to int8, i.e. computes w4a8),
  ``cpu_onednn_int8`` and ``cpu_amx_int8`` (``int8_scaled_mm_with_quant``) for w8a8,

with the GB/s of weight bytes each reads (packed weights + scales) and the speedup over
bf16. Also measures the machine's read bandwidth (``a.sum()`` over 512 MiB) and copy
bandwidth, the ceiling for decode (M=1) where every weight byte is read once.

    .venv/bin/python benchmarks/kernel_bench.py [--threads 2] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from qvlm_kernels import cpu_ext
from qvlm_kernels.backends import (
    CpuAmxInt8Backend,
    CpuAmxW4A8Backend,
    CpuInt8Backend,
    CpuWNA16Backend,
    DequantizedBackend,
    QvlmCpuW4A8Backend,
    QvlmCpuW4A16Backend,
    QvlmCpuW8A8Backend,
    has_vllm_op,
    vllm_ops,
)
from qvlm_kernels.format import QVLMQuantConfig

SHAPES = [(4096, 4096, "q/k/v/o_proj"), (4096, 11008, "gate/up_proj"), (11008, 4096, "down_proj"),
          (4096, 32000, "lm_head")]
TOKENS = [1, 8, 588]


# Weights of one measurement are spread over copies totalling at least this many bytes, and
# calls cycle through them: a 4096x4096 int4 layer (8 MiB) would otherwise be served from
# the L3 cache (32 MiB on the EPYC, and a single thread's read rate on the Xeon only drops to
# its memory rate beyond about 192 MiB), unlike a real model's layers, which stream from memory.
_ROTATE_BYTES = 256 << 20


_clock = time.perf_counter


def _time(fns, min_reps: int, budget_s: float) -> float:
    """Median seconds per call over calls cycling through ``fns``: at least ``min_reps``, up to ``budget_s``."""
    fns = list(fns)
    for f in fns[:2]:
        f()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 200):
        f = fns[len(times) % len(fns)]
        t0 = _clock()
        f()
        times.append(_clock() - t0)
    return statistics.median(times)


def _copies(nbytes: int) -> int:
    return max(1, -(-_ROTATE_BYTES // max(nbytes, 1)))


def bandwidth() -> dict[str, float]:
    a = torch.ones(128 << 20, dtype=torch.float32)  # 512 MiB
    b = torch.empty_like(a)
    read = a.numel() * 4 / _time([lambda: a.sum()], 5, 2.0) / 1e9
    copy = 2 * a.numel() * 4 / _time([lambda: b.copy_(a)], 5, 2.0) / 1e9
    return {"read_sum_GBps": read, "copy_rw_GBps": copy}


def _random_layer(k: int, n: int, spec, gen: torch.Generator):
    """Random stored tensors (uniform codes, small scales); no RTN needed for timing."""
    groups = 1 if spec.group_size == -1 else -(-k // spec.group_size)
    codes_max = 1 << spec.bits
    if spec.bits == 4:
        qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, generator=gen)
    else:
        qweight = torch.randint(0, codes_max, (k, n), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(groups, n, generator=gen) * 0.01 + 1e-3).to(torch.float16)
    qzeros = None if spec.symmetric else torch.randint(0, codes_max, (groups, n), dtype=torch.uint8, generator=gen)
    return qweight, scales, qzeros


def _weight_bytes(p) -> int:
    """Bytes a backend's prepared weights occupy (what one pass over the layer reads)."""
    return sum(v.numel() * v.element_size() for v in p.tensors.values() if isinstance(v, torch.Tensor))


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def _bf16_baselines(w_bf16):
    """``(name, [calls(x)])``: vLLM's oneDNN bf16 GEMM where this build has it, and F.linear."""
    out = []
    if has_vllm_op("create_onednn_mm_handler"):
        ops = vllm_ops()
        handles = [ops.create_onednn_mm(w.t(), 32) for w in w_bf16]
        out.append(("bf16 onednn_mm", [lambda x, h=h: ops.onednn_mm(h, x, None) for h in handles]))
    out.append(("bf16 F.linear", [lambda x, w=w: F.linear(x, w) for w in w_bf16]))
    return out


_QVLM_BACKENDS = (QvlmCpuW4A16Backend, QvlmCpuW4A8Backend, QvlmCpuW8A8Backend)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    ap.add_argument("--quick", action="store_true", help="first shape only, fewer repetitions")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--budget", type=float, default=1.5, help="seconds of repetitions per measurement")
    ap.add_argument("--isa", nargs="+", choices=cpu_ext.ISAS,
                    help="instruction-set levels to measure qvlm's kernels at (default: every level this "
                         "processor supports)")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="thread: CPU time of the calling thread (needs --threads 1); robust when other "
                         "processes share the cores, where wall-clock times of a 2-thread OpenMP region "
                         "include waiting for a descheduled thread")
    args = ap.parse_args(argv)
    if args.clock == "thread":
        if args.threads != 1:
            ap.error("--clock thread measures one thread: use --threads 1")
        global _clock
        _clock = time.thread_time
    torch.set_num_threads(args.threads)

    if not cpu_ext.available():
        print(f"qvlm CPU kernels unavailable: {cpu_ext.unavailable_reason()}", file=sys.stderr)
    bw = bandwidth()
    isas = args.isa or cpu_ext.supported_isas()
    print(f"{cpu_model()}; qvlm kernel levels measured: {', '.join(isas) or 'none'}")
    print(f"threads={args.threads} clock={args.clock}  read bandwidth (a.sum, 512 MiB) {bw['read_sum_GBps']:.1f} GB/s, "
          f"copy {bw['copy_rw_GBps']:.1f} GB/s (read+write)")

    specs = {
        "w4a16": QVLMQuantConfig(scheme="w4a16", group_size=args.group_size).layer_spec("m"),
        "w4a8": QVLMQuantConfig(scheme="w4a8", group_size=args.group_size).layer_spec("m"),
        "w8a8": QVLMQuantConfig(scheme="w8a8", group_size=-1).layer_spec("m"),
    }
    candidates = [("w4a16", DequantizedBackend), ("w4a16", QvlmCpuW4A16Backend), ("w4a16", CpuWNA16Backend),
                  ("w4a8", DequantizedBackend), ("w4a8", QvlmCpuW4A8Backend), ("w4a8", CpuAmxW4A8Backend),
                  ("w8a8", DequantizedBackend), ("w8a8", QvlmCpuW8A8Backend), ("w8a8", CpuInt8Backend),
                  ("w8a8", CpuAmxInt8Backend)]
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    rows = []
    shapes = SHAPES[:1] if args.quick else SHAPES
    budget = 0.5 if args.quick else args.budget
    hdr = f"{'layer':>14} {'K x N':>12} {'M':>4} {'backend':>31} {'ms':>9} {'GB/s':>6} {'x bf16':>7}"
    print(hdr)
    print("-" * len(hdr))
    for k, n, label in shapes:
        w_bf16 = [(torch.randn(n, k, generator=gen) * 0.02).to(dtype) for _ in range(_copies(2 * k * n))]
        bf16_calls = _bf16_baselines(w_bf16)
        layers = {}
        for scheme, cls in candidates:
            spec = specs[scheme]
            if cls is not DequantizedBackend and not cls.supports(spec, k, n, dtype):
                continue
            if scheme not in layers:
                layers[scheme] = _random_layer(k, n, spec, gen)
            qweight, scales, qzeros = layers[scheme]
            be = cls()
            first = be.prepare(qweight, scales, qzeros, spec, dtype)
            rest = [be.prepare(qweight, scales, qzeros, spec, dtype) for _ in range(_copies(_weight_bytes(first)) - 1)]
            layers[(scheme, cls.name)] = (be, [first, *rest])
        for m in args.tokens:
            if m > 64 and label == "lm_head":
                continue  # vLLM computes logits for the last token of a prompt only
            x = torch.randn(m, k, generator=gen).to(dtype)
            reps = 3 if m > 64 else 10
            results = [(name, _time([lambda f=f: f(x) for f in calls], reps, budget), 2 * k * n)
                       for name, calls in bf16_calls]
            t_bf16 = results[0][1]
            for key, val in layers.items():
                if not isinstance(key, tuple):
                    continue
                be, ps = val
                if m > 64 and isinstance(be, DequantizedBackend):
                    continue  # the same bf16 GEMM as the bf16 row (plus fake quantization): minutes
                for isa in isas if isinstance(be, _QVLM_BACKENDS) else [None]:
                    if isa:
                        cpu_ext.set_isa(isa)
                    t = _time([lambda p=p: be.apply(p, x, None) for p in ps], reps, budget)
                    results.append((f"{key[0]} {key[1]}" + (f" [{isa}]" if isa else ""), t, _weight_bytes(ps[0])))
                if cpu_ext.available():
                    cpu_ext.set_isa("auto")
            for name, t, nbytes in results:
                row = {"layer": label, "K": k, "N": n, "M": m, "backend": name, "ms": t * 1e3,
                       "weight_GBps": nbytes / t / 1e9, "speedup_vs_bf16": t_bf16 / t, "threads": args.threads}
                rows.append(row)
                print(f"{label:>14} {f'{k}x{n}':>12} {m:>4} {name:>31} {t * 1e3:9.3f} {row['weight_GBps']:6.1f} "
                      f"{row['speedup_vs_bf16']:6.2f}x")
            sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "isas": isas, "bandwidth": bw, "threads": args.threads, "clock": args.clock, "dtype": str(dtype),
                       "group_size": args.group_size, "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
