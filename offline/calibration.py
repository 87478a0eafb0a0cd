"""Calibration data for the Q-VLM search: image + text samples in the model's chat format.

Q-VLM (like GPTQ and the entropy meters in :mod:`qvlm_offline.entropy`) looks at the
activations a model produces on *representative* inputs.  For a LLaVA model these are an
image plus a chat-formatted prompt in which the ``<image>`` placeholder is expanded by the
processor into exactly as many image tokens as the vision tower yields features, followed
by an assistant answer, so that the language model sees realistic continuations too.

Sources (the ``--calib`` spec):

``easyvqa`` (or ``easyvqa:train``)
    Questions and answers from the **train** split of the ``easy-vqa`` package (the data
    ships inside the wheel).  Its test split is what :mod:`qvlm_offline.vqa_data` evaluates
    on; ``easyvqa:test`` is refused.
``jsonl:PATH``
    One JSON object per line: ``"image"`` (a path relative to the JSONL file's folder, or
    absolute; absent or ``null`` for a text-only record) and the text as one of
    ``"conversations"`` (LLaVA style: ``[{"from": "human", "value": "<image>\\n..."},
    {"from": "gpt", "value": "..."}, ...]``; ``role``/``content`` keys work too),
    ``"question"`` (+ optional ``"answer"``), or ``"text"``/``"caption"`` (a caption of the
    image: it becomes the answer to :data:`CAPTION_INSTRUCTION`; without an image it is
    used as plain text).
``folder:PATH``
    Images in a folder (not recursive) with captions: ``captions.jsonl`` (or
    ``metadata.jsonl``, the Hugging Face ``imagefolder`` name) with records
    ``{"file_name" or "image": NAME, <text as for jsonl>}``, or ``captions.csv`` with
    columns ``file_name``/``image`` and ``caption``/``text``, or else one ``NAME.txt`` per
    image (same stem).
``hf:NAME[:split]`` or ``hf:NAME:config:split``
    A Hugging Face dataset through ``datasets.load_dataset`` (imported lazily; needs the
    ``datasets`` package and the Hub or a local cache).  The split defaults to ``train``.
    Rows are read like JSONL records; the image column may hold a decoded image, an
    ``{"bytes", "path"}`` dict, a path, or a one-element ``"images"`` list.

A bare path to an existing ``.jsonl`` file or a directory is read as ``jsonl:``/``folder:``.

Calibration never touches evaluation data: splits named like ``test``, ``validation``,
``val``, ``dev`` or ``eval`` are refused (:class:`EvaluationSplitError`), and so are local
files inside the easy-vqa test folder or this package's lm-eval task data.

Subsampling is deterministic: ``random.Random(seed).sample`` over the available records
(in file / sorted-name / dataset order).  Asking for more samples than exist returns all of
them (shuffled) with a warning.  Records are validated up front (text present, image file
exists) and only the selected images are decoded; errors name the file and line (or the
image, or the dataset row).

Prompt format: with a ``processor`` that has a chat template, its template (the model's own
format); otherwise llava-1.5's ``"USER: <image>\\n{question} ASSISTANT: {answer}"``
(:func:`qvlm_offline.adapters.llava15_prompt` plus the answer), further turns appended as
``" USER: {q} ASSISTANT: {a}"``.  :func:`build_model_inputs` turns samples into per-sample
``input_ids`` / ``attention_mask`` / ``pixel_values`` tensors with the processor.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import os
import random
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qvlm_kernels.errors import QVLMError

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = [
    "CAPTION_INSTRUCTION",
    "DEFAULT_NUM_SAMPLES",
    "CalibrationError",
    "CalibrationSample",
    "EvaluationSplitError",
    "add_calibration_args",
    "build_model_inputs",
    "format_prompt",
    "is_evaluation_split",
    "load_calibration",
]

IMAGE_PLACEHOLDER = "<image>"
# The instruction a plain caption answers (LLaVA's pre-training data pairs captions with
# brief-description instructions like this one).
CAPTION_INSTRUCTION = "Describe the image briefly."
DEFAULT_SPEC = "easyvqa"
DEFAULT_NUM_SAMPLES = 128
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

_EVAL_SPLIT_NAMES = frozenset({"test", "testing", "validation", "valid", "val", "dev", "eval", "evaluation"})
_HUMAN = frozenset({"human", "user"})
_ASSISTANT = frozenset({"gpt", "assistant", "model", "bot"})
_SYSTEM = frozenset({"system"})

Turns = tuple[tuple[str, "str | None"], ...]


class CalibrationError(QVLMError, ValueError):
    """A bad calibration spec, source or record (the message names the file/line or row)."""


class EvaluationSplitError(CalibrationError):
    """The spec asks for evaluation data (a test/validation split, or eval files)."""


@dataclass(frozen=True)
class CalibrationSample:
    """One calibration sample.

    ``prompt`` is the full text fed to the model, in its chat format: exactly one image
    placeholder when ``image`` is set (none otherwise), the user turn(s) and the answer(s)
    as assistant turn(s).  ``turns`` keeps the ``(user text, answer or None)`` pairs without
    the placeholder (empty for a plain-text sample, whose ``prompt`` is the text itself), so
    a ``prompt_fn`` can reformat them.  ``source`` says where the sample came from.
    """

    image: Image | None
    prompt: str
    turns: Turns = ()
    source: str = ""

    @property
    def question(self) -> str | None:
        """The first user turn (without the image placeholder), or None for plain text."""
        return self.turns[0][0] if self.turns else None

    @property
    def answer(self) -> str | None:
        """The first assistant answer, or None."""
        return self.turns[0][1] if self.turns else None


# ----------------------------------------------------------------------------- formatting


def _image_token(processor) -> str:
    return getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER


def _llava_format(turns: Turns, has_image: bool, image_token: str) -> str:
    from .adapters import llava15_prompt

    parts = []
    for i, (question, answer) in enumerate(turns):
        if i == 0 and has_image:
            text = llava15_prompt(question).replace(IMAGE_PLACEHOLDER, image_token, 1)
        else:
            text = f"USER: {question} ASSISTANT:"
        parts.append(f"{text} {answer}" if answer else text)
    return " ".join(parts)


def format_prompt(turns: Sequence[tuple[str, str | None]], *, has_image: bool, processor=None) -> str:
    """Chat-format ``(user text, answer or None)`` turns, with one image placeholder in the
    first user turn when ``has_image``.

    Uses the processor's chat template when it has one (``apply_chat_template``; a
    generation prompt is added when the last answer is None), else llava-1.5's
    ``"USER: <image>\\n{q} ASSISTANT: {a}"``.
    """
    turns = tuple((q, a) for q, a in turns)
    if not turns:
        raise CalibrationError("a chat prompt needs at least one user turn")
    token = _image_token(processor)
    template = getattr(processor, "chat_template", None) if processor is not None else None
    if template:
        messages: list[dict[str, Any]] = []
        for i, (question, answer) in enumerate(turns):
            content: list[dict[str, Any]] = [{"type": "image"}] if i == 0 and has_image else []
            content.append({"type": "text", "text": question})
            messages.append({"role": "user", "content": content})
            if answer:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        text = _apply_template(processor, messages, token, add_generation_prompt=not turns[-1][1])
        want = 1 if has_image else 0
        if text.count(token) != want:
            raise CalibrationError(
                f"the processor's chat template produced {text.count(token)} {token!r} placeholders "
                f"(expected {want}): {text[:200]!r}"
            )
        return text
    return _llava_format(turns, has_image, token)


def _as_string_content(content: list[dict[str, Any]], token: str) -> str:
    return "".join(f"{token}\n" if c["type"] == "image" else c["text"] for c in content)


def _apply_template(processor, messages: list[dict[str, Any]], token: str, *, add_generation_prompt: bool) -> str:
    """The chat template on multimodal (list) content; for a template that takes only string
    content (a LLaVA assembled from a text LLM keeps the LLM's template), the same messages with
    the image placeholder rendered into the string, as the processor expects it."""
    try:
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as list_error:  # jinja raises TypeError, UndefinedError, TemplateError, ...
        flat = [{"role": m["role"], "content": _as_string_content(m["content"], token)} for m in messages]
        try:
            return processor.apply_chat_template(flat, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as str_error:
            raise CalibrationError(
                f"the processor's chat template renders neither list content ({type(list_error).__name__}: "
                f"{list_error}) nor string content ({type(str_error).__name__}: {str_error}); fix "
                "chat_template in the model directory (chat_template.jinja / processor or tokenizer config)"
            ) from str_error


# ----------------------------------------------------------------------------- records


def _nonempty_str(value) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _strip_placeholder(text: str) -> tuple[str, int]:
    """``text`` without ``<image>`` placeholders (and the newline next to each), and their count."""
    n = text.count(IMAGE_PLACEHOLDER)
    if n:
        text = re.sub(r"\n?<image>\n?", "\n", text).strip()
    return text, n


def _conversation_turns(conv, where: str) -> tuple[Turns, int]:
    if not isinstance(conv, list) or not conv:
        raise CalibrationError(f"{where}: 'conversations' must be a non-empty list of turns")
    turns: list[list] = []
    n_placeholders = 0
    for k, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise CalibrationError(f"{where}: conversation turn {k} is not an object")
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        role = role.lower() if isinstance(role, str) else role
        if role in _SYSTEM:
            continue
        if not _nonempty_str(value):
            raise CalibrationError(f"{where}: conversation turn {k} has no text ('value' or 'content')")
        value, n = _strip_placeholder(value)
        n_placeholders += n
        if role in _HUMAN:
            if turns and turns[-1][1] is None:
                raise CalibrationError(f"{where}: conversation turn {k}: two user turns in a row")
            if not value:
                raise CalibrationError(f"{where}: conversation turn {k} has no text besides the image")
            turns.append([value, None])
        elif role in _ASSISTANT:
            if not turns or turns[-1][1] is not None:
                raise CalibrationError(f"{where}: conversation turn {k}: an answer without a question")
            if n:
                raise CalibrationError(f"{where}: conversation turn {k}: {IMAGE_PLACEHOLDER} in an answer")
            turns[-1][1] = value
        else:
            raise CalibrationError(
                f"{where}: conversation turn {k} has role {role!r} (expected human/gpt or user/assistant)"
            )
    if not turns:
        raise CalibrationError(f"{where}: 'conversations' has no user turn")
    return tuple((q, a) for q, a in turns), n_placeholders


def _record_text(rec: dict, where: str, has_image: bool) -> tuple[Turns, str | None]:
    """``(turns, plain text)`` of a record: one of the two is set. Checks the placeholders."""
    n_placeholders = 0
    plain = None
    if rec.get("conversations") is not None:
        turns, n_placeholders = _conversation_turns(rec["conversations"], where)
    elif _nonempty_str(rec.get("question")):
        question, n_placeholders = _strip_placeholder(rec["question"])
        answer = rec.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise CalibrationError(f"{where}: 'answer' must be a string")
        turns = ((question, (answer.strip() or None) if answer else None),)
    else:
        text = _nonempty_str(rec.get("text")) or _nonempty_str(rec.get("caption"))
        if text is None:
            raise CalibrationError(
                f"{where}: no text: expected a non-empty 'text', 'caption', 'question' or 'conversations'"
            )
        text, n_placeholders = _strip_placeholder(text.strip())
        if has_image:
            turns = ((CAPTION_INSTRUCTION, text),)
        else:
            turns, plain = (), text
    if n_placeholders > 1:
        raise CalibrationError(
            f"{where}: {n_placeholders} {IMAGE_PLACEHOLDER} placeholders; one image per sample is supported"
        )
    if n_placeholders and not has_image:
        raise CalibrationError(f"{where}: the text has an {IMAGE_PLACEHOLDER} placeholder but the record has no image")
    return turns, plain


def _forbidden_dirs() -> list[Path]:
    """Local evaluation data: the easy-vqa test folder and this package's lm-eval task data."""
    dirs = [Path(__file__).resolve().parent / "lm_eval_tasks"]
    spec = importlib.util.find_spec("easy_vqa")
    if spec is not None and spec.origin:
        dirs.append(Path(spec.origin).resolve().parent / "data" / "test")
    return dirs


def _refuse_eval_path(path: Path, where: str) -> None:
    resolved = path.resolve()
    for d in _forbidden_dirs():
        if resolved == d or resolved.is_relative_to(d):
            raise EvaluationSplitError(
                f"{where}: {path} is evaluation data ({d}); calibration must not use evaluation splits"
            )


def _open_image(path: Path, where: str) -> Image:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise CalibrationError(f"{where}: image file not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise CalibrationError(f"{where}: cannot read image {path}: {e}") from e


@dataclass
class _Pending:
    """A validated record whose image is decoded only if it is selected."""

    where: str
    turns: Turns
    plain: str | None
    image_path: Path | None = None
    image_value: Any = None  # an in-memory image (hf rows)


def _make_sample(p: _Pending, processor) -> CalibrationSample:
    image = None
    if p.image_path is not None:
        image = _open_image(p.image_path, p.where)
    elif p.image_value is not None:
        image = _decode_image_value(p.image_value, p.where)
    if p.plain is not None:
        return CalibrationSample(None, p.plain, (), p.where)
    prompt = format_prompt(p.turns, has_image=image is not None, processor=processor)
    return CalibrationSample(image, prompt, p.turns, p.where)


def _subsample(n_available: int, num_samples: int, seed: int, what: str) -> list[int]:
    if n_available == 0:
        raise CalibrationError(f"{what}: no calibration samples found")
    if num_samples > n_available:
        warnings.warn(
            f"{what}: {num_samples} calibration samples requested, only {n_available} available; using all",
            stacklevel=3,
        )
    return random.Random(seed).sample(range(n_available), min(num_samples, n_available))


def _finish(pending: list[_Pending], num_samples: int, seed: int, what: str, processor) -> list[CalibrationSample]:
    return [_make_sample(pending[i], processor) for i in _subsample(len(pending), num_samples, seed, what)]


# ----------------------------------------------------------------------------- sources


def is_evaluation_split(split: str) -> bool:
    """True for split expressions that name evaluation data: ``test``, ``validation``,
    ``val``, ``dev``, ``eval`` ..., also inside ``datasets`` slices and sums
    (``"train+test"``, ``"validation[:10%]"``, ``"test_dev"``)."""
    for part in split.split("+"):
        base = re.sub(r"\[.*?\]", "", part).strip().lower()
        if (base in _EVAL_SPLIT_NAMES or base.startswith(("test", "val", "dev"))
                or "eval" in base or base.endswith(("_test", "-test", "_val", "-val"))):
            return True
    return False


def _refuse_split(split: str, what: str) -> None:
    if is_evaluation_split(split):
        raise EvaluationSplitError(
            f"{what}: split {split!r} is an evaluation split; calibration must not touch evaluation "
            "data (use a train split)"
        )


def _load_easyvqa(split: str, num_samples: int, seed: int, processor) -> list[CalibrationSample]:
    from .vqa_data import _easy_vqa, vqa_question

    _refuse_split(split, f"easyvqa:{split}")
    if split != "train":
        raise CalibrationError(f"easyvqa: unknown split {split!r}; only 'train' is used for calibration")
    ev = _easy_vqa()
    texts, answers, image_ids = ev.get_train_questions()
    paths = ev.get_train_image_paths()
    out = []
    for i in _subsample(len(texts), num_samples, seed, "easyvqa:train"):
        image_id = int(image_ids[i])
        where = f"easyvqa:train question {i} (image {image_id})"
        if image_id not in paths:
            raise CalibrationError(f"{where}: the image is missing from the installed easy-vqa package")
        path = Path(paths[image_id])
        _refuse_eval_path(path, where)
        turns = ((vqa_question(texts[i]), answers[i]),)
        image = _open_image(path, where)
        out.append(CalibrationSample(image, format_prompt(turns, has_image=True, processor=processor),
                                     turns, where))
    return out


def _resolve_image(value, base: Path, where: str) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise CalibrationError(f"{where}: 'image' must be a path string (or null for a text-only record)")
    path = Path(value)
    if not path.is_absolute():
        path = base / path
    _refuse_eval_path(path, where)
    if not path.is_file():
        raise CalibrationError(f"{where}: image file not found: {path}")
    return path


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{path}:{lineno}: invalid JSON: {e}") from e
            if not isinstance(rec, dict):
                raise CalibrationError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            records.append((lineno, rec))
    return records


def _load_jsonl(path_str: str, num_samples: int, seed: int, processor) -> list[CalibrationSample]:
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise CalibrationError(f"jsonl: file not found: {path}")
    _refuse_eval_path(path, "jsonl")
    pending = []
    for lineno, rec in _read_jsonl(path):
        where = f"{path}:{lineno}"
        image_path = _resolve_image(rec.get("image"), path.parent, where)
        turns, plain = _record_text(rec, where, image_path is not None)
        pending.append(_Pending(where, turns, plain, image_path))
    return _finish(pending, num_samples, seed, str(path), processor)


def _load_folder(path_str: str, num_samples: int, seed: int, processor) -> list[CalibrationSample]:
    folder = Path(path_str).expanduser()
    if not folder.is_dir():
        raise CalibrationError(f"folder: not a directory: {folder}")
    _refuse_eval_path(folder, "folder")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    pending: list[_Pending] = []
    index_files = [folder / n for n in ("captions.jsonl", "metadata.jsonl", "captions.csv")]
    index = next((p for p in index_files if p.is_file()), None)
    if index is not None:
        if index.suffix == ".jsonl":
            rows = _read_jsonl(index)
        else:
            with open(index, encoding="utf-8", newline="") as f:
                rows = [(lineno, row) for lineno, row in enumerate(csv.DictReader(f), 2)]
        for lineno, rec in rows:
            where = f"{index}:{lineno}"
            name = rec.get("file_name") or rec.get("image")
            if not _nonempty_str(name):
                raise CalibrationError(f"{where}: no image name ('file_name' or 'image')")
            image_path = _resolve_image(name, folder, where)
            turns, plain = _record_text(rec, where, has_image=True)
            pending.append(_Pending(where, turns, plain, image_path))
    else:
        if not images:
            raise CalibrationError(f"folder: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
        for image_path in images:
            caption_path = image_path.with_suffix(".txt")
            if not caption_path.is_file():
                raise CalibrationError(
                    f"{image_path}: no caption: expected {caption_path.name} (or a captions.jsonl/"
                    f"captions.csv in {folder})"
                )
            caption = caption_path.read_text(encoding="utf-8").strip()
            turns, plain = _record_text({"caption": caption}, str(caption_path), has_image=True)
            pending.append(_Pending(str(image_path), turns, plain, image_path))
    return _finish(pending, num_samples, seed, str(folder), processor)


def _decode_image_value(value, where: str) -> Image:
    from PIL import Image as PILImage

    if isinstance(value, list):
        if len(value) != 1:
            raise CalibrationError(f"{where}: {len(value)} images; one image per sample is supported")
        value = value[0]
    try:
        if isinstance(value, PILImage.Image):
            return value.convert("RGB")
        if isinstance(value, dict):
            if value.get("bytes"):
                with PILImage.open(io.BytesIO(value["bytes"])) as im:
                    return im.convert("RGB")
            if value.get("path"):
                return _open_image(Path(value["path"]), where)
        if isinstance(value, str):
            return _open_image(Path(value), where)
    except (OSError, ValueError) as e:
        if isinstance(e, CalibrationError):
            raise
        raise CalibrationError(f"{where}: cannot read the image: {e}") from e
    raise CalibrationError(f"{where}: unsupported image value of type {type(value).__name__}")


def _offline_hint() -> str:
    flags = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
             if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")]
    hint = "the hf: source needs access to the Hugging Face Hub (or the dataset in the local datasets cache)"
    if flags:
        hint += f"; offline mode is on ({', '.join(flags)})"
    return hint + "; for offline calibration use jsonl:PATH or folder:PATH"


def _load_hf(rest: str, num_samples: int, seed: int, processor) -> list[CalibrationSample]:
    parts = re.split(r":(?![^\[]*\])", rest)  # not the ':' of a slice such as train[:10%]
    if not parts[0]:
        raise CalibrationError("hf: missing dataset name (hf:NAME[:split] or hf:NAME:config:split)")
    if len(parts) == 1:
        name, config, split = parts[0], None, "train"
    elif len(parts) == 2:
        name, config, split = parts[0], None, parts[1] or "train"
    elif len(parts) == 3:
        name, config, split = parts[0], parts[1] or None, parts[2] or "train"
    else:
        raise CalibrationError(f"hf:{rest}: expected hf:NAME[:split] or hf:NAME:config:split")
    what = f"hf:{name}" + (f":{config}" if config else "") + f":{split}"
    _refuse_split(split, what)
    try:
        import datasets
    except ImportError as e:
        raise ModuleNotFoundError(
            f"{what}: Hugging Face datasets need the `datasets` package, which is not installed "
            "(`pip install datasets`); for offline calibration use jsonl:PATH or folder:PATH"
        ) from e
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - network, offline, missing dataset/split: all reported alike
        raise CalibrationError(f"{what}: could not load the dataset ({type(e).__name__}: {e}); {_offline_hint()}") from e
    if not hasattr(ds, "__len__") or not hasattr(ds, "__getitem__"):
        raise CalibrationError(f"{what}: expected a map-style dataset split, got {type(ds).__name__}")
    out = []
    for i in _subsample(len(ds), num_samples, seed, what):
        row = ds[int(i)]
        where = f"{what} row {i}"
        value = row.get("image")
        if value is None:
            value = row.get("images") or None
        turns, plain = _record_text(row, where, has_image=value is not None)
        out.append(_make_sample(_Pending(where, turns, plain, image_value=value), processor))
    return out


def load_calibration(spec: str, num_samples: int, seed: int = 0, processor=None) -> list[CalibrationSample]:
    """``num_samples`` calibration samples from ``spec`` (see the module docstring),
    subsampled deterministically with ``seed``.

    ``processor`` (optional, e.g. ``AutoProcessor.from_pretrained(model_dir)``) formats the
    prompts with its chat template and image token; without it the llava-1.5 format is used.
    Raises :class:`EvaluationSplitError` for evaluation data, :class:`CalibrationError` for a
    bad spec or record, ModuleNotFoundError naming a missing package (easy-vqa, datasets).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not isinstance(spec, str) or not spec.strip():
        raise CalibrationError("empty calibration spec")
    spec = spec.strip()
    kind, sep, rest = spec.partition(":")
    kind = kind.lower()
    if kind in ("easyvqa", "easy-vqa", "easy_vqa"):
        return _load_easyvqa(rest.strip().lower() or "train", num_samples, seed, processor)
    if kind == "jsonl" and sep:
        return _load_jsonl(rest, num_samples, seed, processor)
    if kind == "folder" and sep:
        return _load_folder(rest, num_samples, seed, processor)
    if kind == "hf" and sep:
        return _load_hf(rest, num_samples, seed, processor)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".jsonl":
        return _load_jsonl(spec, num_samples, seed, processor)
    if path.is_dir():
        return _load_folder(spec, num_samples, seed, processor)
    raise CalibrationError(
        f"unknown calibration spec {spec!r}: expected easyvqa, jsonl:PATH, folder:PATH or hf:NAME[:split]"
    )


# ----------------------------------------------------------------------------- model inputs


def build_model_inputs(
    samples: Sequence[CalibrationSample],
    processor,
    prompt_fn: Callable[[CalibrationSample], str] | None = None,
    *,
    chat_template_fn: Callable[[CalibrationSample], str] | None = None,
) -> list[dict]:
    """One dict of model inputs per sample, made by ``processor`` (a LLaVA processor, so
    ``<image>`` expands to exactly the number of image tokens the model expects):
    ``input_ids`` and ``attention_mask`` ``[1, L]`` and, for samples with an image,
    ``pixel_values`` ``[1, 3, H, W]`` (float32; cast to the model's dtype), plus whatever
    else the processor returns.

    The text is ``sample.prompt`` (already chat-formatted by :func:`load_calibration`,
    llava-1.5 ``"USER: <image>\\n{question} ASSISTANT: {answer}"`` by default) unless
    ``prompt_fn`` (alias ``chat_template_fn``) maps the sample to another text, e.g.
    ``lambda s: format_prompt(s.turns, has_image=s.image is not None, processor=p)``.
    The text must hold exactly one image placeholder when the sample has an image.
    """
    if prompt_fn is not None and chat_template_fn is not None:
        raise TypeError("pass prompt_fn or chat_template_fn, not both")
    fn = prompt_fn or chat_template_fn
    token = _image_token(processor)
    out = []
    for k, s in enumerate(samples):
        text = fn(s) if fn is not None else s.prompt
        where = s.source or f"sample {k}"
        n = text.count(token)
        if s.image is not None and n != 1:
            raise CalibrationError(f"{where}: the prompt has {n} {token!r} placeholders, expected exactly 1")
        if s.image is None and n:
            raise CalibrationError(f"{where}: the prompt has {token!r} but the sample has no image")
        if s.image is not None:
            enc = processor(images=[s.image], text=text, return_tensors="pt")
        else:
            enc = processor(text=text, return_tensors="pt")
        out.append(dict(enc))
    return out


def add_calibration_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--calib SPEC``, ``--num-samples N`` and ``--seed S`` (for :func:`load_calibration`)."""
    parser.add_argument(
        "--calib", default=DEFAULT_SPEC, metavar="SPEC",
        help="calibration data: easyvqa (train split), jsonl:PATH, folder:PATH or hf:NAME[:split]; "
        f"evaluation splits are refused (default: {DEFAULT_SPEC})",
    )
    parser.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES,
                        help=f"number of calibration samples (default: {DEFAULT_NUM_SAMPLES})")
    parser.add_argument("--seed", type=int, default=0, help="calibration subsampling seed (default: 0)")
    return parser
