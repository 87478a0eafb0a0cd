"""Data loading and scoring for the qvlm lm-eval tasks (``lm_eval --include_path`` this dir).

Both data sets load without network access: easy-VQA from the installed ``easy-vqa``
package (via :mod:`qvlm_offline.vqa_data`), the text corpus from ``corpus.jsonl`` next to
this file. lm-eval calls ``custom_dataset`` functions with the task's metadata (and any
``--metadata``) as keyword arguments; they are ignored here.
"""

from __future__ import annotations

import json
from pathlib import Path

from qvlm_offline import vqa_data

CORPUS = Path(__file__).with_name("corpus.jsonl")


def load_easyvqa(**_metadata):
    """The easy-VQA test split as ``{"test": datasets.Dataset}`` (image paths, not pixels)."""
    import datasets

    rows = [ex.to_dict() for ex in vqa_data.load_test_examples()]
    return {"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)}


def doc_to_image(doc) -> list:
    """One RGB ``PIL.Image`` per document (lm-eval's vLLM-VLM model expects a list)."""
    fields = ("index", "image_id", "image_path", "question", "answer")
    return [vqa_data.VQAExample(**{k: doc[k] for k in fields}).image()]


def doc_to_text(doc) -> str:
    """llava-1.5 prompt with lm-eval's ``<image>`` placeholder and the short-answer instruction."""
    return vqa_data.vqa_prompt(doc["question"])


def process_vqa_results(doc, results) -> dict:
    return {"exact_match": float(vqa_data.is_correct(results[0], doc["answer"]))}


def load_text_corpus(**_metadata):
    """``corpus.jsonl`` (one ``{"text": ...}`` per line) as ``{"test": datasets.Dataset}``."""
    import datasets

    rows = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)}
