"""Bad checkpoints fail before loading with one clear error naming the file and the tensor.

Checked through the path vLLM takes (``QVLMConfig.maybe_update_config``, run when
the engine config is built) and through ``qvlm check``.
"""

import json

import pytest
from safetensors.torch import load_file, save_file

from offline_helpers import write_fake_llava
from qvlm_kernels.format import FormatError
from qvlm_offline.cli import main
from qvlm_offline.export import export_checkpoint

pytest.importorskip("vllm")

MOD = "language_model.model.layers.0.mlp.down_proj"


@pytest.fixture
def ckpt(tmp_path):
    src, _ = write_fake_llava(tmp_path / "src")
    out = tmp_path / "q"
    export_checkpoint(src, out, scheme="w4a16", symmetric=False, progress=False)
    return out


def _plugin_load(model_dir):
    from vllm_qvlm.config import QVLMConfig

    QVLMConfig().maybe_update_config(str(model_dir))


def _edit_config(d, **qc):
    p = d / "config.json"
    cfg = json.loads(p.read_text())
    cfg["quantization_config"].update(qc)
    p.write_text(json.dumps(cfg))


def _edit_tensors(d, fn):
    f = d / "model.safetensors"
    t = load_file(f)
    fn(t)
    save_file(t, f)


def _expect(ckpt, capsys, *fragments):
    with pytest.raises(FormatError) as e:
        _plugin_load(ckpt)
    for frag in fragments:
        assert frag in str(e.value), str(e.value)
    assert main(["check", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert all(frag in err for frag in fragments)


def test_valid_checkpoint_passes(ckpt, capsys):
    _plugin_load(ckpt)
    assert main(["check", str(ckpt)]) == 0
    assert "valid qvlm checkpoint" in capsys.readouterr().out


def test_unknown_scheme(ckpt, capsys):
    _edit_config(ckpt, scheme="w5a5")
    _expect(ckpt, capsys, str(ckpt / "config.json"), "unknown scheme 'w5a5'")


def test_format_version_from_the_future(ckpt, capsys):
    _edit_config(ckpt, format_version=99)
    _expect(ckpt, capsys, str(ckpt / "config.json"), "format_version 99 is newer")


def test_missing_scale_tensor(ckpt, capsys):
    _edit_tensors(ckpt, lambda t: t.pop(f"{MOD}.scales"))
    _expect(ckpt, capsys, str(ckpt / "model.safetensors"), f"'{MOD}.scales' is missing")


def test_missing_zero_points_of_an_asymmetric_layer(ckpt, capsys):
    _edit_tensors(ckpt, lambda t: t.pop(f"{MOD}.qzeros"))
    _expect(ckpt, capsys, "model.safetensors", f"'{MOD}.qzeros' is missing")


def test_wrong_shape(ckpt, capsys):
    def shrink(t):
        t[f"{MOD}.scales"] = t[f"{MOD}.scales"][:, :-1].contiguous()

    _edit_tensors(ckpt, shrink)
    _expect(ckpt, capsys, "model.safetensors", f"'{MOD}.scales'", "expected float16 [1, 64]", "got float16 [1, 63]")


def test_wrong_dtype(ckpt, capsys):
    def to_float(t):
        t[f"{MOD}.qzeros"] = t[f"{MOD}.qzeros"].float()

    _edit_tensors(ckpt, to_float)
    _expect(ckpt, capsys, f"'{MOD}.qzeros'", "expected uint8")


def test_truncated_shard(ckpt, capsys):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    _expect(ckpt, capsys, str(f), "truncated: tensor")


def test_missing_quantization_config_with_quantization_flag(tmp_path):
    src, _ = write_fake_llava(tmp_path / "plain")
    with pytest.raises(FormatError, match=r"config.json: no quantization_config; .*qvlm quantize"):
        _plugin_load(src)


def test_remote_code_is_refused(ckpt, capsys):
    p = ckpt / "config.json"
    cfg = json.loads(p.read_text())
    cfg["text_config"] = {"auto_map": {"AutoModel": "modeling_evil.Model"}}
    p.write_text(json.dumps(cfg))
    _expect(ckpt, capsys, str(p), "'text_config.auto_map' asks for remote code")


def test_pickle_files_are_refused(ckpt, capsys):
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    _expect(ckpt, capsys, "pytorch_model.bin", "never unpickles")


def test_index_pointing_outside_the_model_directory_is_refused(ckpt, tmp_path, capsys):
    outside = tmp_path / "elsewhere.safetensors"
    (ckpt / "model.safetensors").rename(outside)
    weight_map = {name: "../elsewhere.safetensors" for name in ["x"]}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _expect(ckpt, capsys, "model.safetensors.index.json", "points outside the model directory")


def test_symlinked_shard_outside_the_model_directory_is_refused(ckpt, tmp_path, capsys):
    outside = tmp_path / "elsewhere.safetensors"
    (ckpt / "model.safetensors").rename(outside)
    (ckpt / "model.safetensors").symlink_to(outside)
    _expect(ckpt, capsys, "resolves outside the model directory")
