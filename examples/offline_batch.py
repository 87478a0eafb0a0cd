"""Offline batch VQA with vLLM: easy-VQA test questions through ``vllm.LLM.generate``.

Every (image, question) pair of the easy-VQA test split (or a slice, ``--offset`` /
``--limit``) is sent to the model with the llava-1.5 prompt, greedy decoding; one JSON
line per question is written to ``--out`` (``question``, ``answer``, ``prediction``,
``correct``, plus ``index`` and ``image_id``), and the accuracy (first-word exact match,
see ``qvlm_offline.vqa_data``) is printed at the end.

    pip install easy-vqa        # the data set ships inside this package: no download
    qvlm demo --workdir qvlm-demo            # or any llava-hf / qvlm model directory
    python examples/offline_batch.py --model qvlm-demo/tiny-llava-w4a16 --limit 200 --out preds.jsonl

``--quantization auto`` (the default) reads the method from the model's ``config.json``
(``qvlm`` for checkpoints written by ``qvlm quantize``, none for unquantized models).
The tiny demo model has random weights: its accuracy is meaningless (chance is ~0.5 on
the yes/no questions, which it need not reach); use a real LLaVA for numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from qvlm_offline.tools.evaluate import QUANTIZATION_CHOICES, offline_engine_env, resolve_quantization
from qvlm_offline.vqa_data import is_correct, load_test_examples, vqa_prompt


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Answer easy-VQA test questions with vllm.LLM.generate; "
                                "write predictions as JSONL and print the accuracy.")
    p.add_argument("--model", type=Path, required=True, help="model directory (qvlm checkpoint or llava-hf model)")
    p.add_argument("--quantization", choices=QUANTIZATION_CHOICES, default="auto",
                   help="auto = from config.json (default), qvlm = force the qvlm plugin, none = unquantized")
    p.add_argument("--limit", type=int, default=None, help="number of test questions (default: all 9,673)")
    p.add_argument("--offset", type=int, default=0, help="first test question (default: 0)")
    p.add_argument("--out", type=Path, default=Path("easyvqa_predictions.jsonl"),
                   help="JSONL output path (default: easyvqa_predictions.jsonl)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="questions per LLM.generate call; the progress bar moves per batch (default: 256)")
    p.add_argument("--max-tokens", type=int, default=8, help="most generated tokens per answer (default: 8)")
    p.add_argument("--max-model-len", type=int, default=2048,
                   help="vLLM context length, image tokens included (default: 2048)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="most sequences vLLM runs at once (default: vLLM's)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="activation dtype (default: auto, the model's)")
    p.add_argument("--no-short-answer", action="store_true",
                   help="omit the 'Answer the question using a single word or phrase.' instruction")
    p.add_argument("--seed", type=int, default=0, help="vLLM seed (default: 0)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    examples = load_test_examples(args.limit, args.offset)  # fails early, naming easy-vqa, if it is missing
    if not examples:
        print("no questions selected (check --offset / --limit)", file=sys.stderr)
        return 2
    quantization = resolve_quantization(args.model, args.quantization)
    offline_engine_env()

    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=str(args.model), quantization=quantization, dtype=args.dtype, enforce_eager=True,
              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, seed=args.seed,
              limit_mm_per_prompt={"image": 1}, distributed_executor_backend="uni")
    load_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, stop=["\n"])

    args.out.parent.mkdir(parents=True, exist_ok=True)
    n_correct = n_done = 0
    t1 = time.perf_counter()
    with args.out.open("w", encoding="utf-8") as f, \
            tqdm(total=len(examples), desc="easy-VQA", unit="q", dynamic_ncols=True) as bar:
        for start in range(0, len(examples), args.batch_size):
            chunk = examples[start:start + args.batch_size]
            requests = [{"prompt": vqa_prompt(ex.question, short_answer=not args.no_short_answer),
                         "multi_modal_data": {"image": ex.image()}} for ex in chunk]
            outputs = llm.generate(requests, params, use_tqdm=False)
            for ex, out in zip(chunk, outputs, strict=True):
                prediction = out.outputs[0].text.strip()
                correct = is_correct(prediction, ex.answer)
                n_correct += correct
                f.write(json.dumps({"index": ex.index, "image_id": ex.image_id, "question": ex.question,
                                    "answer": ex.answer, "prediction": prediction, "correct": correct}) + "\n")
            n_done += len(chunk)
            f.flush()
            bar.update(len(chunk))
            bar.set_postfix(acc=f"{n_correct / n_done:.3f}")
    gen_s = time.perf_counter() - t1

    last = examples[-1].index + 1
    print(f"wrote {n_done} predictions to {args.out} (model load {load_s:.1f} s, "
          f"generation {gen_s:.1f} s, {n_done / max(gen_s, 1e-9):.1f} questions/s)")
    print(f"accuracy: {n_correct / n_done:.4f} ({n_correct}/{n_done}) on easy-VQA test[{examples[0].index}:{last}], "
          f"model {args.model}, quantization={quantization}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
