"""Where a calibrated `qvlm quantize` reaches its peak memory: an RSS timeline by phase.

Runs the quantize pipeline (gptq or qvlm) in this process while a thread samples the
resident set every few milliseconds, and marks the pipeline's phases (calibration, skeleton
construction, capture, each decoder layer's load, Hessian pass, each GPTQ solve, the
dequantized layer, the export). Prints per phase the RSS at its start and the highest RSS
until the next mark, and writes them as JSON. A diagnostic for the memory formula of
`qvlm search-cost`, not a replacement for it (that one measures each run in its own process).

    uv run python benchmarks/rss_timeline.py CHECKPOINT [--method gptq] [--samples 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


class Timeline:
    """RSS samples (every ``interval`` s) and named marks, both on ``time.perf_counter``."""

    def __init__(self, interval: float = 0.005):
        self.samples: list[tuple[float, int]] = []
        self.marks: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        with open("/proc/self/statm") as f:
            while not self._stop.is_set():
                f.seek(0)
                self.samples.append((time.perf_counter(), int(f.read().split()[1]) * PAGE))
                time.sleep(interval)

    def __enter__(self) -> Timeline:
        self._thread.start()
        self.mark("start")
        return self

    def __exit__(self, *exc) -> None:
        self.mark("end")
        time.sleep(0.02)
        self._stop.set()
        self._thread.join()

    def mark(self, name: str) -> None:
        self.marks.append((time.perf_counter(), name))

    def wrap(self, owner, attr: str, name: str | None = None) -> None:
        """Mark ``owner.attr``'s calls: ``name+`` on entry, ``name-`` on return."""
        fn, name = getattr(owner, attr), name or attr

        def wrapped(*a, **k):
            self.mark(f"{name}+")
            try:
                return fn(*a, **k)
            finally:
                self.mark(f"{name}-")

        setattr(owner, attr, wrapped)

    def rows(self) -> list[dict]:
        ts = [t for t, _ in self.samples]
        t0 = self.marks[0][0]
        out = []
        for i, (t, name) in enumerate(self.marks):
            t_next = self.marks[i + 1][0] if i + 1 < len(self.marks) else t
            seg = [r for _, r in self.samples[bisect.bisect_left(ts, t):bisect.bisect_right(ts, t_next)]]
            if not seg:  # a mark between two samples: the nearest sample
                seg = [self.samples[min(bisect.bisect_left(ts, t), len(self.samples) - 1)][1]]
            out.append({"seconds": t - t0, "mark": name, "rss_gib": seg[0] / 2**30, "max_until_next_gib": max(seg) / 2**30})
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="source checkpoint (e.g. one written by `qvlm search-cost`)")
    ap.add_argument("--method", choices=("gptq", "qvlm"), default="gptq", help="calibrated method to trace")
    ap.add_argument("--scheme", default="w4a16", help="quantization scheme")
    ap.add_argument("--samples", type=int, default=4, help="calibration samples (easy-VQA)")
    ap.add_argument("--activation-dtype", default="bfloat16", help="the activation store's dtype")
    ap.add_argument("--iters", type=int, default=2, help="qvlm: optimisation steps per block")
    ap.add_argument("--json", type=Path, help="write the timeline here")
    args = ap.parse_args(argv)

    from qvlm_offline import gptq_streaming, pipeline, qvlm, sequential

    tl = Timeline()
    for owner, attr, name in [(pipeline, "_calibration_inputs", "calibration"),
                              (sequential.StreamingModel, "__init__", "skeleton"),
                              (sequential.StreamingModel, "first_layer_inputs", "capture"),
                              (sequential.StreamingModel, "load_layer", "load_layer"),
                              (gptq_streaming, "gptq_block", "hessians+solves"),
                              (qvlm, "gptq_block", "gptq_start"),
                              (qvlm, "quantize_gptq", "solve"),
                              (gptq_streaming, "dequantized_linear", "dequantized_linear"),
                              (pipeline, "export_checkpoint", "export")]:
        tl.wrap(owner, attr, name)
    search = {"iters": args.iters} if args.method == "qvlm" else {}
    with tempfile.TemporaryDirectory() as tmp, tl:
        pipeline.quantize(args.checkpoint, Path(tmp) / "out", pipeline.QuantizeOptions(
            scheme=args.scheme, method=args.method, num_samples=args.samples, device="cpu",
            activation_dtype=args.activation_dtype, search=search, progress=False))
    rows = tl.rows()
    for r in rows:
        print(f"{r['seconds']:8.1f} s  {r['mark']:22s} rss {r['rss_gib']:.2f} GiB  max until next {r['max_until_next_gib']:.2f}")
    peak = max(r["max_until_next_gib"] for r in rows)
    print(f"peak {peak:.2f} GiB at {max(rows, key=lambda r: r['max_until_next_gib'])['mark']}")
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "peak_gib": peak, "timeline": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
