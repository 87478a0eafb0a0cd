"""Calibration capture: Hessians of linear-layer inputs from image+text samples.

Runs the float model (transformers' LLaVA) on processor-built calibration inputs
once and accumulates ``2/n X^T X`` for every linear the export will quantize,
for GPTQ. This is the whole-model variant: it holds the float model plus one
``K x K`` float64 matrix per quantized linear, which suits small and mid-size
models; the layer-by-layer streaming pipeline of the Q-VLM search is separate.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from .gptq import HessianAccumulator

_HUB_TO_TRANSFORMERS = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head", "lm_head"),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def transformers_module_name(hub_name: str) -> str:
    """llava-hf checkpoint module name -> module name in transformers 5's LlavaForConditionalGeneration."""
    for old, new in _HUB_TO_TRANSFORMERS:
        if hub_name.startswith(old):
            return new + hub_name[len(old):]
    return hub_name


def collect_hessians(
    model_dir: str | Path, samples, modules: list[str], *, progress: bool = True
) -> dict[str, HessianAccumulator]:
    """Run ``samples`` (CalibrationSample list) through the float model; Hessians per module."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from .calibration import build_model_inputs

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    named = dict(model.named_modules())
    accumulators, hooks = {}, []
    for m in modules:
        target = named.get(transformers_module_name(m))
        if target is None:
            raise KeyError(f"{model_dir}: module {m!r} not found in the transformers model")
        acc = HessianAccumulator(target.in_features)
        hooks.append(acc.register(target))
        accumulators[m] = acc
    try:
        with torch.no_grad():
            for inputs in tqdm(build_model_inputs(samples, processor), desc="calibrate", unit="sample",
                               disable=not progress):
                model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return accumulators
