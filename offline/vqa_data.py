"""easy-VQA test pairs and their scoring, shared by the offline batch example, the
lm-eval task (``lm_eval_tasks/``) and the tests.

The data comes from the ``easy-vqa`` PyPI package, which ships the whole data set
(64x64 PNG images of one coloured shape each, and questions with one-word answers) inside
the wheel, so nothing is downloaded at run time. Only the **test** split is used here.

Scoring is normalized exact match on the first word: the prediction is lower-cased, its
first whitespace-separated word is taken and stripped of punctuation, and compared with
the (lower-cased) reference answer. ``"Yes, it is."`` scores for ``yes``; ``"grey"``
counts as ``gray``.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL.Image import Image

PACKAGE = "easy-vqa"

# The LLaVA-1.5 short-answer instruction (its VQAv2 evaluation prompt).
SHORT_ANSWER = "Answer the question using a single word or phrase."

_SYNONYMS = {"grey": "gray", "colour": "color"}
_PUNCT = string.punctuation + "“”‘’"


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError as e:  # pragma: no cover - exercised only without the package
        raise ModuleNotFoundError(
            f"the easy-VQA data comes from the `{PACKAGE}` package, which is not installed: "
            f"`pip install {PACKAGE}` (or `uv pip install {PACKAGE}`)"
        ) from e
    return easy_vqa


@dataclass(frozen=True)
class VQAExample:
    """One easy-VQA test question; the image is read from ``image_path`` on demand."""

    index: int  # position in the test split (questions.json order)
    image_id: int
    image_path: str
    question: str
    answer: str

    def image(self) -> Image:
        """The image as an RGB ``PIL.Image`` (fully loaded, the file is closed)."""
        from PIL import Image

        with Image.open(self.image_path) as im:
            return im.convert("RGB")

    def to_dict(self) -> dict:
        return {"index": self.index, "image_id": self.image_id, "image_path": self.image_path,
                "question": self.question, "answer": self.answer}


def load_test_examples(limit: int | None = None, offset: int = 0) -> list[VQAExample]:
    """easy-VQA test questions in the package's order, ``[offset : offset + limit]``.

    Cheap: no image is decoded (see :meth:`VQAExample.image`). Raises ModuleNotFoundError
    naming the ``easy-vqa`` package when it is missing.
    """
    ev = _easy_vqa()
    texts, answers, image_ids = ev.get_test_questions()
    paths = ev.get_test_image_paths()
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    stop = len(texts) if limit is None else min(len(texts), offset + limit)
    out = []
    for i in range(offset, stop):
        image_id = int(image_ids[i])
        if image_id not in paths:
            raise FileNotFoundError(f"easy-vqa test image {image_id} is missing from the installed package")
        out.append(VQAExample(i, image_id, paths[image_id], texts[i], answers[i]))
    return out


def load_test_pairs(limit: int | None = None, offset: int = 0) -> list[tuple[Image, str, str]]:
    """``(PIL image, question, answer)`` triples from the easy-VQA test split."""
    return [(ex.image(), ex.question, ex.answer) for ex in load_test_examples(limit, offset)]


def vqa_question(question: str, short_answer: bool = True) -> str:
    """The question text sent to the model (with the short-answer instruction by default)."""
    return f"{question}\n{SHORT_ANSWER}" if short_answer else question


def vqa_prompt(question: str, short_answer: bool = True) -> str:
    """llava-1.5 prompt with one ``<image>`` placeholder:
    ``"USER: <image>\\n{question}\\n{instruction} ASSISTANT:"``."""
    from .adapters import llava15_prompt

    return llava15_prompt(vqa_question(question, short_answer))


def normalize_answer(text: str) -> str:
    """First word of ``text``, lower-cased, without surrounding punctuation ("" if none)."""
    for word in text.lower().split():
        word = word.strip(_PUNCT)
        if word:
            return _SYNONYMS.get(word, word)
    return ""


def is_correct(prediction: str, answer: str) -> bool:
    """Normalized exact match of the prediction's first word with the reference answer."""
    return normalize_answer(prediction) == normalize_answer(answer) != ""


def accuracy(predictions: Iterable[str], answers: Iterable[str]) -> float:
    """Fraction of :func:`is_correct` pairs (0.0 for no pairs)."""
    scores = [is_correct(p, a) for p, a in zip(predictions, answers, strict=True)]
    return sum(scores) / len(scores) if scores else 0.0
