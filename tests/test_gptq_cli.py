"""`qvlm quantize --method gptq` end to end: calibration samples -> streamed GPTQ -> export.

GPTQ runs layer by layer on the streamed checkpoint, each layer calibrated on the outputs
of the already-quantized layers before it; the exported checkpoint must track the float
model more closely than RTN on the calibration inputs, and the CLI must write exactly
what the library call writes.
"""

import pytest
import torch

from offline_helpers import dequantized_llava
from qvlm_kernels.checkpoint import load_quant_config, read_tensor, tensor_table, validate_checkpoint
from qvlm_offline.calibration import build_model_inputs, load_calibration
from qvlm_offline.cli import main
from qvlm_offline.pipeline import QuantizeOptions, quantize
from qvlm_offline.testmodels.tiny_llava import build_tiny_llava

pytest.importorskip("easy_vqa")

ARGS = ["--scheme", "w4a16", "--group-size", "64", "--quiet"]
CALIB = ["--calib", "easyvqa", "--num-samples", "8", "--seed", "0"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq")
    src = build_tiny_llava(root / "src")
    assert main(["quantize", str(src), str(root / "rtn"), *ARGS]) == 0
    assert main(["quantize", str(src), str(root / "gptq"), *ARGS, "--method", "gptq", *CALIB]) == 0
    return root, src


def _logits(model, inputs):
    with torch.no_grad():
        return [model(**{k: (v.float() if torch.is_floating_point(v) else v) for k, v in x.items()}).logits[0]
                for x in inputs]


def test_gptq_export_tracks_the_float_model_better_than_rtn(exported):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    root, src = exported
    assert set(validate_checkpoint(root / "gptq")) == set(validate_checkpoint(root / "rtn"))
    assert load_quant_config(root / "gptq").producer["method"] == "gptq"
    processor = AutoProcessor.from_pretrained(src)
    inputs = build_model_inputs(load_calibration("easyvqa", 8, 0, processor=processor), processor)
    ref = _logits(LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval(), inputs)

    def err(qdir):
        out = _logits(dequantized_llava(src, qdir), inputs)
        return sum(float((o - r).pow(2).mean()) for o, r in zip(out, ref))

    e_rtn, e_gptq = err(root / "rtn"), err(root / "gptq")
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


def test_cli_writes_what_the_library_call_writes(exported):
    root, src = exported
    quantize(src, root / "lib", QuantizeOptions(scheme="w4a16", method="gptq", group_size=64, calib="easyvqa",
                                                num_samples=8, seed=0, progress=False))
    a, b = tensor_table(root / "gptq"), tensor_table(root / "lib")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(read_tensor(a[name]), read_tensor(b[name])), name
    # the finished layers waited on disk beside the output; that scratch is gone
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]
