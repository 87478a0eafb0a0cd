"""easy-VQA data + scoring, the lm-eval task definitions, ``examples/offline_batch.py`` and
``qvlm eval`` (lm-eval on vLLM) with a tiny quantized LLaVA.

The tiny model has random weights, so its accuracy and perplexity say nothing: the
vLLM tests check the mechanics only (files written, metrics present and well-formed).
vLLM runs in child processes (it pins threads and keeps global state), as in
``vllm_runner.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from qvlm_offline import vqa_data
from qvlm_offline.tools.child import child_env
from qvlm_offline.tools.evaluate import TASKS, TASKS_DIR, add_eval_parser, parse_tasks, resolve_quantization

ROOT = Path(__file__).resolve().parents[1]


def _needs_easy_vqa():
    pytest.importorskip("easy_vqa", reason="the easy-vqa package provides the data")


# ----------------------------------------------------------------------------- fast


@pytest.mark.parametrize("pred, answer, ok", [
    ("yes", "yes", True), (" Yes, it is.", "yes", True), ("No.", "no", True), ("grey", "gray", True),
    ("Triangle shape", "triangle", True), ("a triangle", "triangle", False), ("", "yes", False),
    ("yes", "no", False), ("...", "yes", False), ('"circle"', "circle", True),
])
def test_is_correct(pred, answer, ok):
    assert vqa_data.is_correct(pred, answer) is ok


def test_accuracy():
    assert vqa_data.accuracy(["yes", "no", "red"], ["yes", "yes", "red"]) == pytest.approx(2 / 3)
    assert vqa_data.accuracy([], []) == 0.0


def test_load_test_examples():
    _needs_easy_vqa()
    import easy_vqa

    everything = vqa_data.load_test_examples()
    assert len(everything) == len(easy_vqa.get_test_questions()[0]) > 1000
    some = vqa_data.load_test_examples(5, offset=3)
    assert [e.index for e in some] == [3, 4, 5, 6, 7]
    assert some == everything[3:8]
    answers = set(easy_vqa.get_answers())
    assert all(e.answer in answers for e in everything)
    pairs = vqa_data.load_test_pairs(2)
    img, q, a = pairs[0]
    assert img.mode == "RGB" and img.size == (64, 64)
    assert (q, a) == (everything[0].question, everything[0].answer)
    prompt = vqa_data.vqa_prompt(q)
    assert prompt.startswith("USER: <image>\n") and prompt.endswith(" ASSISTANT:") and q in prompt
    assert prompt.count("<image>") == 1


def test_missing_easy_vqa_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "easy_vqa", None)  # import easy_vqa -> ImportError
    with pytest.raises(ModuleNotFoundError, match="easy-vqa"):
        vqa_data.load_test_examples(1)


def test_parse_tasks_and_quantization(tmp_path):
    assert parse_tasks("easyvqa,text") == ["easyvqa", "text"]
    assert parse_tasks("qvlm_text_ppl, easyvqa,text") == ["text", "easyvqa"]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_tasks("mmlu")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGeneration"]}))
    assert resolve_quantization(tmp_path) is None
    assert resolve_quantization(tmp_path, "qvlm") == "qvlm"
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "qvlm"}}))
    assert resolve_quantization(tmp_path) == "qvlm"
    with pytest.raises(ValueError, match="quantized checkpoint"):
        resolve_quantization(tmp_path, "none")
    with pytest.raises(FileNotFoundError):
        resolve_quantization(tmp_path / "missing")


def test_eval_parser_documents_every_flag():
    p = argparse.ArgumentParser(prog="qvlm")
    sub = p.add_subparsers(dest="command", required=True)
    e = add_eval_parser(sub)
    for action in e._actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help, f"{action.dest} has no help text"
    a = p.parse_args(["eval", "some/model", "--tasks", "text", "--limit", "4", "--quantization", "qvlm",
                      "--output", "r.json"])
    assert (a.command, a.tasks, a.limit, a.quantization, a.output) == ("eval", ["text"], 4, "qvlm", Path("r.json"))
    assert p.parse_args(["eval", "m", "--limit", "0.5"]).limit == 0.5
    assert p.parse_args(["eval", "m"]).tasks == ["easyvqa", "text"]
    assert callable(a.func)


def test_lm_eval_tasks_load_offline():
    """The YAML + utils.py load through lm-eval's TaskManager (as with --include_path) and
    produce PIL images, llava prompts and scores, without a model."""
    _needs_easy_vqa()
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    tasks = tm.load(list(TASKS.values()))["tasks"]
    vqa, text = tasks["qvlm_easyvqa"], tasks["qvlm_text_ppl"]

    assert vqa.OUTPUT_TYPE == "generate_until" and vqa.MULTIMODAL
    docs = vqa.test_docs()
    assert len(docs) == len(vqa_data.load_test_examples())
    doc = docs[0]
    images = vqa.doc_to_image(doc)
    assert isinstance(images, list) and len(images) == 1
    assert images[0].mode == "RGB" and images[0].size == (64, 64)
    assert vqa.doc_to_text(doc) == vqa_data.vqa_prompt(doc["question"])
    assert vqa.doc_to_target(doc) == doc["answer"]
    gen = vqa.config.generation_kwargs
    assert gen["max_gen_toks"] <= 16 and gen["until"]
    assert vqa.process_results(doc, [f" {doc['answer'].capitalize()}."]) == {"exact_match": 1.0}
    assert vqa.process_results(doc, ["zzz"]) == {"exact_match": 0.0}

    assert text.OUTPUT_TYPE == "loglikelihood_rolling" and not getattr(text, "MULTIMODAL", False)
    tdocs = text.test_docs()
    assert len(tdocs) >= 24
    assert all(text.doc_to_target(d).strip() for d in tdocs)


# ----------------------------------------------------------------------------- vLLM (slow)


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=child_env(None), capture_output=True, text=True, timeout=timeout,
                          check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd[:3]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}")
    return proc


@pytest.fixture(scope="module")
def quantized_tiny(tmp_path_factory):
    from qvlm_offline.export import export_checkpoint
    from qvlm_offline.testmodels.tiny_llava import build_tiny_llava

    root = tmp_path_factory.mktemp("eval")
    src = build_tiny_llava(root / "src")
    export_checkpoint(src, root / "w4a16", scheme="w4a16", progress=False)
    return root / "w4a16"


@pytest.mark.slow
def test_offline_batch_example(quantized_tiny, tmp_path):
    _needs_easy_vqa()
    out = tmp_path / "preds.jsonl"
    proc = _run([sys.executable, str(ROOT / "examples" / "offline_batch.py"), "--model", str(quantized_tiny),
                 "--limit", "8", "--batch-size", "4", "--max-model-len", "512", "--out", str(out)], cwd=tmp_path)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = vqa_data.load_test_examples(8)
    assert len(rows) == 8
    for row, ex in zip(rows, expected):
        assert set(row) >= {"question", "answer", "prediction", "correct"}
        assert (row["question"], row["answer"], row["index"]) == (ex.question, ex.answer, ex.index)
        assert isinstance(row["prediction"], str) and row["prediction"]  # the tiny model never emits EOS
        assert row["correct"] is vqa_data.is_correct(row["prediction"], row["answer"])
    m = re.search(r"^accuracy: ([0-9.]+) \((\d+)/(\d+)\)", proc.stdout, re.MULTILINE)
    assert m, proc.stdout
    n_correct = sum(r["correct"] for r in rows)
    assert (int(m.group(2)), int(m.group(3))) == (n_correct, 8)
    assert float(m.group(1)) == pytest.approx(n_correct / 8, abs=1e-4)
    assert "quantization=qvlm" in proc.stdout  # auto-detected from config.json


_EVAL_CHILD = """
import argparse, gc, json, sys
from qvlm_offline.tools.evaluate import add_eval_parser
p = argparse.ArgumentParser(prog="qvlm")
add_eval_parser(p.add_subparsers(dest="command", required=True))
for argv in json.loads(sys.argv[1]):
    args = p.parse_args(argv)
    rc = args.func(args)
    gc.collect()
    if rc:
        sys.exit(rc)
"""


@pytest.mark.slow
def test_qvlm_eval(quantized_tiny, tmp_path):
    """``qvlm eval`` (cmd_eval) with --limit 4: both tasks on one vllm-vlm engine (auto quantization),
    then the text task alone on lm-eval's plain ``vllm`` model type (--quantization qvlm)."""
    _needs_easy_vqa()
    both, text = tmp_path / "both.json", tmp_path / "text.json"
    runs = [
        ["eval", str(quantized_tiny), "--limit", "4", "--max-model-len", "512", "--log-samples",
         "--output", str(both)],
        ["eval", str(quantized_tiny), "--tasks", "text", "--limit", "4", "--quantization", "qvlm",
         "--max-model-len", "512", "--output", str(text)],
    ]
    proc = _run([sys.executable, "-c", _EVAL_CHILD, json.dumps(runs)], cwd=tmp_path)

    r = json.loads(both.read_text())
    assert r["config"]["model"] == "vllm-vlm"
    assert r["config"]["model_args"]["quantization"] == "qvlm"
    assert set(r["results"]) == {"qvlm_easyvqa", "qvlm_text_ppl"}
    assert r["n-samples"]["qvlm_easyvqa"]["effective"] == 4
    assert r["n-samples"]["qvlm_text_ppl"]["effective"] == 4
    em = r["results"]["qvlm_easyvqa"]["exact_match,none"]
    assert 0.0 <= em <= 1.0
    samples = r["samples"]["qvlm_easyvqa"]
    assert len(samples) == 4
    for s in samples:
        ((context, gen_kwargs, aux),) = s["arguments"]  # one generate_until request per document
        assert context == vqa_data.vqa_prompt(s["doc"]["question"])
        assert gen_kwargs["max_gen_toks"] == 8
        # lm-eval logs each image as a content hash (LMEVAL_HASHMM): one image per document.
        assert len(aux["visual"]) == 1 and re.fullmatch(r"[0-9a-f]{64}|<PIL\.Image.*", aux["visual"][0])
        pred = s["filtered_resps"][0]
        assert isinstance(pred, str) and pred.strip()
        assert s["exact_match"] == float(vqa_data.is_correct(pred, s["target"]))
    assert em == pytest.approx(sum(s["exact_match"] for s in samples) / 4)

    t = json.loads(text.read_text())
    assert t["config"]["model"] == "vllm"
    for res in (r["results"]["qvlm_text_ppl"], t["results"]["qvlm_text_ppl"]):
        assert math.isfinite(res["word_perplexity,none"]) and res["word_perplexity,none"] > 1
        assert math.isfinite(res["byte_perplexity,none"]) and res["byte_perplexity,none"] > 1
        assert res["bits_per_byte,none"] > 0
    # Same engine settings, same documents: the two model types agree on the text task.
    assert t["results"]["qvlm_text_ppl"]["bits_per_byte,none"] == pytest.approx(
        r["results"]["qvlm_text_ppl"]["bits_per_byte,none"], rel=1e-3)

    # The printed table, once per run.
    assert proc.stdout.count("exact_match") == 1
    assert proc.stdout.count("bits_per_byte") == 2
