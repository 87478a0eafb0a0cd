"""Tiny random-weight checkpoints of each LLaVA-style family, in the hub layout.

:func:`build_tiny_family` writes a complete model directory (``model.safetensors``,
``config.json``, ``generation_config.json``, tokenizer, processor, chat template) for one
(family, text, vision) combination of :data:`FAMILIES`.  Like
:func:`qvlm_offline.testmodels.tiny_llava.build_tiny_llava` (whose word-level vocabulary and tokenizer
it imports), the weights are random, drawn deterministically from ``seed`` and scaled so
next-token distributions are peaked (greedy decoding is stable across dtypes and backends;
special tokens get near-zero ``lm_head`` rows and are never emitted).  The tensors are
written by hand under the names the **hub** checkpoints use -- the names vLLM 0.32's
loaders map (``hf_to_vllm_mapper``) and transformers 5's checkpoint conversion mapping
(``transformers.conversion_mapping``) renames on load -- not with transformers 5's
``save_pretrained`` names.  Every directory loads with
``AutoModelForImageTextToText.from_pretrained`` (no missing or unexpected keys),
``AutoProcessor.from_pretrained`` (offline) and ``vllm.LLM(model=dir)``.

Defaults: text hidden 128 (intermediate 352), 2 decoder layers, head_dim 32 (vLLM's CPU
attention supports head sizes 32, 64, 80, ...; ``hidden_size`` must be a multiple of 32),
vision width 64 with 2 layers (vLLM builds 1 of them for CLIP, see below), a vocabulary of
384 tokens (416 for Qwen, padded to a multiple of 32).  ``hidden_size=96`` or ``160`` gives
a text width that is not a multiple of 128 and, unless ``intermediate_size`` is given, an
MLP width ``2 * hidden + 16`` (208 / 336) that is not a multiple of 32, so partial
quantization groups are exercised.  Weights are stored in bfloat16 by default.

Families (``FAMILIES`` lists the valid combinations, the first per family is its default):

``llava`` -- ``LlavaForConditionalGeneration`` (``model_type`` "llava"); text ``llama``
  (llava-1.5), ``mistral`` or ``qwen2`` (q/k/v biases; llava-interleave-qwen), vision
  ``clip`` or ``siglip``.  Hub layout::

      language_model.model.embed_tokens.weight
      language_model.model.layers.{i}.self_attn.{q,k,v,o}_proj.weight   (+ q/k/v .bias for qwen2)
      language_model.model.layers.{i}.mlp.{gate,up,down}_proj.weight
      language_model.model.layers.{i}.{input,post_attention}_layernorm.weight
      language_model.model.norm.weight
      language_model.lm_head.weight
      vision_tower.vision_model.embeddings.{patch_embedding,position_embedding}.*  (+ class_embedding, pre_layrnorm for CLIP)
      vision_tower.vision_model.encoder.layers.{j}.self_attn.{q,k,v,out}_proj.*
      vision_tower.vision_model.encoder.layers.{j}.mlp.fc{1,2}.*
      vision_tower.vision_model.encoder.layers.{j}.layer_norm{1,2}.*
      vision_tower.vision_model.post_layernorm.*
      multi_modal_projector.linear_{1,2}.{weight,bias}

  Processor ``LlavaProcessor`` (``CLIPImageProcessor`` / ``SiglipImageProcessor``),
  placeholder ``<image>`` (one per image in the prompt, expanded by the processor).
  CLIP: ``vision_feature_layer=-2``, ``vision_feature_select_strategy="default"``,
  ``num_additional_image_tokens=1`` (the CLS token, dropped), ``(32/8)**2 = 16`` image
  tokens.  SigLIP (no CLS token, ``vision_use_head=False`` as in the llava-interleave and
  onevision hub configs): ``vision_feature_layer=-1``, strategy ``"full"``,
  ``num_additional_image_tokens=0``, 16 image tokens.  (With "default" both transformers
  and vLLM would drop one real SigLIP patch.)

``llava_next`` -- ``LlavaNextForConditionalGeneration`` ("llava_next"); text ``mistral``
  (llava-v1.6-mistral) or ``llama``, vision ``clip``.  The llava layout above plus the
  top-level ``image_newline`` tensor (text-hidden wide).  Processor ``LlavaNextProcessor``
  + ``LlavaNextImageProcessor`` with ``image_grid_pinpoints`` [[32, 64], [64, 32],
  [64, 64]] over 32x32 tiles (anyres: a 56x56 image is tiled 2x2 and gives
  16 (base) + 8*8 + 8 (newlines) = 88 tokens); placeholder ``<image>``.

``llava_onevision`` -- ``LlavaOnevisionForConditionalGeneration`` ("llava_onevision");
  text ``qwen2``, vision ``siglip``.  Same layout as llava_next (``image_newline``
  included).  Processor ``LlavaOnevisionProcessor`` + ``LlavaOnevisionImageProcessor``
  (pinpoints [[32, 32], [32, 64], [64, 32], [64, 64]], ``anyres_max_9``) +
  ``LlavaOnevisionVideoProcessor``; placeholders ``<image>`` and ``<video>``.

``qwen2_vl`` -- ``Qwen2VLForConditionalGeneration`` ("qwen2_vl"); text ``qwen2`` with
  M-RoPE (``rope_parameters.mrope_section``), its own vision transformer ``qwen2_vl``.
  Hub layout (Qwen/Qwen2-VL-*-Instruct)::

      model.embed_tokens.weight
      model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}, .o_proj.weight
      model.layers.{i}.mlp.{gate,up,down}_proj.weight
      model.layers.{i}.{input,post_attention}_layernorm.weight
      model.norm.weight
      lm_head.weight
      visual.patch_embed.proj.weight                 (Conv3d, no bias)
      visual.blocks.{j}.norm{1,2}.{weight,bias}      (LayerNorm)
      visual.blocks.{j}.attn.qkv.{weight,bias}       (fused q/k/v)
      visual.blocks.{j}.attn.proj.{weight,bias}
      visual.blocks.{j}.mlp.fc{1,2}.{weight,bias}
      visual.merger.ln_q.{weight,bias}
      visual.merger.mlp.{0,2}.{weight,bias}          (patch merger, 2x2 patches -> text hidden)

  Processor ``Qwen2VLProcessor`` + ``Qwen2VLImageProcessor`` (patch 14, temporal patch 2,
  merge 2, ``min_pixels = 56*56``, ``max_pixels = 112*112``: a 56x56 image is 4x4
  patches, 4 image tokens) + ``Qwen2VLVideoProcessor``.  Tokens ``<|vision_start|>``,
  ``<|image_pad|>`` (the placeholder the processor expands), ``<|vision_end|>``,
  ``<|video_pad|>``, ``<|im_start|>``, ``<|im_end|>``; prompt
  ``<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\\n<|im_start|>assistant\\n``.

``qwen2_5_vl`` -- ``Qwen2_5_VLForConditionalGeneration`` ("qwen2_5_vl"); as qwen2_vl
  but the Qwen2.5 vision transformer: RMSNorm ``visual.blocks.{j}.norm{1,2}.weight``,
  gated MLP ``visual.blocks.{j}.mlp.{gate,up,down}_proj.{weight,bias}``, window
  attention (``fullatt_block_indexes`` [1]), merger ``visual.merger.ln_q.weight``
  (RMSNorm) + ``visual.merger.mlp.{0,2}``.  Processor ``Qwen2_5_VLProcessor`` (same
  image processor and tokens).

vLLM 0.32 module names of the linears a quant_config can replace (``LinearBase``, listed
from the loaded models by tests/test_tiny_families.py; vLLM maps hub names onto them with
each class's ``hf_to_vllm_mapper`` and fuses q/k/v -> ``qkv_proj``, gate/up ->
``gate_up_proj``):

* all llava families: ``language_model.model.layers.{i}.self_attn.qkv_proj`` / ``.o_proj``,
  ``language_model.model.layers.{i}.mlp.gate_up_proj`` / ``.down_proj``,
  ``language_model.lm_head`` (ParallelLMHead),
  ``vision_tower.vision_model.encoder.layers.{j}.self_attn.qkv_proj`` / ``.out_proj``,
  ``vision_tower.vision_model.encoder.layers.{j}.mlp.fc1`` / ``.fc2``;
  ``multi_modal_projector.linear_{1,2}`` for llava and llava_next only -- vLLM's
  ``LlavaOnevisionMultiModalProjector`` is two plain ``torch.nn.Linear`` (no quant_config
  reaches them: a onevision projector must stay float).  With ``vision_feature_layer=-2``
  (CLIP) vLLM builds only the vision layers it uses (here layer 0 of 2) and skips the last
  layer's and ``post_layernorm``'s checkpoint tensors; SigLIP (-1) builds all layers.
* qwen2_vl: ``language_model.model.layers.{i}.*`` as above, ``language_model.lm_head``,
  ``visual.blocks.{j}.attn.qkv`` / ``.attn.proj``, ``visual.blocks.{j}.mlp.fc1`` / ``.fc2``,
  ``visual.merger.mlp.0`` / ``.2`` (vision names are the hub names).
* qwen2_5_vl: as qwen2_vl but ``visual.blocks.{j}.mlp.gate_up_proj`` / ``.down_proj``.

``string_only_template=True`` writes a text-LLM style chat template
(``message['role'] + ': ' + message['content']``) that fails on list content with
``TypeError: can only concatenate str (not "list") to str`` -- what a LLaVA assembled
from a text LLM's tokenizer does to calibration code that passes OpenAI-style messages.

Like tiny_llava: meaningless answers, a functional fixture only.
"""

from __future__ import annotations

import json
from pathlib import Path

from .tiny_llava import BOS, EOS, IMAGE, PAD, _build_tokenizer, _vocabulary
from .tiny_llava import CHAT_TEMPLATE as LLAVA_CHAT_TEMPLATE

# (family, text, vision); the first row of each family is its default.
FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("llava", "llama", "clip"),
    ("llava", "mistral", "clip"),
    ("llava", "qwen2", "clip"),
    ("llava", "llama", "siglip"),
    ("llava", "mistral", "siglip"),
    ("llava", "qwen2", "siglip"),
    ("llava_next", "mistral", "clip"),
    ("llava_next", "llama", "clip"),
    ("llava_onevision", "qwen2", "siglip"),
    ("qwen2_vl", "qwen2", "qwen2_vl"),
    ("qwen2_5_vl", "qwen2", "qwen2_5_vl"),
)

ARCHITECTURES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}

QWEN_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>"]
QWEN_WORDS = ["user", "assistant", "system"]
VIDEO_TOKEN = "<video>"

# ChatML with Qwen2-VL's vision block, no default system message.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A text LLM's template: string content only (list content -> TypeError in jinja's `+`).
STRING_ONLY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'].upper() + ': ' + message['content'] + ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Vision geometry (small on purpose: a vLLM-CPU load and a forward take seconds).
LLAVA_IMAGE_SIZE, LLAVA_PATCH = 32, 8
NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64]]
ONEVISION_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL = 14, 2, 2
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 56 * 56, 112 * 112
VISION_HIDDEN, VISION_INTERMEDIATE, VISION_HEADS = 64, 256, 2
HEAD_DIM = 32


def family_defaults(family: str) -> tuple[str, str]:
    """The default (text, vision) of ``family``."""
    for f, t, v in FAMILIES:
        if f == family:
            return t, v
    raise ValueError(f"unknown family {family!r}; known: {sorted(ARCHITECTURES)}")


def family_prompt(family: str, question: str) -> str:
    """The chat prompt with one image placeholder, as the family's template renders
    ``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]``
    with ``add_generation_prompt=True``."""
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return (f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n"
                "<|im_start|>assistant\n")
    return f"USER: <image>\n{question} ASSISTANT:"


def placeholder_token(family: str) -> str:
    return "<|image_pad|>" if family in ("qwen2_vl", "qwen2_5_vl") else "<image>"


def _hub_name(family: str, name: str) -> str:
    """transformers 5 parameter name -> hub checkpoint name."""
    if family in ("qwen2_vl", "qwen2_5_vl"):
        if name == "lm_head.weight":
            return name
        if name.startswith("model.language_model."):
            return "model." + name[len("model.language_model."):]
        if name.startswith("model.visual."):
            return "visual." + name[len("model.visual."):]
        raise ValueError(f"unexpected {family} parameter name {name!r}")
    from .tiny_llava import hub_name

    if name == "model.image_newline":
        return "image_newline"
    return hub_name(name)


def _init_weights(model, seed: int, special_ids, n_real: int, text_std: float, vision_std: float,
                  lm_head_std: float, row_sigma: float) -> None:
    """tiny_llava's recipe: N(0, std) weights, norms 1 + 0.1 noise, biases 0.02, a log-normal
    spread of lm_head row norms (peaked logits), near-zero lm_head rows for special and
    reserved tokens.  Norm layers are found by module type (Qwen's merger norm is ``ln_q``)."""
    import torch

    norm_params = set()
    for mname, mod in model.named_modules():
        if "Norm" in type(mod).__name__:
            for pname, _ in mod.named_parameters(recurse=False):
                norm_params.add(f"{mname}.{pname}" if mname else pname)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: (kv[0] == "lm_head.weight", kv[0])):
            is_vision = "vision_tower" in name or "visual" in name
            std = vision_std if is_vision else text_std
            leaf = name.rsplit(".", 1)[-1]
            if name in norm_params:
                if leaf == "bias":
                    p.copy_(0.02 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif leaf == "bias":
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            elif name == "lm_head.weight":
                w = lm_head_std * torch.randn(p.shape, generator=gen)
                w *= torch.exp(row_sigma * torch.randn(p.shape[0], 1, generator=gen))
                w[list(special_ids)] *= 1e-3
                w[n_real:] *= 1e-3
                p.copy_(w)
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))


def _text_config(text: str, family: str, vocab_size: int, hidden: int, intermediate: int):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if hidden % HEAD_DIM:
        raise ValueError(f"hidden_size must be a multiple of {HEAD_DIM} (vLLM CPU attention head sizes)")
    heads = hidden // HEAD_DIM
    kv_heads = heads // 2 if heads % 2 == 0 else 1
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                  bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        from transformers import Qwen2_5_VLTextConfig, Qwen2VLTextConfig

        half = HEAD_DIM // 2
        section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]  # 32 -> [4, 6, 6]
        cls = Qwen2VLTextConfig if family == "qwen2_vl" else Qwen2_5_VLTextConfig
        return cls(**common, rms_norm_eps=1e-6, use_sliding_window=False, max_window_layers=2,
                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section})
    if text == "llama":
        return LlamaConfig(**common, head_dim=HEAD_DIM, rms_norm_eps=1e-5)
    if text == "mistral":
        return MistralConfig(**common, head_dim=HEAD_DIM, rms_norm_eps=1e-5, sliding_window=None)
    if text == "qwen2":  # q/k/v biases are built in
        return Qwen2Config(**common, rms_norm_eps=1e-6, use_sliding_window=False, max_window_layers=2,
                           rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    raise ValueError(f"unknown text model {text!r}")


def _vision_config(vision: str, family: str, text_hidden: int):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    if vision == "clip":
        return CLIPVisionConfig(hidden_size=VISION_HIDDEN, intermediate_size=VISION_INTERMEDIATE, num_hidden_layers=2,
                                num_attention_heads=VISION_HEADS, image_size=LLAVA_IMAGE_SIZE, patch_size=LLAVA_PATCH,
                                projection_dim=VISION_HIDDEN, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    if vision == "siglip":
        cfg = SiglipVisionConfig(hidden_size=VISION_HIDDEN, intermediate_size=VISION_INTERMEDIATE,
                                 num_hidden_layers=2, num_attention_heads=VISION_HEADS, image_size=LLAVA_IMAGE_SIZE,
                                 patch_size=LLAVA_PATCH, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
        cfg.vision_use_head = False  # as in the llava-interleave / llava-onevision hub configs
        return cfg
    if vision == "qwen2_vl":
        from transformers import Qwen2VLVisionConfig

        return Qwen2VLVisionConfig(depth=2, embed_dim=VISION_HIDDEN, hidden_size=text_hidden, mlp_ratio=4,
                                   num_heads=VISION_HEADS, patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE,
                                   temporal_patch_size=QWEN_TEMPORAL, hidden_act="quick_gelu")
    if vision == "qwen2_5_vl":
        from transformers import Qwen2_5_VLVisionConfig

        return Qwen2_5_VLVisionConfig(depth=2, hidden_size=VISION_HIDDEN, intermediate_size=160,
                                      num_heads=VISION_HEADS, out_hidden_size=text_hidden, patch_size=QWEN_PATCH,
                                      spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL,
                                      window_size=112, fullatt_block_indexes=[1], tokens_per_second=2,
                                      hidden_act="silu")
    raise ValueError(f"unknown vision tower {vision!r}")


def _processor(family: str, vision: str, tokenizer, chat_template: str):
    import transformers as tf

    if family == "llava":
        if vision == "clip":
            ip = tf.CLIPImageProcessor(
                do_resize=True, size={"shortest_edge": LLAVA_IMAGE_SIZE}, do_center_crop=True,
                crop_size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE}, do_rescale=True,
                do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)
            strategy, extra = "default", 1
        else:
            ip = tf.SiglipImageProcessor(
                do_resize=True, size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE}, do_rescale=True,
                do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True)
            strategy, extra = "full", 0
        proc = tf.LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=LLAVA_PATCH,
                                 vision_feature_select_strategy=strategy, num_additional_image_tokens=extra,
                                 image_token="<image>", chat_template=chat_template)
    elif family == "llava_next":
        ip = tf.LlavaNextImageProcessor(
            do_resize=True, size={"shortest_edge": LLAVA_IMAGE_SIZE}, do_center_crop=True,
            crop_size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE}, image_grid_pinpoints=NEXT_PINPOINTS,
            image_mean=CLIP_MEAN, image_std=CLIP_STD, do_pad=True, do_convert_rgb=True)
        proc = tf.LlavaNextProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=LLAVA_PATCH,
                                     vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                     image_token="<image>", chat_template=chat_template)
    elif family == "llava_onevision":
        size = {"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE}
        ip = tf.LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=ONEVISION_PINPOINTS,
                                             image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_pad=True,
                                             do_convert_rgb=True)
        vp = tf.LlavaOnevisionVideoProcessor(size=size, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        proc = tf.LlavaOnevisionProcessor(image_processor=ip, tokenizer=tokenizer, video_processor=vp,
                                          num_image_tokens=(LLAVA_IMAGE_SIZE // LLAVA_PATCH) ** 2,
                                          vision_feature_select_strategy="full", image_token="<image>",
                                          video_token=VIDEO_TOKEN, vision_aspect_ratio="anyres_max_9",
                                          chat_template=chat_template)
    else:
        kw = dict(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS, patch_size=QWEN_PATCH,
                  temporal_patch_size=QWEN_TEMPORAL, merge_size=QWEN_MERGE, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                  size={"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS})
        ip = tf.Qwen2VLImageProcessor(**kw)
        vp = tf.Qwen2VLVideoProcessor(**kw)
        cls = tf.Qwen2VLProcessor if family == "qwen2_vl" else tf.Qwen2_5_VLProcessor
        proc = cls(image_processor=ip, tokenizer=tokenizer, video_processor=vp, chat_template=chat_template)
    return proc


def build_tiny_family(
    out_dir,
    family: str,
    *,
    text: str | None = None,
    vision: str | None = None,
    seed: int = 0,
    hidden_size: int | None = None,
    string_only_template: bool = False,
    intermediate_size: int | None = None,
    dtype: str = "bfloat16",
    text_std: float = 0.1,
    vision_std: float = 0.07,
    lm_head_std: float | None = None,
    lm_head_row_sigma: float = 1.0,
) -> Path:
    """Write a tiny random-weight ``family`` checkpoint (hub tensor names, processor, chat
    template, generation config) to ``out_dir`` and return ``Path(out_dir)``.

    ``text`` / ``vision`` default to the family's first row in :data:`FAMILIES`; the
    combination must be listed there.  ``hidden_size`` (default 128, a multiple of 32) is the
    text width; ``intermediate_size`` defaults to 352 at width 128 and ``2 * hidden + 16``
    otherwise (96 -> 208, 160 -> 336: not multiples of 32).  ``lm_head_std`` defaults to
    ``0.06 * sqrt(256 / hidden)`` (tiny_llava's logit scale at its width 256).  Same
    arguments, same bytes.
    """
    import torch
    import transformers as tf
    from safetensors.torch import save_file
    from tokenizers import AddedToken

    dt, dv = family_defaults(family)
    text, vision = text or dt, vision or dv
    if (family, text, vision) not in FAMILIES:
        valid = [(t, v) for f, t, v in FAMILIES if f == family]
        raise ValueError(f"{family} does not come with text={text!r}, vision={vision!r}; valid: {valid}")
    hidden = hidden_size or 128
    if intermediate_size is None:
        intermediate_size = 352 if hidden == 128 else 2 * hidden + 16
    if lm_head_std is None:
        lm_head_std = 0.06 * (256 / hidden) ** 0.5
    qwen = family in ("qwen2_vl", "qwen2_5_vl")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    extra_special = QWEN_TOKENS if qwen else [VIDEO_TOKEN] if family == "llava_onevision" else []
    vocab = _vocabulary([*extra_special, *(QWEN_WORDS if qwen else [])])
    n_real = sum(1 for w in vocab if not w.startswith("<reserved_"))
    tokenizer = _build_tokenizer(vocab)
    if extra_special:
        tokenizer.add_tokens([AddedToken(w, special=True, normalized=False) for w in extra_special],
                             special_tokens=True)
    ids = {w: tokenizer.convert_tokens_to_ids(w) for w in extra_special}
    assert all(ids[w] == vocab.index(w) for w in extra_special) and len(tokenizer) == len(vocab)
    if qwen:
        tokenizer.image_token = "<|image_pad|>"
        tokenizer.video_token = "<|video_pad|>"
        tokenizer.vision_start_token = "<|vision_start|>"
        tokenizer.vision_end_token = "<|vision_end|>"
    elif family == "llava_onevision":
        tokenizer.video_token = VIDEO_TOKEN
    chat_template = (STRING_ONLY_CHAT_TEMPLATE if string_only_template
                     else QWEN_CHAT_TEMPLATE if qwen else LLAVA_CHAT_TEMPLATE)
    tokenizer.chat_template = chat_template
    special_ids = sorted({0, 1, 2, 3, 4, *ids.values()})

    text_config = _text_config(text, family, len(vocab), hidden, intermediate_size)
    vision_config = _vision_config(vision, family, hidden)
    if family == "llava":
        config = tf.LlavaConfig(
            vision_config=vision_config, text_config=text_config, image_token_index=IMAGE,
            image_seq_length=(LLAVA_IMAGE_SIZE // LLAVA_PATCH) ** 2, projector_hidden_act="gelu",
            vision_feature_select_strategy="default" if vision == "clip" else "full",
            vision_feature_layer=-2 if vision == "clip" else -1, multimodal_projector_bias=True,
            tie_word_embeddings=False)
    elif family == "llava_next":
        config = tf.LlavaNextConfig(
            vision_config=vision_config, text_config=text_config, image_token_index=IMAGE,
            projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2,
            multimodal_projector_bias=True, tie_word_embeddings=False, image_grid_pinpoints=NEXT_PINPOINTS,
            image_seq_length=(LLAVA_IMAGE_SIZE // LLAVA_PATCH) ** 2)
    elif family == "llava_onevision":
        config = tf.LlavaOnevisionConfig(
            vision_config=vision_config, text_config=text_config, image_token_index=IMAGE,
            video_token_index=ids[VIDEO_TOKEN], projector_hidden_act="gelu", vision_feature_select_strategy="full",
            vision_feature_layer=-1, multimodal_projector_bias=True, tie_word_embeddings=False,
            image_grid_pinpoints=ONEVISION_PINPOINTS, vision_aspect_ratio="anyres_max_9")
    else:
        cls = tf.Qwen2VLConfig if family == "qwen2_vl" else tf.Qwen2_5_VLConfig
        config = cls(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                     image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                     vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                     tie_word_embeddings=False)
    config.architectures = [ARCHITECTURES[family]]
    config.dtype = dtype
    if hasattr(config, "pad_token_id"):
        config.pad_token_id = PAD

    torch.manual_seed(seed)
    model = getattr(tf, ARCHITECTURES[family])(config).eval()
    _init_weights(model, seed, special_ids, n_real, text_std, vision_std, lm_head_std, lm_head_row_sigma)

    torch_dtype = getattr(torch, dtype)
    state = {}
    for name, t in model.state_dict().items():
        state[_hub_name(family, name)] = t.detach().to(torch_dtype).contiguous().clone()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    config.save_pretrained(out)
    tf.GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, do_sample=False).save_pretrained(out)

    processor = _processor(family, vision, tokenizer, chat_template)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.image_processor.save_pretrained(out)  # standalone preprocessor_config.json as well
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")

    (out / "README.md").write_text(
        f"Tiny random-weight {family} ({text} + {vision}) built offline by "
        f"qvlm_offline.testmodels.tiny_families.build_tiny_family (seed={seed}, hidden={hidden}). "
        "For tests only: its answers are meaningless.\n")
    return out
