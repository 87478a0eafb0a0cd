#!/usr/bin/env bash
# The rtn / gptq / qvlm comparison of docs/results.md, end to end:
#   bash benchmarks/qvlm_results.sh [WORKDIR] [SCHEMES...]
# Builds the SmolLM2-based LLaVA, quantizes it with each method and scheme on the same
# easy-VQA *train* calibration samples, then measures every model in vLLM on easy-VQA
# *test* questions (KL to the float model, top-1 agreement, accuracy).
# Env: NUM_SAMPLES (32), ITERS (qvlm steps per block, 40), QUESTIONS (200), THREADS (all CPUs).
set -euo pipefail
W=${1:-qvlm-results}
shift || true
SCHEMES=${*:-w4a16 w8a8 w4a8 w6a6 w4a4}
N=${NUM_SAMPLES:-32}
ITERS=${ITERS:-40}
Q=${QUESTIONS:-200}
export OMP_NUM_THREADS=${THREADS:-$(nproc)}
mkdir -p "$W"
[ -f "$W/fp/config.json" ] || qvlm build-model smol-llava "$W/fp"
calib=(--calib easyvqa --num-samples "$N" --seed 0)
models=()
for s in $SCHEMES; do
  for m in rtn gptq qvlm; do
    out="$W/$s-$m"
    extra=()
    [ "$m" = gptq ] && extra=("${calib[@]}")
    [ "$m" = qvlm ] && extra=("${calib[@]}" --iters "$ITERS")
    if [ ! -f "$out/config.json" ]; then
      /usr/bin/time -v -o "$out.time" qvlm quantize "$W/fp" "$out" --scheme "$s" --method "$m" "${extra[@]}" \
        --report "$out.report" --quiet
    fi
    models+=("$out")
  done
done
qvlm compare "$W/fp" "${models[@]}" --questions "$Q" --workdir "$W/compare" --json "$W/compare-$(echo $SCHEMES | tr ' ' '-').json"
