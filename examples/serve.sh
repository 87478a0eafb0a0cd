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
#   VLLM_BIN        the `vllm` executable (default: <repo>/.venv/bin/vllm, else `vllm` on PATH)
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
            "import sys; from qvlm_offline.tiny_llava import build_tiny_llava; build_tiny_llava(sys.argv[1])" "$SRC"
    fi
    if [[ ! -f "$MODEL/config.json" ]]; then
        echo "serve.sh: quantizing $SRC -> $MODEL (w4a16)"
        uv run --project "$REPO" qvlm quantize "$SRC" "$MODEL" --scheme w4a16 --overwrite
    fi
fi

if [[ -z "${VLLM_BIN:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/vllm" ]]; then
        VLLM_BIN="$REPO/.venv/bin/vllm"
    else
        VLLM_BIN="$(command -v vllm || true)"
    fi
fi
if [[ -z "$VLLM_BIN" ]]; then
    echo "serve.sh: no vllm executable found; run 'uv sync' in $REPO or set VLLM_BIN" >&2
    exit 2
fi

ARGS=(--quantization qvlm --enforce-eager --max-model-len "${MAX_MODEL_LEN:-512}"
      --host 127.0.0.1 --port "${PORT:-8000}" "$@")
PY="$(dirname "$VLLM_BIN")/python"
[[ -x "$PY" ]] || PY=python3

echo "serve.sh: serving $MODEL on http://127.0.0.1:${PORT:-8000}/v1"
if "$PY" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
    exec "$VLLM_BIN" serve "$MODEL" "${ARGS[@]}"
else
    # vllm-cpu 0.32 (the CPU environment): its `vllm` CLI dies at start-up with
    # PackageNotFoundError("vllm"), since it asks for the version of a distribution named
    # `vllm` and this one is named `vllm-cpu`. The same OpenAI server (same flags, the model
    # as --model) starts from its module entry point, which vLLM marks deprecated.
    exec "$PY" -W ignore::DeprecationWarning -m vllm.entrypoints.openai.api_server --model "$MODEL" "${ARGS[@]}"
fi
