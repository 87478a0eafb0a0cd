"""qvlm_offline: the offline quantization pipeline and the tools around it.

Reproducibility: oneMKL may schedule a GEMM's work dynamically across its threads, so the
same float32 product can round differently from run to run when other processes compete
for the cores. Conditional numerical reproducibility (``MKL_CBWR``) fixes the schedule for
a given thread count; it must be set before MKL's first call, so it is set on import here
(a user's own ``MKL_CBWR`` wins).
"""

import os

os.environ.setdefault("MKL_CBWR", "AUTO")
