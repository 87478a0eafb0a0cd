"""Decode tokens/s, time to first token and weight bytes: bf16 vs qvlm schemes in vLLM.

Builds a random-weight LLaVA of LLaVA-1.5-7B widths with fewer layers (default 2 decoder
+ 2 vision layers), quantizes it to each scheme and measures each configuration in its
own vLLM child process; prints a table, writes JSON, saves a PNG if matplotlib imports.
The implementation is ``qvlm_offline.tools.bench`` (also ``qvlm bench``). Usage:

    uv run python benchmarks/bench.py [--layers 2] [--json out.json] [--png out.png] [--tiny]
"""

from __future__ import annotations

import sys

from qvlm_offline.tools.bench import main, run_bench  # noqa: F401  (run_bench: importable from here too)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
