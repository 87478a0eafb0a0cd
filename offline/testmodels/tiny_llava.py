"""A tiny LLaVA built offline, for the demo and the tests.

No model hub is reachable on the machines this project is developed on, so the demo and
the end-to-end tests need a LLaVA checkpoint that can be made from nothing.
:func:`build_tiny_llava` writes one: a CLIP vision tower, a two-layer MLP projector and a
Llama language model, all with random weights drawn deterministically from a seed, plus a
word-level tokenizer, a llava-1.5 style chat template, the image/processor configs and a
generation config.  The directory loads with ``transformers``
(``LlavaForConditionalGeneration.from_pretrained`` + ``AutoProcessor.from_pretrained``)
and with ``vllm.LLM(model=out_dir)``.

What it gets right (the traps, see ENVIRONMENT.md):

* ``model.safetensors`` is written by hand in the **hub layout** (``language_model.model.*``,
  ``language_model.lm_head.weight``, ``vision_tower.vision_model.*``,
  ``multi_modal_projector.*``), not with transformers 5's ``save_pretrained``, whose
  ``vision_tower.*`` names vLLM cannot load.
* ``LlavaProcessor`` is saved with ``vision_feature_select_strategy="default"`` and
  ``num_additional_image_tokens=1`` (the CLIP CLS token), so ``<image>`` expands to
  ``(image_size // patch_size) ** 2`` tokens, the number of features the model inserts.
* The weights are scaled so that next-token distributions are peaked (a typical top-1 /
  top-2 logit gap of several nats): greedy decoding is then stable across dtypes and
  backends, which the comparison tests rely on.  Special and padding tokens get
  near-zero ``lm_head`` rows, so the model never emits them (generation always runs to
  ``max_tokens``).

What it does not do: it is not trained and its answers are meaningless; it says nothing
about the accuracy of a real LLaVA.  It is a functional fixture (shapes, names, loaders,
kernels, quantized-vs-float agreement), not a benchmark model.  Its tokenizer knows only a
few hundred words (others map to ``<unk>``) and is case-sensitive.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from ..adapters import llava15_prompt

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
UNK, BOS, EOS, PAD, IMAGE = range(5)

# llava-1.5 style: "USER: <image>\n{question} ASSISTANT:"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_CHAT_WORDS = ["USER", "ASSISTANT", "SYSTEM", ":", "?", ".", ",", "!", "'", "-"]

_VQA_WORDS = """
what What shape is Is in the The image color colour does Does contain a A there There
not circle rectangle triangle square red green blue yellow black gray grey teal brown
white orange purple pink yes Yes no No of this This it It are Are which Which how How
many one two three shapes picture photo kind type
""".split()

_COMMON_WORDS = """
and to that for you he was on with as his they be at have from or had by but some we can
out other were all your when up use word said an each she do their time if will way about
then them would write like so these her long make thing see him has look more day could go
come did my sound most number who over know water than call first people may down side
been now find any new work part take get place made live where after back little only
round man year came show every good me give our under name very through just form much
great think say help low line before turn cause same mean differ move right boy old too
tell sentence set want air well also play small end put home read hand port large spell
add even land here must big high such follow act why ask men change went light off need
house try us again animal point mother world near build self earth father head stand own
page should country found answer school grow study still learn plant cover food sun four
thought let keep eye never last door between city tree cross since hard start might story
saw far sea draw left late run while press close night real life few stop open seem
together next begin got walk example ease paper often always music those both mark book
letter until mile river car feet care second group carry took rain eat room friend began
idea fish mountain north once base hear horse cut sure watch face wood main enough plain
girl usual young ready above ever list though feel talk bird soon body dog family direct
pose leave song measure state product top bottom center middle corner edge background
""".split()


def _vocabulary(extra_words=()) -> list[str]:
    """Special tokens first (fixed ids 0..4), then unique words, padded to a multiple of 32."""
    words: list[str] = []
    seen = set(SPECIAL_TOKENS)
    for w in [*_CHAT_WORDS, *_VQA_WORDS, *_COMMON_WORDS, *extra_words]:
        if w not in seen:
            seen.add(w)
            words.append(w)
    vocab = SPECIAL_TOKENS + words
    # Every linear's output width a multiple of 32, lm_head included.
    n_pad = (-len(vocab)) % 32
    vocab += [f"<reserved_{i}>" for i in range(n_pad)]
    return vocab


def _build_tokenizer(vocab: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        add_bos_token=True,
        add_eos_token=False,
        padding_side="left",
        model_max_length=2048,
        chat_template=CHAT_TEMPLATE,
    )


def save_processor(out: Path, tokenizer, *, image_size: int, patch_size: int, vision_model: str = "clip",
                   chat_template: str | None = None) -> None:
    """Write a LlavaProcessor (the tiny word-level tokenizer + a CLIP or SigLIP image processor) to ``out``."""
    from transformers import CLIPImageProcessor, LlavaProcessor, SiglipImageProcessor

    template = chat_template or CHAT_TEMPLATE
    if chat_template:
        tokenizer.chat_template = chat_template
    image_processor = SiglipImageProcessor(
        do_resize=True, size={"height": image_size, "width": image_size}, do_rescale=True, do_normalize=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True,
    ) if vision_model == "siglip" else CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default" if vision_model == "clip" else "full",
        num_additional_image_tokens=1 if vision_model == "clip" else 0,
        image_token="<image>",
        chat_template=template,
    )
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Also the pre-transformers-5 file layout: a standalone preprocessor_config.json and a
    # tokenizer class name that every transformers version knows.
    image_processor.save_pretrained(out)
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")


def tiny_tokenizer(extra_words=()):
    """The tiny word-level tokenizer (``<image>`` is id ``IMAGE``)."""
    return _build_tokenizer(_vocabulary(extra_words))


def hub_name(name: str) -> str:
    """transformers 5 parameter name -> llava-hf hub checkpoint name (what vLLM loads)."""
    from ..adapters import adapter_of

    hub = adapter_of("LlavaForConditionalGeneration").hub_name(name)
    if hub == name:
        raise ValueError(f"unexpected LLaVA parameter name {name!r}")
    return hub


def _init_weights(model, seed: int, text_std: float, vision_std: float, lm_head_std: float,
                  n_real_tokens: int, row_sigma: float) -> None:
    """Deterministic random init, independent of transformers' own initializers."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: (kv[0] == "lm_head.weight", kv[0])):
            is_vision = "vision_tower" in name
            std = vision_std if is_vision else text_std
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name or "layrnorm" in name:  # LayerNorm / RMSNorm
                if leaf == "weight":
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            elif leaf == "bias":
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            elif name == "lm_head.weight":
                w = lm_head_std * torch.randn(p.shape, generator=gen)
                # Log-normal row norms: the logits get a heavy upper tail, so the top-1 logit
                # usually stands well clear of the top-2 (greedy decoding is not tie-prone).
                w *= torch.exp(row_sigma * torch.randn(p.shape[0], 1, generator=gen))
                # Special and reserved tokens: near-zero rows (never the argmax, but not
                # exactly zero, so per-channel quantizer scales stay well-defined).
                w[:5] *= 1e-3
                w[n_real_tokens:] *= 1e-3
                p.copy_(w)
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))


TEXT_MODELS = ("llama", "mistral", "qwen2")  # text models a tiny LLaVA can be assembled from


def build_tiny_llava(
    out_dir,
    *,
    text_hidden: int = 256,
    text_intermediate: int = 704,
    text_layers: int = 2,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    vision_hidden: int = 128,
    vision_intermediate: int = 512,
    vision_layers: int = 2,
    vision_heads: int = 4,
    image_size: int = 64,
    patch_size: int = 16,
    extra_words=(),
    dtype: str = "bfloat16",
    seed: int = 0,
    text_std: float = 0.1,
    vision_std: float = 0.05,
    lm_head_std: float = 0.06,
    lm_head_row_sigma: float = 1.0,
    text_model: str = "llama",
    vision_model: str = "clip",
    chat_template: str | None = None,
) -> Path:
    """Build a random-weight LLaVA and write a complete model directory to ``out_dir``.

    The defaults make every linear's input and output width a multiple of 32 (the vocabulary
    is padded to a multiple of 32 too).  ``text_intermediate`` may be anything (e.g. 688).
    Weights are drawn from ``torch.Generator().manual_seed(seed)``: same arguments, same bytes.
    ``text_std`` / ``vision_std`` are the weight standard deviations (norms: 1 + 0.1 noise);
    ``lm_head_std`` scales the logits and ``lm_head_row_sigma`` (log-normal spread of the
    ``lm_head`` row norms) makes the next-token distributions peaked: with the defaults the
    median top-1/top-2 logit gap over greedy steps is a few nats.  ``extra_words`` are added
    to the tokenizer's vocabulary.  ``text_model``: ``llama``, ``mistral`` or ``qwen2`` (q/k/v
    biases) — a LLaVA assembled from that LLM; ``vision_model``: ``clip`` (a CLS token, features
    from the second-to-last layer without it) or ``siglip`` (no CLS token: every patch, no
    pooling head). ``chat_template`` replaces the llava-1.5 template (e.g. a text LLM's
    string-only one). Returns ``Path(out_dir)``.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import (
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    if image_size % patch_size:
        raise ValueError("image_size must be a multiple of patch_size")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    vocab = _vocabulary(extra_words)
    n_real = sum(1 for w in vocab if not w.startswith("<reserved_"))
    tokenizer = _build_tokenizer(vocab)
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE

    n_patches = (image_size // patch_size) ** 2
    vision_config = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    from transformers import MistralConfig, Qwen2Config

    if text_model not in TEXT_MODELS or vision_model not in ("clip", "siglip"):
        raise ValueError(f"text_model must be one of {TEXT_MODELS} and vision_model clip or siglip")
    if vision_model == "siglip":
        from transformers import SiglipVisionConfig

        vision_config = SiglipVisionConfig(
            hidden_size=vision_hidden, intermediate_size=vision_intermediate, num_hidden_layers=vision_layers,
            num_attention_heads=vision_heads, image_size=image_size, patch_size=patch_size,
            vision_use_head=False, layer_norm_eps=1e-6,
        )
    extra_text = {"sliding_window": None} if text_model == "mistral" else {}
    text_cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[text_model]
    text_config = text_cls(**extra_text,
        vocab_size=len(vocab),
        hidden_size=text_hidden,
        intermediate_size=text_intermediate,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads,
        head_dim=text_hidden // text_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=IMAGE,
        image_seq_length=n_patches,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default" if vision_model == "clip" else "full",
        vision_feature_layer=-2,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
        pad_token_id=PAD,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = dtype

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    _init_weights(model, seed, text_std, vision_std, lm_head_std, n_real, lm_head_row_sigma)

    torch_dtype = getattr(torch, dtype)
    state = {}
    for name, t in model.state_dict().items():
        state[hub_name(name)] = t.detach().to(torch_dtype).contiguous().clone()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    config.save_pretrained(out)
    GenerationConfig(
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, do_sample=False
    ).save_pretrained(out)

    save_processor(out, tokenizer, image_size=image_size, patch_size=patch_size, vision_model=vision_model,
                   chat_template=chat_template)

    readme = (
        "Tiny random-weight LLaVA built offline by qvlm_offline.testmodels.tiny_llava.build_tiny_llava "
        f"(text {text_model}, vision {vision_model}, seed={seed}). For tests and demos only: its answers are meaningless.\n"
    )
    (out / "README.md").write_text(readme)
    return out


# ----------------------------------------------------------------------------- prompts

SHAPES = ["circle", "rectangle", "triangle"]
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "black": (10, 10, 10),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (140, 80, 20),
}


def _draw_shape(shape: str, color, image_size: int, rng: random.Random):
    from PIL import Image, ImageDraw

    bg = tuple(rng.randint(200, 255) for _ in range(3))
    img = Image.new("RGB", (image_size, image_size), bg)
    d = ImageDraw.Draw(img)
    s = image_size
    r = rng.uniform(0.2, 0.35) * s
    cx, cy = rng.uniform(r, s - r), rng.uniform(r, s - r)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "rectangle":
        w, h = r * rng.uniform(0.7, 1.0), r * rng.uniform(0.5, 1.0)
        d.rectangle([cx - w, cy - h, cx + w, cy + h], fill=color)
    else:
        a = rng.uniform(0, 2 * math.pi)
        pts = [(cx + r * math.cos(a + k * 2 * math.pi / 3),
                cy + r * math.sin(a + k * 2 * math.pi / 3)) for k in range(3)]
        d.polygon(pts, fill=color)
    return img


def tiny_prompts(n: int, image_size: int = 64, seed: int = 0):
    """``n`` deterministic (PIL image, question) pairs: one coloured shape per image and an
    easy-VQA style question about it (every word is in the tiny tokenizer's vocabulary)."""
    rng = random.Random(seed)
    color_names = list(COLORS)
    out = []
    for i in range(n):
        shape = rng.choice(SHAPES)
        color = rng.choice(color_names)
        img = _draw_shape(shape, COLORS[color], image_size, rng)
        kind = i % 4
        if kind == 0:
            q = "What shape is in the image?"
        elif kind == 1:
            q = "What color is the shape?"
        elif kind == 2:
            q = f"Does the image contain a {rng.choice(SHAPES)}?"
        else:
            q = f"Is there a {rng.choice(color_names)} shape in the image?"
        out.append((img, q))
    return out


llava_prompt = llava15_prompt  # the tiny model's chat template renders the same text

