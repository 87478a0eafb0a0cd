"""Time and memory of rtn / gptq / the Q-VLM search per decoder layer at LLaVA-1.5-7B/13B widths.

Writes random-weight LLaVA-1.5 checkpoints (CLIP-L/336: 576 image tokens per sample) with a
few decoder layers, runs `qvlm quantize` on each in its own child process and reports wall
time, CPU time and peak RSS per run, cost per layer (slope between depths) extrapolated to
the full depth (stated as such), and the memory formula next to the measured peaks. The
implementation is ``qvlm_offline.tools.search_cost`` (also ``qvlm search-cost``). Usage:

    uv run python benchmarks/search_cost.py [--layers 2 8] [--samples 32 128] [--search-dtype bfloat16]
"""

from __future__ import annotations

import sys

from qvlm_offline.tools.search_cost import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
