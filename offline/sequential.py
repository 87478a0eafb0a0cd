"""Layer-by-layer access to a llava-hf checkpoint, for the sequential (streaming) searches.

The Q-VLM search walks the language model one block of decoder layers at a time and
feeds each block the outputs of the already-quantized blocks before it. Holding the
whole float model for that is wasteful, so :class:`StreamingLlava` keeps only a
*skeleton* in memory (vision tower, projector, embeddings, final norm, ``lm_head``:
what turns samples into first-layer inputs and last-layer outputs into logits) and
reads one decoder layer at a time from the safetensors files (plain reads, no mmap),
in float32. Peak memory is then the skeleton + the layers of one block + the
calibration activations.

How the first layer's inputs are captured: the skeleton's language model holds a
single stand-in layer that records what transformers passes to decoder layer 0
(hidden states after the image features are merged, rotary position embeddings,
the causal mask) and stops the forward pass.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qvlm_kernels.checkpoint import read_config, read_tensor, tensor_table

from .capture import transformers_module_name

LAYER_PREFIX = "language_model.model.layers."


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen: list[tuple[torch.Tensor, dict]] = []

    def forward(self, hidden_states, **kwargs):
        self.seen.append((hidden_states.detach(), kwargs))
        raise _Stop


@dataclass
class LayerInputs:
    """One calibration sample at a decoder-layer boundary: hidden states + the layer's kwargs."""

    hidden: torch.Tensor  # [1, T, H]
    kwargs: dict = field(repr=False)

    @property
    def tokens(self) -> int:
        return self.hidden.shape[1]


def _layer_kwargs(kwargs: dict) -> dict:
    keep = {"attention_mask", "position_embeddings", "position_ids"}
    out = {k: v for k, v in kwargs.items() if k in keep}
    out["use_cache"] = False
    return out


class StreamingLlava:
    """A llava-hf safetensors model read one decoder layer at a time (float32, CPU)."""

    def __init__(self, model_dir: str | Path, *, attn_implementation: str = "sdpa"):
        from transformers import AutoConfig, LlavaForConditionalGeneration

        self.model_dir = Path(model_dir)
        self.table = tensor_table(self.model_dir)
        raw = read_config(self.model_dir)
        config = AutoConfig.from_pretrained(self.model_dir)
        config._attn_implementation = attn_implementation
        config.text_config._attn_implementation = attn_implementation
        config.vision_config._attn_implementation = attn_implementation
        self.config = config
        self.num_layers = int(config.text_config.num_hidden_layers)
        skel_cfg = copy.deepcopy(config)
        skel_cfg.text_config.num_hidden_layers = 1
        torch.manual_seed(0)  # skeleton init is overwritten; keep it reproducible anyway
        model = LlavaForConditionalGeneration(skel_cfg).eval()
        lm = model.model.language_model
        self._layer_cls = type(lm.layers[0])
        lm.layers = nn.ModuleList([_Catcher()])
        self.model = model
        self._load_skeleton(raw)

    # ------------------------------------------------------------------ weights

    def _load_skeleton(self, raw_config: dict) -> None:
        state = {}
        for name, info in self.table.items():
            if name.startswith(LAYER_PREFIX):
                continue
            state[transformers_module_name(name)] = read_tensor(info).to(torch.float32)
        tie = raw_config.get("tie_word_embeddings", raw_config.get("text_config", {}).get("tie_word_embeddings"))
        if "lm_head.weight" not in state and tie:
            state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"]
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not m.startswith("model.language_model.layers.")]
        if missing or unexpected:
            raise ValueError(f"{self.model_dir}: checkpoint does not match the LLaVA config "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        if tie:
            self.model.tie_weights()

    def layer_tensor_names(self, index: int) -> list[str]:
        prefix = f"{LAYER_PREFIX}{index}."
        return [n for n in self.table if n.startswith(prefix)]

    def load_layer(self, index: int) -> nn.Module:
        """Decoder layer ``index`` in float32, built from the checkpoint (not kept by this object)."""
        prefix = f"{LAYER_PREFIX}{index}."
        layer = self._layer_cls(self.config.text_config, index)
        state = {n[len(prefix):]: read_tensor(self.table[n]).to(torch.float32) for n in self.layer_tensor_names(index)}
        missing, unexpected = layer.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{self.model_dir}: decoder layer {index} tensors do not match "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        return layer.eval()

    # ------------------------------------------------------------------ activations

    @torch.no_grad()
    def first_layer_inputs(self, model_inputs: list[dict], progress: bool = False) -> list[LayerInputs]:
        """Inputs of decoder layer 0 for every sample (image features merged in)."""
        from tqdm import tqdm

        catcher = self.model.model.language_model.layers[0]
        out = []
        for inputs in tqdm(model_inputs, desc="embed", unit="sample", disable=not progress):
            inputs = {k: (v.to(torch.float32) if k == "pixel_values" else v) for k, v in inputs.items()}
            try:
                self.model(**inputs, use_cache=False)
            except _Stop:
                pass
            hidden, kwargs = catcher.seen.pop()
            out.append(LayerInputs(hidden, _layer_kwargs(kwargs)))
        return out

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last decoder layer's output -> logits (final norm + lm_head)."""
        return self.model.lm_head(self.model.model.language_model.norm(hidden))


def run_layer(layer: nn.Module, x: LayerInputs, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """One decoder layer on one sample (``hidden`` replaces ``x.hidden`` when given)."""
    h = x.hidden if hidden is None else hidden
    return layer(h, **x.kwargs)
