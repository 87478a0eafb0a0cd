"""Peak memory of `qvlm quantize --method rtn` against the checkpoint's size.

Writes a random LLaVA-7B-width checkpoint (default about 1.5 GB; fewer decoder layers
than the real model), runs `qvlm quantize` on it in a child process and reports the
child's peak RSS (ru_maxrss). Usage:

    uv run python benchmarks/quantize_memory.py [--layers 2] [--scheme w4a16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_child(args: list[str]) -> int:
    """Run a child process; return its own peak RSS in bytes.

    os.wait4 reports that child alone. This parent never imports torch, so a
    vfork'ed child does not inherit a large address space into its high-water mark.
    """
    proc = subprocess.Popen(args)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, args)
    return usage.ru_maxrss * 1024  # Linux reports KiB


def measure(layers: int, scheme: str, workdir: Path) -> dict:
    src, out = workdir / "src", workdir / "out"
    run_child([sys.executable, "-c", f"from qvlm_offline.testmodels.synthetic import write_random_llava as w; w({str(src)!r}, layers={layers})"])
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    t0 = time.perf_counter()
    peak = run_child(
        [sys.executable, "-m", "qvlm_offline.cli", "quantize", str(src), str(out), "--scheme", scheme,
         "--max-shard-size", "256MB", "--quiet"]
    )
    wall = time.perf_counter() - t0
    baseline = run_child([sys.executable, "-c", "import torch, qvlm_offline.export"])
    out_size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"scheme": scheme, "decoder_layers": layers, "checkpoint_bytes": size, "output_bytes": out_size,
            "peak_rss_bytes": peak, "peak_over_checkpoint": peak / size, "import_baseline_rss_bytes": baseline,
            "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of 4096x11008 (default 2: ~1.5 GB)")
    ap.add_argument("--scheme", default="w4a16", help="scheme to quantize to (default w4a16)")
    ap.add_argument("--json", type=Path, help="also write the result as JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        r = measure(args.layers, args.scheme, Path(d))
    print(f"checkpoint {r['checkpoint_bytes'] / 2**30:.2f} GiB -> {r['output_bytes'] / 2**30:.2f} GiB, "
          f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB ({r['peak_over_checkpoint']:.2f}x checkpoint; "
          f"importing torch alone: {r['import_baseline_rss_bytes'] / 2**30:.2f} GiB), {r['wall_s']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
