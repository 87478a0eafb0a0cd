"""`qvlm quantize` (RTN): what it writes, how it streams, and that it never leaves half an output."""

import json

import pytest
import torch

from offline_helpers import write_fake_llava
from qvlm_kernels import reference
from qvlm_kernels.checkpoint import load_quant_config, read_tensor, tensor_table, validate_checkpoint
from qvlm_offline.cli import build_parser, main
from qvlm_offline.export import export_checkpoint


@pytest.fixture
def src(tmp_path):
    return write_fake_llava(tmp_path / "src", layers=2)


@pytest.mark.parametrize("quantize_vision", [False, True])
@pytest.mark.parametrize("scheme,symmetric", [("w4a16", True), ("w4a16", False), ("w8a8", True)])
def test_export_quantizes_exactly_the_requested_linears(tmp_path, src, scheme, symmetric, quantize_vision):
    src_dir, tensors = src
    out = tmp_path / "out"
    rep = export_checkpoint(src_dir, out, scheme=scheme, symmetric=symmetric, quantize_vision=quantize_vision,
                            progress=False)
    modules = validate_checkpoint(out)
    assert set(modules) == set(rep.quantized)
    lm = {m for m in modules if m.startswith("language_model.model.layers.")}
    assert len(lm) == 2 * 7
    vision = {m for m in modules if m.startswith(("vision_tower.", "multi_modal_projector."))}
    assert len(vision) == (2 * 6 + 2 if quantize_vision else 0)
    assert "language_model.lm_head" not in modules
    table = tensor_table(out)
    # Unquantized tensors are copied bit for bit; biases of quantized layers too.
    for name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
                 "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.bias"):
        assert torch.equal(read_tensor(table[name]), tensors[name])
    # Quantized tensors dequantize to the source weight within the grid's resolution.
    m = "language_model.model.layers.1.mlp.down_proj"
    cfg = load_quant_config(out)
    spec = cfg.layer_spec(m)
    qz = table.get(f"{m}.qzeros")
    deq = reference.dequantize(read_tensor(table[f"{m}.qweight"]), read_tensor(table[f"{m}.scales"]),
                               None if qz is None else read_tensor(qz), spec)
    err = (deq - tensors[f"{m}.weight"].float().t()).abs().max()
    assert err <= 0.5 * read_tensor(table[f"{m}.scales"]).float().max() + 1e-6
    assert (out / "tokenizer.json").exists() and (out / "chat_template.jinja").exists()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "qvlm" and qc["scheme"] == scheme and qc["format_version"] == 1


def test_non_multiple_of_group_width_gets_a_partial_last_group(tmp_path):
    src_dir, _ = write_fake_llava(tmp_path / "src", hidden=64, intermediate=688)
    out = tmp_path / "out"
    export_checkpoint(src_dir, out, scheme="w4a16", group_size=128, progress=False)
    t = tensor_table(out)
    assert t["language_model.model.layers.0.mlp.down_proj.scales"].shape == (6, 64)  # ceil(688 / 128)
    assert t["language_model.model.layers.0.mlp.down_proj.qweight"].shape == (86, 64)


def test_output_shards_are_bounded_and_indexed(tmp_path, src):
    out = tmp_path / "out"
    export_checkpoint(src[0], out, scheme="w4a16", max_shard_size="16KB", progress=False)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    validate_checkpoint(out)


def test_interrupted_export_leaves_no_output_directory(tmp_path, src):
    calls = []

    def failing(weight, spec, name):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        from qvlm_offline.rtn import quantize_rtn
        return quantize_rtn(weight, spec, name)

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(src[0], out, scheme="w4a16", quantize_fn=failing, progress=False)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_existing_output_is_kept_unless_overwrite(tmp_path, src):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    assert main(["quantize", str(src[0]), str(out), "--scheme", "w4a16", "--quiet"]) == 2
    assert (out / "keep").exists()
    assert main(["quantize", str(src[0]), str(out), "--scheme", "w4a16", "--quiet", "--overwrite"]) == 0
    assert not (out / "keep").exists() and (out / "model.safetensors").exists()


def test_already_quantized_or_pickle_sources_are_refused(tmp_path, src, capsys):
    out = tmp_path / "out"
    assert main(["quantize", str(src[0]), str(out), "--scheme", "w8a8", "--quiet"]) == 0
    assert main(["quantize", str(out), str(tmp_path / "again"), "--scheme", "w8a8", "--quiet"]) == 2
    assert "already quantized" in capsys.readouterr().err
    pk = tmp_path / "pickled"
    pk.mkdir()
    (pk / "config.json").write_text("{}")
    (pk / "pytorch_model.bin").write_bytes(b"\x80")
    assert main(["quantize", str(pk), str(tmp_path / "o2"), "--scheme", "w4a16", "--quiet"]) == 2
    assert "safetensors only" in capsys.readouterr().err


def test_every_flag_is_explained_in_help():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    for name, p in sub.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"qvlm {name}: {action.dest} has no help text"
