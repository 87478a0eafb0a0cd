#!/usr/bin/env bash
# The rtn / gptq / qvlm comparison of docs/results.md, end to end:
#   bash benchmarks/qvlm_results.sh [WORKDIR] [SCHEMES...]
# Builds the SmolLM2-based LLaVA, quantizes it with each method and scheme on the same
# easy-VQA *train* calibration samples, then measures every model in vLLM on easy-VQA
# *test* questions (KL to the float model, top-1 agreement, accuracy).
# With ABLATIONS=1 it also runs the ablations of the search on ABLATION_SCHEME (w4a16):
# fixed 1-layer blocks, fixed 2-layer blocks, no rounding search (sequential GPTQ only),
# and that with the visual stage on.
# Models already written are kept, and `qvlm compare` caches every model's measurement
# in WORKDIR/compare, so an interrupted run resumes where it stopped.
# Env: NUM_SAMPLES (128), ITERS (qvlm steps per block, 40), QUESTIONS (300),
#      METHODS (rtn gptq qvlm), THREADS (all CPUs), ABLATIONS (0), ABLATION_SCHEME (w4a16).
set -euo pipefail
W=${1:-qvlm-results}
shift || true
SCHEMES=${*:-w4a16 w8a8 w4a8 w6a6 w4a4}
N=${NUM_SAMPLES:-128}
ITERS=${ITERS:-40}
Q=${QUESTIONS:-300}
METHODS=${METHODS:-rtn gptq qvlm}
export OMP_NUM_THREADS=${THREADS:-$(nproc)}
mkdir -p "$W"
[ -f "$W/fp/config.json" ] || qvlm build-model smol-llava "$W/fp"
calib=(--calib easyvqa --num-samples "$N" --seed 0)
models=()

quantize() {  # OUT SCHEME METHOD [extra flags...]
  local out=$1 s=$2 m=$3
  shift 3
  if [ ! -f "$out/config.json" ]; then
    /usr/bin/time -v -o "$out.time" qvlm quantize "$W/fp" "$out" --scheme "$s" --method "$m" "$@" \
      --report "$out.report" --quiet
  fi
  models+=("$out")
}

for s in $SCHEMES; do
  for m in $METHODS; do
    case $m in
      rtn) quantize "$W/$s-rtn" "$s" rtn ;;
      gptq) quantize "$W/$s-gptq" "$s" gptq "${calib[@]}" ;;
      qvlm) quantize "$W/$s-qvlm" "$s" qvlm "${calib[@]}" --iters "$ITERS" ;;
    esac
  done
done
if [ "${ABLATIONS:-0}" = 1 ]; then
  a=${ABLATION_SCHEME:-w4a16}
  quantize "$W/$a-qvlm-1layer" "$a" qvlm "${calib[@]}" --iters "$ITERS" --max-block-layers 1
  quantize "$W/$a-qvlm-fixed2" "$a" qvlm "${calib[@]}" --iters "$ITERS" --partition fixed --max-block-layers 2
  quantize "$W/$a-qvlm-nosearch" "$a" qvlm "${calib[@]}" --iters 0
  quantize "$W/$a-qvlm-nosearch-vision" "$a" qvlm "${calib[@]}" --iters 0 --optimize-vision
fi
qvlm compare "$W/fp" "${models[@]}" --questions "$Q" --workdir "$W/compare" --json "$W/compare.json"
