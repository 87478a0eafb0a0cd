"""Device, search precision and activation store of the streaming pipeline (offline/placement.py)."""

import pytest
import torch

from qvlm_offline.placement import Placement, bf16_support, choose_placement, resolve_device, resolve_search_dtype

NATIVE_BF16, _WHY = bf16_support(torch.device("cpu"))


def test_auto_is_cuda_only_when_available():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")


@pytest.mark.parametrize("bad", ["tpu", "gpu0", "mps"])
def test_unknown_devices_are_refused(bad):
    with pytest.raises(ValueError, match="--device"):
        resolve_device(bad)


def test_search_dtype_rules():
    cpu = torch.device("cpu")
    assert resolve_search_dtype("float32", cpu) == torch.float32
    assert resolve_search_dtype("auto", cpu) == (torch.bfloat16 if NATIVE_BF16 else torch.float32)
    with pytest.raises(ValueError, match="one of"):
        resolve_search_dtype("float16", cpu)
    if NATIVE_BF16:
        assert resolve_search_dtype("bfloat16", cpu) == torch.bfloat16
    else:
        with pytest.raises(ValueError, match="neither AVX-512 BF16 nor AMX"):
            resolve_search_dtype("bfloat16", cpu)


def test_store_and_fetch_on_cpu():
    p = Placement(torch.device("cpu"))
    t = torch.randn(2, 3)
    assert p.store(t) is not None and p.store(t).data_ptr() == t.data_ptr()  # float32 on CPU: no copy
    assert p.fetch(t).data_ptr() == t.data_ptr()
    half = Placement(torch.device("cpu"), torch.bfloat16, torch.device("cpu"), torch.bfloat16)
    s = half.store(t)
    assert s.dtype == torch.bfloat16 and half.fetch(s).dtype == torch.float32
    assert torch.allclose(half.fetch(s), t, rtol=2**-8, atol=0)
    assert not half.pinned and "host memory, bfloat16" in str(half)
    nested = p.to_device({"a": (t, [t]), "b": 3})
    assert nested["b"] == 3 and nested["a"][1][0] is t


def test_cpu_placement_keeps_activations_in_host_memory():
    p = choose_placement("cpu", "float32", activation_need=10 * 2**30)
    assert p.store_device.type == "cpu" and p.store_dtype == torch.float32
    assert p.describe()["device"] == "cpu"


@pytest.mark.skipif(not NATIVE_BF16, reason=_WHY)
def test_bf16_search_matches_float32_search_on_tiny_llava(tmp_path):
    """The bf16 autocast search reaches the float32 search's block errors (within 25%) on the tiny model."""
    from qvlm_offline.pipeline import QuantizeOptions, quantize
    from qvlm_offline.testmodels.tiny_llava import build_tiny_llava

    tiny_llava_dir = build_tiny_llava(tmp_path / "src")
    errs = {}
    for dt in ("float32", "bfloat16"):
        r = quantize(tiny_llava_dir, tmp_path / dt, QuantizeOptions(
            scheme="w4a16", method="qvlm", num_samples=8, search_dtype=dt, device="cpu",
            search={"iters": 6, "eval_every": 3}, progress=False))
        assert r.report["placement"]["search_dtype"] == dt
        errs[dt] = [b["error_final"] for b in r.report["blocks"]]
    for a, b in zip(errs["float32"], errs["bfloat16"]):
        assert b <= 1.25 * a + 1e-6, errs
