"""The plugin inside real vLLM linear layers: fused shard loading, kernels, fallbacks."""

import pytest
import torch

from offline_helpers import make_layer_tensors
from qvlm_kernels import reference
from qvlm_kernels.format import QVLMQuantConfig

vllm = pytest.importorskip("vllm")


def _config(scheme, group_size, symmetric, modules):
    from vllm_qvlm.config import QVLMConfig

    cfg = QVLMConfig(QVLMQuantConfig(scheme=scheme, group_size=group_size, symmetric=symmetric))
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    cfg.quantized_modules = {m: (0, 0) for m in modules}
    return cfg


@pytest.mark.parametrize(
    "scheme,group_size,symmetric",
    [("w4a16", 128, True), ("w4a16", 64, False), ("w4a16", -1, True), ("w8a8", -1, True),
     ("w4a8", 128, True), ("w6a6", 128, False), ("w4a4", 64, True)],
)
@pytest.mark.parametrize("kernel", ["auto", "reference"])
def test_qkv_layer_loads_shards_and_matches_reference(vllm_env, monkeypatch, scheme, group_size, symmetric, kernel):
    from vllm.model_executor.layers.linear import QKVParallelLinear

    if kernel != "auto":
        monkeypatch.setenv("QVLM_KERNEL", kernel)
    hidden, head_dim, heads, kv_heads = 256, 32, 8, 2
    names = [f"m.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    cfg = _config(scheme, group_size, symmetric, names)
    layer = QKVParallelLinear(hidden, head_dim, heads, kv_heads, bias=True, params_dtype=torch.bfloat16,
                              quant_config=cfg, prefix="m.self_attn.qkv_proj")
    spec = cfg.schema.layer_spec(names[0])
    shards = {}
    for shard, n in zip("qkv", (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)):
        t = make_layer_tensors(hidden, n, spec, seed=ord(shard))
        shards[shard] = t
        for pname, param in layer.named_parameters():
            if pname in t:
                param.weight_loader(param, t[pname], shard)
    bias = torch.randn(layer.output_size_per_partition, dtype=torch.bfloat16)
    layer.bias.data.copy_(bias)
    layer.quant_method.process_weights_after_loading(layer)

    x = torch.randn(5, hidden, dtype=torch.bfloat16)
    y = layer(x)[0].float()
    ref = torch.cat(
        [reference.linear(x.float(), t["qweight"], t["scales"], t.get("qzeros"), spec) for t in shards.values()], dim=1
    ) + bias.float()
    # bf16 activations and outputs: errors of a few bf16 ulps of the output magnitude.
    tol = 2e-2 * ref.abs().max().item()
    assert (y - ref).abs().max().item() < tol


def test_ignored_layers_fall_back_to_unquantized(vllm_env):
    from vllm.model_executor.layers.linear import RowParallelLinear, UnquantizedLinearMethod

    from vllm_qvlm.config import QVLMConfig

    cfg = QVLMConfig(QVLMQuantConfig(scheme="w4a16", ignore=["re:^vision_tower\\."]))
    cfg.quantized_modules = {}
    layer = RowParallelLinear(64, 64, bias=False, params_dtype=torch.bfloat16, quant_config=cfg,
                              prefix="vision_tower.vision_model.encoder.layers.0.mlp.fc2")
    assert isinstance(layer.quant_method, UnquantizedLinearMethod)


def test_config_quantizing_a_module_the_checkpoint_lacks_is_a_clear_error(vllm_env):
    from vllm.model_executor.layers.linear import RowParallelLinear

    from qvlm_kernels.format import FormatError

    cfg = _config("w4a16", 128, True, [])
    cfg.model_dir = "/models/x"
    with pytest.raises(FormatError, match=r"m\.mlp\.down_proj\.qweight"):
        RowParallelLinear(128, 64, bias=False, params_dtype=torch.bfloat16, quant_config=cfg, prefix="m.mlp.down_proj")


def test_row_parallel_shard_off_the_group_grid_is_a_clear_error(vllm_env):
    from qvlm_kernels.format import FormatError
    from vllm_qvlm.linear import QVLMLinearMethod

    spec = QVLMQuantConfig(scheme="w4a16", group_size=128).layer_spec("m")
    method = QVLMLinearMethod(spec, "m.mlp.down_proj")
    with pytest.raises(FormatError, match=r"352 of its 704 input rows .* --group-size that divides 352 \(e\.g\. 32\)"):
        method.create_weights(torch.nn.Module(), 352, [64], 704, 64, torch.bfloat16, weight_loader=lambda *a: None)


@pytest.mark.parametrize("scheme,group_size", [("w8a8", -1), ("w4a8", 32)])
def test_row_parallel_shards_quantize_with_the_whole_rows_scale(monkeypatch, scheme, group_size):
    """Two row shards, each padded with the all-gathered row max, give TP=1's int8 codes: their summed
    outputs equal TP=1's up to the rounding of each bf16 output; with their own slices' scales they do not."""
    import vllm.distributed

    from qvlm_kernels.dispatch import select_backend
    from qvlm_kernels.pack import append_zero_rows
    from vllm_qvlm.linear import shared_row_scale_pad, with_row_absmax

    spec = QVLMQuantConfig(scheme=scheme, group_size=group_size).layer_spec("m")
    k, n, bf16 = 512, 96, torch.bfloat16
    t = make_layer_tensors(k, n, spec, seed=11)
    x = torch.randn(6, k, dtype=bf16)
    x[:, 3] *= 30  # an outlier in the first shard: the second shard's own scale would be finer
    monkeypatch.setattr(vllm.distributed, "tensor_model_parallel_all_gather",
                        lambda a, dim=-1: torch.cat([a, x.abs().amax(-1, keepdim=True)], dim))

    def run(q, s, z, xs):
        b = select_backend(spec, q.shape[0] * spec.pack_factor, n, bf16, "cpu")
        return b.apply(b.prepare(q, s, z, spec, bf16), xs, None).float()

    full = run(t["qweight"], t["scales"], t.get("qzeros"), x)
    rows, groups = k // 2 // spec.pack_factor, (1 if group_size == -1 else k // 2 // group_size)
    pad = shared_row_scale_pad(spec)
    shared, local = [], []
    for i in range(2):
        q = t["qweight"][i * rows:(i + 1) * rows]
        s = t["scales"] if group_size == -1 else t["scales"][i * groups:(i + 1) * groups]
        xs = x[:, i * k // 2:(i + 1) * k // 2]
        shared.append(run(*append_zero_rows(q, s, None, spec, pad), with_row_absmax(xs, pad)))
        local.append(run(q, s, None, xs))
    bound = 2.0 ** -8 * (shared[0].abs() + shared[1].abs() + full.abs()) + 1e-6  # three bf16 roundings
    assert ((shared[0] + shared[1] - full).abs() <= bound).all()
    assert ((local[0] + local[1] - full).abs() > bound).any()  # the test sees the difference
