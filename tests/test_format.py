"""The quantization_config schema: valid configs round-trip, bad ones fail with one clear message."""

import pytest

from qvlm_kernels.format import FORMAT_VERSION, SCHEMES, FormatError, QVLMQuantConfig


def test_every_scheme_of_the_design_is_named():
    assert set(SCHEMES) == {"w4a16", "w8a8", "w4a8", "w6a6", "w4a4"}


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_config_round_trips_through_json_dict(scheme):
    gs = -1 if scheme == "w8a8" else 128
    cfg = QVLMQuantConfig(scheme=scheme, group_size=gs, ignore=["re:^vision_tower\\.", "lm_head"])
    again = QVLMQuantConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.to_dict()["quant_method"] == "qvlm" and again.format_version == FORMAT_VERSION


@pytest.mark.parametrize(
    "patch,message",
    [
        ({"scheme": "w3a7"}, "unknown scheme 'w3a7'"),
        ({"format_version": FORMAT_VERSION + 1}, "newer than this vllm-qvlm understands"),
        ({"scheme": "w8a8", "group_size": 128}, "group_size must be -1"),
        ({"scheme": "w8a8", "group_size": -1, "symmetric": False}, "symmetric only"),
        ({"group_size": 100}, "multiple of 8"),
        ({"ignore": ["re:(unclosed"]}, "bad regex"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_config_is_one_clear_error_naming_the_file(patch, message):
    data = {"quant_method": "qvlm", "scheme": "w4a16", "group_size": 128, **patch}
    with pytest.raises(FormatError, match="config.json") as e:
        QVLMQuantConfig.from_dict(data, source="/m/config.json")
    assert message in str(e.value)


def test_ignore_and_overrides_resolve_per_module():
    cfg = QVLMQuantConfig(
        scheme="w4a16", group_size=128, ignore=["re:^vision_tower\\.", "language_model.lm_head"],
        overrides={"re:.*down_proj$": {"group_size": 32, "symmetric": False}},
    )
    assert cfg.layer_spec("vision_tower.vision_model.encoder.layers.0.mlp.fc1") is None
    assert cfg.layer_spec("language_model.lm_head") is None
    down = cfg.layer_spec("language_model.model.layers.3.mlp.down_proj")
    assert (down.group_size, down.symmetric) == (32, False)
    q = cfg.layer_spec("language_model.model.layers.3.self_attn.q_proj")
    assert (q.bits, q.group_size, q.symmetric, q.act_mode) == (4, 128, True, "none")
