"""Layer-by-layer access to a VLM checkpoint, for the sequential (streaming) pipeline.

The Q-VLM search walks the language model one block of decoder layers at a time and
feeds each block the outputs of the already-quantized blocks before it. Holding the
whole float model for that is wasteful, so :class:`StreamingModel` keeps only a
*skeleton* in memory (vision tower, projector, embeddings, final norm, ``lm_head``:
what turns samples into first-layer inputs and last-layer outputs into logits) and
reads one decoder layer at a time from the safetensors files (plain reads, no mmap),
in float32, onto the run's device (:class:`~qvlm_offline.placement.Placement`). After
the first layer's inputs are captured, :meth:`StreamingModel.release_input_side` frees
the weights only the capture needs (vision tower, projector, token embeddings). Peak
memory is then the larger of the capture (the skeleton) and of the block phase: final
norm + ``lm_head`` + the layers of one block + the calibration activations. Module names
come from the checkpoint's :class:`~qvlm_offline.adapters.ModelAdapter` (any supported
family).

Where things live: a sample's hidden states are kept in the placement's activation
store (host memory, or the device when they fit); its layer kwargs (rotary embeddings,
mask: small next to the hidden states) on the device. :func:`run_layer` moves a stored
hidden state to the device in float32.

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
import torch.nn.functional as F
from torch import nn

from qvlm_kernels.checkpoint import SAFETENSORS_DTYPES, read_config, read_tensor, tensor_table
from qvlm_kernels.format import FormatError

from .adapters import ModelAdapter, UnsupportedModelError, adapter_for
from .placement import Placement


class StoredLinear(nn.Linear):
    """An ``nn.Linear`` whose weight stays in the checkpoint's 16-bit dtype: cast per call to
    the input's dtype (the autocast dtype under autocast), so it computes exactly what the
    float32 weight would, from half the memory. Setting a float32 weight makes it a plain linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x, self.weight.to(dtype), bias)


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

    hidden: torch.Tensor  # [1, T, H], in the activation store
    kwargs: dict = field(repr=False)  # on the device
    device: torch.device = field(default=torch.device("cpu"), repr=False)  # where the layers run

    @property
    def tokens(self) -> int:
        return self.hidden.shape[1]


def _layer_kwargs(kwargs: dict) -> dict:
    keep = {"attention_mask", "position_embeddings", "position_ids"}
    out = {k: v for k, v in kwargs.items() if k in keep}
    out["use_cache"] = False
    return out


class StreamingModel:
    """A safetensors VLM checkpoint read one decoder layer at a time (float32, on ``placement.device``)."""

    def __init__(self, model_dir: str | Path, *, adapter: ModelAdapter | None = None,
                 attn_implementation: str = "sdpa", placement: Placement | None = None):
        from transformers import AutoConfig

        self.placement = placement or Placement(torch.device("cpu"))
        self.model_dir = Path(model_dir)
        self.table = tensor_table(self.model_dir)
        raw = read_config(self.model_dir)
        self.adapter = adapter or adapter_for(self.model_dir, config=raw, tensor_names=self.table)
        config = AutoConfig.from_pretrained(self.model_dir)
        config._attn_implementation = attn_implementation
        for sub in ("text_config", "vision_config"):
            if getattr(config, sub, None) is not None:
                getattr(config, sub)._attn_implementation = attn_implementation
        self.config = config
        text = config.get_text_config()
        self.text_config = text
        self.num_layers = int(text.num_hidden_layers)
        layer_types = getattr(text, "layer_types", None)
        if layer_types and len(set(layer_types)) > 1:  # the catcher records layer 0's mask only
            raise UnsupportedModelError(f"{self.model_dir}: decoder layers of different attention types "
                                        f"{sorted(set(layer_types))} are not supported by the streaming pipeline")
        skel_cfg = copy.deepcopy(config)
        skel_cfg.get_text_config().num_hidden_layers = 1
        torch.manual_seed(0)  # skeleton init is overwritten; keep it reproducible anyway
        model = self.adapter.model_class()(skel_cfg).eval()
        lm = model.get_submodule(self.adapter.language_model)
        self._layer_cls = type(lm.layers[0])
        lm.layers = nn.ModuleList([_Catcher()])
        self.model = model
        self._load_skeleton(raw)
        self.model.to(self.placement.device)

    @property
    def language_model(self) -> nn.Module:
        return self.model.get_submodule(self.adapter.language_model)

    # ------------------------------------------------------------------ weights

    def _load_skeleton(self, raw_config: dict) -> None:
        """Copy the checkpoint's non-layer tensors into the skeleton one at a time (peak: the
        skeleton + one tensor, not the skeleton twice as a state dict would hold it)."""
        ad = self.adapter
        layers = f"{ad.layout.text}layers."
        targets = self.model.state_dict(keep_vars=True)
        loaded, unexpected = self._copy_in(targets, {ad.transformers_name(n): (n, info) for n, info in self.table.items()
                                                     if not n.startswith(layers)})
        text_raw = raw_config.get("text_config") or {}
        tie = raw_config.get("tie_word_embeddings", text_raw.get("tie_word_embeddings"))
        if tie:
            self.model.tie_weights()
            loaded.add("lm_head.weight")
        missing = [m for m in targets if m not in loaded and not m.startswith(f"{ad.language_model}.layers.")]
        if missing or unexpected:
            raise FormatError(f"{self.model_dir}: checkpoint does not match the {ad.family.name} config "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")

    def _copy_in(self, targets: dict, tensors: dict) -> tuple[set[str], list[str]]:
        """Copy ``tensors`` (module name -> (checkpoint name, info)) into ``targets`` (a state dict
        with ``keep_vars``) one at a time; returns (loaded names, names without a target)."""
        loaded, unexpected = set(), []
        with torch.no_grad():
            for tname, (name, info) in tensors.items():
                target = targets.get(tname)
                if target is None:
                    unexpected.append(tname)
                    continue
                if tuple(target.shape) != tuple(info.shape):
                    raise FormatError(f"{self.model_dir}: tensor {name!r} has shape {list(info.shape)}, the "
                                      f"{self.adapter.family.name} config expects {list(target.shape)}")
                target.copy_(read_tensor(info))
                loaded.add(tname)
        return loaded, unexpected

    def layer_tensor_names(self, index: int) -> list[str]:
        prefix = f"{self.adapter.layer_prefix(index)}."
        return [n for n in self.table if n.startswith(prefix)]

    def load_layer(self, index: int, *, stored_linears: bool = False) -> nn.Module:
        """Decoder layer ``index`` in float32, built from the checkpoint (not kept by this object;
        filled one tensor at a time: peak the layer + one tensor).

        ``stored_linears``: the linear weights keep the checkpoint's 16-bit dtype and compute in
        float32 (:class:`StoredLinear`: the same outputs as float32 weights, half the memory);
        for passes that only read the float layer (GPTQ's Hessians)."""
        prefix = f"{self.adapter.layer_prefix(index)}."
        layer = self._layer_cls(self.text_config, index)
        if stored_linears:
            for name, lin in layer.named_modules():
                info = self.table.get(f"{prefix}{name}.weight")
                if type(lin) is nn.Linear and info is not None and info.dtype in ("BF16", "F16"):
                    lin.__class__ = StoredLinear  # same state, a forward that upcasts
                    lin.weight.data = torch.empty(lin.weight.shape, dtype=SAFETENSORS_DTYPES[info.dtype])
        targets = layer.state_dict(keep_vars=True)
        loaded, unexpected = self._copy_in(targets, {n[len(prefix):]: (n, self.table[n])
                                                     for n in self.layer_tensor_names(index)})
        missing = [m for m in targets if m not in loaded]
        if missing or unexpected:
            raise FormatError(f"{self.model_dir}: decoder layer {index} tensors do not match "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        return layer.eval().to(self.placement.device)

    def release_input_side(self, keep_head: bool = True) -> int:
        """Free every skeleton weight but the final norm's and ``lm_head``'s (tied embeddings stay
        as ``lm_head``; ``keep_head=False``: those too); returns the bytes freed. After it only
        layers and (with the head kept) :meth:`head` work."""
        lm = self.language_model
        keep = {id(p) for m in (self.model.lm_head, lm.norm) for p in m.parameters()} if keep_head else set()
        freed = 0
        for p in self.model.parameters():
            if id(p) not in keep and p.numel():
                freed += p.numel() * p.element_size()
                p.data = p.data.new_empty(0)
        return freed

    # ------------------------------------------------------------------ activations

    @torch.no_grad()
    def first_layer_inputs(self, model_inputs: list[dict], progress: bool = False) -> list[LayerInputs]:
        """Inputs of decoder layer 0 for every sample (image features merged in); hidden states stored."""
        from tqdm import tqdm

        P = self.placement
        catcher = self.language_model.layers[0]
        out = []
        for inputs in tqdm(model_inputs, desc="embed", unit="sample", disable=not progress):
            inputs = {k: (v.to(torch.float32) if torch.is_floating_point(v) else v) for k, v in inputs.items()}
            try:
                self.model(**P.to_device(inputs), use_cache=False)
            except _Stop:
                pass
            hidden, kwargs = catcher.seen.pop()
            out.append(LayerInputs(P.store(hidden), _layer_kwargs(kwargs), P.device))
        return out

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last decoder layer's output (stored or computed) -> logits (final norm + lm_head) on the device."""
        h = hidden.to(self.placement.device, torch.float32)
        return self.model.lm_head(self.language_model.norm(h))


def run_layer(layer: nn.Module, x: LayerInputs, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """One decoder layer on one sample (``hidden`` replaces ``x.hidden`` when given), on the
    layers' device; a stored hidden state is moved there in float32."""
    h = x.hidden if hidden is None else hidden
    h = h.to(x.device, torch.float32, non_blocking=True)
    return layer(h, **x.kwargs)
