#!/usr/bin/env bash
# The Q-VLM search on an NVIDIA GPU: same quality as the CPU search, and its time and memory at
# LLaVA-1.5-7B widths. Sized for about 10 minutes on an H100/H200-class GPU:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# What it runs (each step's output goes to OUT_DIR, default $OUT or ./gpu-check-out):
#   1. quality: smol-llava (`qvlm build-model smol-llava`, a real pretrained LM) quantized to w4a16
#      by the Q-VLM search twice with the same seed and calibration set: on the GPU (--device cuda,
#      --search-dtype bfloat16) and on the CPU (float32); then `qvlm compare` runs the float model
#      and both in vLLM on easy-VQA test questions. PASS when the GPU search's KL to the float
#      model is at most 5% (+0.002 nats) above the CPU search's. Files: quality.json, quality.log.
#   2. cost: `qvlm search-cost --device cuda --search-dtype bfloat16` on 7B-width checkpoints with
#      LAYERS decoder layers (default "2 4"), gptq and qvlm, 32 and 128 samples, 150 steps: wall
#      time, peak RSS and peak GPU memory per run, per layer, extrapolated to 32 layers.
#      Files: search_cost.json, search_cost.png, search_cost.log.
#
# Installs nothing; run it where `uv sync` (or pip install -e .) has set up the project with a
# CUDA build of torch. Env: PYTHON (python3, or .venv/bin/python when present), WORKDIR ($TMPDIR
# or /tmp, /qvlm-gpu-check), SAMPLES (32), ITERS (50), QUESTIONS (100), LAYERS ("2 4"),
# COST_SAMPLES ("32 128"), COST_ITERS (150), GPU_CHECK_DEVICE (cuda; cpu: a dry run without a GPU,
# e.g. GPU_CHECK_DEVICE=cpu QUALITY_MODEL=tiny COST_WIDTHS=tiny bash benchmarks/gpu_check.sh /tmp/o),
# QUALITY_MODEL (smol; tiny: the tiny random LLaVA, for the dry run), COST_WIDTHS (7b).
set -uo pipefail

OUT_DIR=${1:-${OUT:-./gpu-check-out}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WORKDIR=${WORKDIR:-${TMPDIR:-/tmp}/qvlm-gpu-check}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SAMPLES=${SAMPLES:-32}
ITERS=${ITERS:-50}
QUESTIONS=${QUESTIONS:-100}
LAYERS=${LAYERS:-"2 4"}
COST_SAMPLES=${COST_SAMPLES:-"32 128"}
COST_ITERS=${COST_ITERS:-150}
COST_WIDTHS=${COST_WIDTHS:-7b}
QUALITY_MODEL=${QUALITY_MODEL:-smol}
export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
mkdir -p "$WORKDIR"
QVLM=("$PYTHON" -m qvlm_offline.cli)
GPU_DTYPE=bfloat16
[ "$DEVICE" = cpu ] && GPU_DTYPE=auto

{ nvidia-smi 2>&1 | head -15; "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"; } > "$OUT_DIR/env.txt" 2>&1

echo "== 1. quality: the search on $DEVICE ($GPU_DTYPE) vs on cpu (float32), $QUALITY_MODEL" | tee "$OUT_DIR/quality.log"
FP=$WORKDIR/fp-$QUALITY_MODEL
if [ ! -f "$FP/config.json" ]; then
  if [ "$QUALITY_MODEL" = smol ]; then
    "${QVLM[@]}" build-model smol-llava "$FP" >> "$OUT_DIR/quality.log" 2>&1
  else
    "$PYTHON" -c "from qvlm_offline.testmodels.tiny_llava import build_tiny_llava as b; b('$FP')" >> "$OUT_DIR/quality.log" 2>&1
  fi
fi
for side in gpu cpu; do
  if [ $side = gpu ]; then dev=$DEVICE; dt=$GPU_DTYPE; else dev=cpu; dt=float32; fi
  start=$(date +%s)
  "${QVLM[@]}" quantize "$FP" "$WORKDIR/q-$side" --scheme w4a16 --method qvlm --calib easyvqa \
      --num-samples "$SAMPLES" --iters "$ITERS" --seed 0 --device "$dev" --search-dtype "$dt" \
      --report "$WORKDIR/rep-$side" --overwrite --quiet >> "$OUT_DIR/quality.log" 2>&1 \
    || { echo "FAIL: the search on $dev failed (see quality.log)"; tail -5 "$OUT_DIR/quality.log"; exit 1; }
  echo "search on $dev ($dt): $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/quality.log"
done
"${QVLM[@]}" compare "$FP" "$WORKDIR/q-gpu" "$WORKDIR/q-cpu" --questions "$QUESTIONS" --workdir "$WORKDIR/compare" \
    --json "$OUT_DIR/compare.json" >> "$OUT_DIR/quality.log" 2>&1 \
  || { echo "FAIL: qvlm compare failed (see quality.log)"; tail -5 "$OUT_DIR/quality.log"; exit 1; }
"$PYTHON" - "$OUT_DIR" "$WORKDIR" <<'PY' | tee -a "$OUT_DIR/quality.log"
import json, sys
from pathlib import Path
out, work = Path(sys.argv[1]), Path(sys.argv[2])
res = json.loads((out / "compare.json").read_text())
gpu, cpu = (res["models"][str(work / f"q-{side}")] for side in ("gpu", "cpu"))
reports = {s: json.loads((work / f"rep-{s}" / "report.json").read_text()) for s in ("gpu", "cpu")}
ok = gpu["kl"] <= 1.05 * cpu["kl"] + 0.002
q = {"gpu": {"kl": gpu["kl"], "top1": gpu["top1_agreement"], "accuracy": gpu.get("accuracy"),
             "search_seconds": reports["gpu"]["seconds"], "placement": reports["gpu"].get("placement"),
             "peak_device_bytes": reports["gpu"].get("peak_device_bytes")},
     "cpu": {"kl": cpu["kl"], "top1": cpu["top1_agreement"], "accuracy": cpu.get("accuracy"),
             "search_seconds": reports["cpu"]["seconds"], "placement": reports["cpu"].get("placement")},
     "pass": ok}
(out / "quality.json").write_text(json.dumps(q, indent=2))
print(f"KL to float: search on {q['gpu']['placement']['device']} {gpu['kl']:.4f} vs cpu {cpu['kl']:.4f}: "
      f"{'PASS' if ok else 'FAIL'} (<= 5% + 0.002 above); search {q['gpu']['search_seconds']:.0f} s vs "
      f"{q['cpu']['search_seconds']:.0f} s")
PY

echo "== 2. cost: qvlm search-cost on $DEVICE at $COST_WIDTHS widths" | tee "$OUT_DIR/search_cost.log"
# shellcheck disable=SC2086
"${QVLM[@]}" search-cost --workdir "$WORKDIR/cost" --widths "$COST_WIDTHS" --layers $LAYERS --methods gptq qvlm \
    --samples $COST_SAMPLES --iters "$COST_ITERS" --device "$DEVICE" --search-dtype "$GPU_DTYPE" \
    >> "$OUT_DIR/search_cost.log" 2>&1 || echo "FAIL: search-cost (see search_cost.log)"
cp "$WORKDIR/cost/search_cost.json" "$WORKDIR/cost/search_cost.png" "$OUT_DIR/" 2>/dev/null
sed -n '/^search cost at/,$p' "$OUT_DIR/search_cost.log"
