"""`qvlm quantize --method gptq` end to end: calibration samples -> Hessians -> GPTQ export.

The GPTQ objective is the layer-output error on the calibration inputs,
``tr((W - Wq) H (W - Wq)^T)``; the exported GPTQ checkpoint must beat RTN on it.
"""

import pytest
import torch

from qvlm_kernels import reference
from qvlm_kernels.checkpoint import load_quant_config, read_tensor, tensor_table, validate_checkpoint
from qvlm_offline.calibration import load_calibration
from qvlm_offline.capture import collect_hessians
from qvlm_offline.cli import main
from qvlm_offline.export import quantizable_modules
from qvlm_offline.tiny_llava import build_tiny_llava

pytest.importorskip("easy_vqa")


def _dequantized(qdir, module):
    table, spec = tensor_table(qdir), load_quant_config(qdir).layer_spec(module)
    qz = table.get(f"{module}.qzeros")
    return reference.dequantize(read_tensor(table[f"{module}.qweight"]), read_tensor(table[f"{module}.scales"]),
                                None if qz is None else read_tensor(qz), spec).t()


def test_gptq_export_beats_rtn_on_the_calibration_objective(tmp_path):
    src = build_tiny_llava(tmp_path / "src")
    args = ["--scheme", "w4a16", "--group-size", "64", "--quiet"]
    assert main(["quantize", str(src), str(tmp_path / "rtn"), *args]) == 0
    assert main(["quantize", str(src), str(tmp_path / "gptq"), *args, "--method", "gptq",
                 "--calib", "easyvqa", "--num-samples", "8", "--seed", "0"]) == 0
    assert set(validate_checkpoint(tmp_path / "gptq")) == set(validate_checkpoint(tmp_path / "rtn"))
    assert load_quant_config(tmp_path / "gptq").producer["method"] == "gptq"

    modules = quantizable_modules(src, False, False)
    from transformers import AutoProcessor

    # the CLI calibrates with prompts in the model's chat template
    samples = load_calibration("easyvqa", 8, 0, processor=AutoProcessor.from_pretrained(src))
    hessians = collect_hessians(src, samples, modules, progress=False)
    src_table = tensor_table(src)
    wins = 0
    for m in modules:
        w = read_tensor(src_table[f"{m}.weight"]).to(torch.float64)
        h = hessians[m].hessian()

        def objective(qdir):
            d = w - _dequantized(qdir, m).to(torch.float64)
            return torch.einsum("nk,kl,nl->", d, h, d).item()

        wins += objective(tmp_path / "gptq") < objective(tmp_path / "rtn")
    assert wins == len(modules), f"GPTQ beat RTN on {wins}/{len(modules)} layers"
