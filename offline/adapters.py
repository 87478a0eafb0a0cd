"""Model families: where each supported architecture keeps its parts, in one place.

Everything else in the pipeline (capture, entropy, partition, GPTQ, the block search,
export, compare) asks an adapter and never spells a module name itself. For each
family a :class:`Family` says:

* which ``architectures`` (config.json) and transformers class it is;
* the **on-disk layouts** (hub names) its checkpoints come in — llava-hf's original
  ``language_model.model.layers.N`` and the names transformers >= 4.52 saves
  (``model.language_model.layers.N``), Qwen's ``model.layers.N`` / ``visual.*`` — and
  how each maps to transformers 5's in-memory module names;
* where the vision side lives on disk (tower, projector/merger, ``image_newline``), which
  of its linears ``--quantize-vision`` may quantize, and the visual-stage module (the
  projector the search may tune);
* which processor outputs run along the tokens besides ``input_ids`` (Qwen2-VL's
  ``mm_token_type_ids``, the source of its M-RoPE positions), so tokens can be appended
  to a processed prompt (:meth:`ModelAdapter.append_text_tokens`, for teacher forcing);
* the decoder layer: its linears, which of them read the same input (q/k/v; gate/up)
  and the norm or linear that produces that input (for smoothing folds). Every
  supported text model (Llama, Mistral, Qwen2, Qwen2-VL's text model) has the same
  Llama-style decoder layer, so one :data:`LLAMA_STYLE_LAYER` serves them all; the text
  ``model_type`` is checked against the supported ones.

:func:`adapter_for` reads a checkpoint's config.json and tensor names and returns a
:class:`ModelAdapter`: the family bound to the layout that checkpoint uses. An
unsupported architecture or text model raises :class:`UnsupportedModelError` naming it
and the supported ones.

What this module does not do: build processor inputs (the family's processor does the
image tiling: LLaVA's fixed grid, LLaVA-NeXT/OneVision anyres tiles, Qwen2-VL's dynamic
resolution, all through ``processor(text=..., images=...)``; see
:mod:`qvlm_offline.calibration`), or know vLLM's names (vLLM maps hub names itself with
each model's ``hf_to_vllm_mapper``, which the plugin applies to the quantization config).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from qvlm_kernels.checkpoint import read_config, tensor_table
from qvlm_kernels.errors import QVLMError


class UnsupportedModelError(QVLMError, ValueError):
    """A checkpoint whose architecture (or text model, or layout) no adapter covers."""


# ----------------------------------------------------------------------------- the decoder layer


@dataclass(frozen=True)
class InputGroup:
    """Linears of a decoder layer that read the same input, and what produces that input.

    ``norm`` (a normalisation whose weight scales the input per channel) or ``producer``
    (a linear whose output rows are the input's channels) is where a per-channel
    smoothing factor folds; the group's linears take its inverse on their input columns.
    """

    key: str
    linears: tuple[str, ...]
    norm: str | None = None
    producer: str | None = None


@dataclass(frozen=True)
class DecoderLayout:
    """Module names inside one decoder layer (relative to the layer)."""

    linears: tuple[str, ...]
    groups: tuple[InputGroup, ...]
    norms: tuple[str, ...]  # every norm a smoothing fold may change

    def group(self, key: str) -> InputGroup:
        return next(g for g in self.groups if g.key == key)


LLAMA_STYLE_LAYER = DecoderLayout(
    linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    groups=(
        InputGroup("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), norm="input_layernorm"),
        InputGroup("gate_up", ("mlp.gate_proj", "mlp.up_proj"), norm="post_attention_layernorm"),
        InputGroup("down", ("mlp.down_proj",), producer="mlp.up_proj"),
    ),
    norms=("input_layernorm", "post_attention_layernorm"),
)

# text config model_type -> decoder layout (all Llama-style; q/k/v biases, as Qwen2 has, stay 16-bit)
TEXT_MODELS = {
    "llama": LLAMA_STYLE_LAYER,
    "mistral": LLAMA_STYLE_LAYER,
    "qwen2": LLAMA_STYLE_LAYER,
    "qwen2_vl_text": LLAMA_STYLE_LAYER,
    "qwen2_5_vl_text": LLAMA_STYLE_LAYER,
}


# ----------------------------------------------------------------------------- families and layouts


@dataclass(frozen=True)
class HubLayout:
    """One naming of a family's checkpoint on disk.

    ``text``: prefix of the text model (``{text}layers.N.``, ``{text}embed_tokens``,
    ``{text}norm``); ``lm_head``: the output head's module name; ``vision``: prefixes of
    everything on the vision side (tower, projector or merger, ``image_newline``);
    ``to_transformers``: ordered (hub prefix, transformers 5 prefix) renames, first match wins.
    """

    name: str
    text: str
    lm_head: str
    vision: tuple[str, ...]
    to_transformers: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    model_class: str  # transformers class name
    layouts: tuple[HubLayout, ...]
    vision_linear: str  # regex on hub names with the layout's vision prefixes stripped of "model."
    projector: str  # visual-stage module: hub prefix (layout's first vision-side naming, no "model.")
    quantize_vision_ok: bool = True  # --quantize-vision supported (CLIP/SigLIP towers)
    vision_kind: str = "CLIP/SigLIP tower + projector"
    # processor outputs besides input_ids that run along the token axis, with the value a
    # text token takes in them (for appending tokens: see ModelAdapter.append_text_tokens)
    token_inputs: tuple[tuple[str, int], ...] = (("attention_mask", 1),)
    # quantized and served end to end by the tests (tests/test_families.py: vLLM with the
    # plugin against transformers on the dequantized weights); the others warn at quantize
    verified: bool = False


def _llava_layouts() -> tuple[HubLayout, ...]:
    return (
        HubLayout(
            "llava-hf", text="language_model.model.", lm_head="language_model.lm_head",
            vision=("vision_tower.", "multi_modal_projector.", "image_newline"),
            to_transformers=(
                ("language_model.model.", "model.language_model."),
                ("language_model.lm_head", "lm_head"),
                ("vision_tower.vision_model.", "model.vision_tower."),
                ("multi_modal_projector.", "model.multi_modal_projector."),
                ("image_newline", "model.image_newline"),
            ),
        ),
        HubLayout(
            "transformers>=4.52", text="model.language_model.", lm_head="lm_head",
            vision=("model.vision_tower.", "model.multi_modal_projector.", "model.image_newline"),
            to_transformers=(("model.vision_tower.vision_model.", "model.vision_tower."),),
        ),
    )


def _qwen_vl_layouts() -> tuple[HubLayout, ...]:
    return (
        HubLayout(
            "qwen", text="model.", lm_head="lm_head", vision=("visual.",),
            to_transformers=(("model.", "model.language_model."), ("visual.", "model.visual.")),
        ),
        HubLayout("transformers>=4.52", text="model.language_model.", lm_head="lm_head",
                  vision=("model.visual.",), to_transformers=()),
    )


_LLAVA_VISION = (r"(vision_tower\.(vision_model\.)?encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
                 r"|multi_modal_projector\.linear_[12])")

# Qwen2-VL's processor marks each token as text (0), image (1) or video (2) in mm_token_type_ids,
# from which transformers computes the M-RoPE positions (get_rope_index): a sequence extended
# without extending it fails there (an IndexError on the mask shape).
_QWEN_VL_TOKEN_INPUTS = (("attention_mask", 1), ("mm_token_type_ids", 0))

FAMILIES: tuple[Family, ...] = (
    Family("llava", ("LlavaForConditionalGeneration",), "LlavaForConditionalGeneration", _llava_layouts(),
           _LLAVA_VISION, "multi_modal_projector.", verified=True),
    Family("llava-next", ("LlavaNextForConditionalGeneration",), "LlavaNextForConditionalGeneration",
           _llava_layouts(), _LLAVA_VISION, "multi_modal_projector.", verified=True),
    # vLLM 0.32 builds OneVision's projector from plain nn.Linear (no quantization config reaches it)
    Family("llava-onevision", ("LlavaOnevisionForConditionalGeneration",), "LlavaOnevisionForConditionalGeneration",
           _llava_layouts(), _LLAVA_VISION, "multi_modal_projector.", quantize_vision_ok=False,
           vision_kind="SigLIP tower + a projector vLLM does not quantize", verified=True),
    Family("qwen2-vl", ("Qwen2VLForConditionalGeneration",), "Qwen2VLForConditionalGeneration",
           _qwen_vl_layouts(), r"visual\.merger\.mlp\.[02]", "visual.merger.", quantize_vision_ok=False,
           vision_kind="Qwen2-VL vision transformer + merger", token_inputs=_QWEN_VL_TOKEN_INPUTS, verified=True),
    Family("qwen2.5-vl", ("Qwen2_5_VLForConditionalGeneration",), "Qwen2_5_VLForConditionalGeneration",
           _qwen_vl_layouts(), r"visual\.merger\.mlp\.[02]", "visual.merger.", quantize_vision_ok=False,
           vision_kind="Qwen2.5-VL vision transformer + merger", token_inputs=_QWEN_VL_TOKEN_INPUTS, verified=True),
)

_BY_ARCH = {arch: fam for fam in FAMILIES for arch in fam.architectures}


def supported_architectures() -> list[str]:
    return sorted(_BY_ARCH)


# ----------------------------------------------------------------------------- a family bound to a checkpoint


@dataclass(frozen=True)
class ModelAdapter:
    """A family bound to one checkpoint's on-disk layout: every module name the pipeline needs."""

    family: Family
    layout: HubLayout
    decoder: DecoderLayout
    num_layers: int
    text_model_type: str

    # ---- names on disk
    def layer_prefix(self, index: int) -> str:
        return f"{self.layout.text}layers.{index}"

    @property
    def layer_prefixes(self) -> list[str]:
        return [self.layer_prefix(i) for i in range(self.num_layers)]

    def decoder_linears(self, index: int) -> list[str]:
        return [f"{self.layer_prefix(index)}.{n}" for n in self.decoder.linears]

    @property
    def embed_tokens(self) -> str:
        return f"{self.layout.text}embed_tokens.weight"

    @property
    def projector(self) -> str:
        """Hub prefix of the visual-stage module (LLaVA's projector, Qwen2-VL's merger)."""
        return self._vision_prefix() + self.family.projector

    def _vision_prefix(self) -> str:
        return "model." if self.layout.vision[0].startswith("model.") else ""

    def is_decoder_linear(self, module: str) -> bool:
        m = re.fullmatch(re.escape(self.layout.text) + r"layers\.(\d+)\.(.+)", module)
        return m is not None and m.group(2) in self.decoder.linears

    def is_vision_linear(self, module: str) -> bool:
        return re.fullmatch(re.escape(self._vision_prefix()) + self.family.vision_linear, module) is not None

    def is_lm_head(self, module: str) -> bool:
        return module == self.layout.lm_head

    def is_vision(self, name: str) -> bool:
        return name.startswith(self.layout.vision)

    def wants_quantization(self, module: str, quantize_vision: bool, quantize_lm_head: bool) -> bool:
        if self.is_decoder_linear(module):
            return True
        if self.is_vision_linear(module):
            return quantize_vision
        return quantize_lm_head and self.is_lm_head(module)

    # ---- ignore patterns of the quantization config. One pattern serves every reader: the hub
    # names of both layouts, vLLM's names (``vision_tower.``, ``visual.``, ``language_model.lm_head``)
    # and transformers 5's (``model.vision_tower.``, ``model.visual.``, ``lm_head``).
    @property
    def ignore_vision(self) -> list[str]:
        out = []
        for p in self.layout.vision:
            p = p.removeprefix("model.")
            if not p.endswith("image_newline"):
                out.append("re:^(model\\.)?" + re.escape(p))
        return out

    @property
    def ignore_lm_head(self) -> list[str]:
        return ["re:^(language_model\\.)?lm_head$"]

    def check_quantize_vision(self, quantize_vision: bool) -> None:
        if quantize_vision and not self.family.quantize_vision_ok:
            raise UnsupportedModelError(
                f"--quantize-vision: the {self.family.name} vision side ({self.family.vision_kind}) is not "
                f"quantized by this version (supported for CLIP/SigLIP towers: "
                f"{', '.join(f.name for f in FAMILIES if f.quantize_vision_ok)})")

    # ---- transformers
    def transformers_name(self, hub_name: str) -> str:
        """Checkpoint tensor/module name -> transformers 5's in-memory name."""
        for old, new in self.layout.to_transformers:
            if hub_name.startswith(old):
                return new + hub_name[len(old):]
        return hub_name

    def hub_name(self, transformers_name: str) -> str:
        """Inverse of :meth:`transformers_name` (for builders writing checkpoints in this layout)."""
        for old, new in self.layout.to_transformers:
            if transformers_name.startswith(new):
                return old + transformers_name[len(new):]
        return transformers_name

    def append_text_tokens(self, inputs: dict, tokens) -> dict:
        """``inputs`` (one sequence from the family's processor) with text ``tokens`` appended:
        ``input_ids`` and every per-token processor output of the family extended (a
        teacher-forced forward over prompt + answer sees the positions generation saw; for
        Qwen2-VL the M-RoPE positions of the appended tokens continue as text). A per-token
        output this family does not name is refused rather than left short."""
        import torch

        ids = inputs["input_ids"]
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"append_text_tokens: one sequence expected, input_ids has shape {tuple(ids.shape)}")
        new = torch.as_tensor(list(tokens), dtype=ids.dtype).reshape(1, -1)
        fill = dict(self.family.token_inputs)
        out = dict(inputs)
        out["input_ids"] = torch.cat([ids, new], dim=1)
        for key, value in inputs.items():
            if key == "input_ids" or not isinstance(value, torch.Tensor):
                continue
            if key in fill:
                out[key] = torch.cat([value, value.new_full(new.shape, fill[key])], dim=1)
            elif value.shape == ids.shape:
                raise UnsupportedModelError(
                    f"{self.family.name}: processor output {key!r} runs along the tokens (shape "
                    f"{tuple(value.shape)}) and the adapter does not say how to extend it")
        return out

    def model_class(self):
        import transformers

        return getattr(transformers, self.family.model_class)

    # in-memory module paths shared by every supported family in transformers 5
    language_model = "model.language_model"

    @property
    def projector_module(self) -> str:
        return self.transformers_name(self.projector).rstrip(".")


def llava15_prompt(question: str) -> str:
    """llava-1.5's chat prompt with exactly one ``<image>`` placeholder (the format of a LLaVA
    processor without a chat template; vLLM's ``LLM.generate({"prompt": ..., "multi_modal_data": ...})``)."""
    return f"USER: <image>\n{question} ASSISTANT:"


def family_for(config: dict, where: str = "config.json") -> Family:
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in _BY_ARCH:
            return _BY_ARCH[arch]
    raise UnsupportedModelError(
        f"{where}: architecture {', '.join(archs) or '(none given)'} is not supported; "
        f"supported: {', '.join(supported_architectures())}")


def adapter_of(architecture: str, layout: str | None = None, *, text_model_type: str = "llama",
               num_layers: int = 0) -> ModelAdapter:
    """An adapter without a checkpoint (for builders that write one): the family's first layout unless named."""
    family = family_for({"architectures": [architecture]}, "architecture")
    lay = family.layouts[0] if layout is None else next(lay for lay in family.layouts if lay.name == layout)
    return ModelAdapter(family, lay, TEXT_MODELS[text_model_type], num_layers, text_model_type)


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config  # Qwen2-VL's hub config.json is flat


def _text_model_type(family: Family, config: dict) -> str:
    if family.name.startswith("qwen"):
        return {"qwen2-vl": "qwen2_vl_text", "qwen2.5-vl": "qwen2_5_vl_text"}[family.name]
    return (config.get("text_config") or {}).get("model_type", "llama")  # no text_config: LLaVA's Llama default


def adapter_for(src: str | Path, *, config: dict | None = None, tensor_names=None) -> ModelAdapter:
    """The adapter of the checkpoint in ``src`` (its config.json and tensor names)."""
    src = Path(src)
    config = read_config(src) if config is None else config
    where = str(src / "config.json")
    family = family_for(config, where)
    mt = _text_model_type(family, config)
    if mt not in TEXT_MODELS:
        raise UnsupportedModelError(
            f"{where}: {family.name} with a {mt!r} text model is not supported; supported text models: "
            f"{', '.join(sorted(m for m in TEXT_MODELS if not m.endswith('_text')))}")
    names = list(tensor_table(src)) if tensor_names is None else list(tensor_names)
    for layout in family.layouts:
        if any(n.startswith(f"{layout.text}layers.0.") for n in names):
            break
    else:
        raise UnsupportedModelError(
            f"{src}: no decoder layers found under any {family.name} layout "
            f"({', '.join(repr(lay.text + 'layers.0.') for lay in family.layouts)}); first tensors: {names[:3]}")
    num_layers = int(_text_config(config).get("num_hidden_layers", 0))
    return ModelAdapter(family, layout, TEXT_MODELS[mt], num_layers, mt)
