"""Calibration data (``qvlm_offline.calibration``): every source, deterministic subsampling,
clear errors for bad records, refusal of evaluation data, and processor-made model inputs
for a tiny LLaVA (``<image>`` expanded to (image_size / patch_size)^2 image tokens).

No network: the ``hf:`` source is checked offline (a clear error) and with a fake
``load_dataset``.  The easy-vqa tests skip without the ``easy-vqa`` package.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

from qvlm_offline import calibration as cal
from qvlm_offline.calibration import (
    CAPTION_INSTRUCTION,
    CalibrationError,
    CalibrationSample,
    EvaluationSplitError,
    build_model_inputs,
    is_evaluation_split,
    load_calibration,
)


def _needs_easy_vqa():
    return pytest.importorskip("easy_vqa", reason="the easy-vqa package provides the data")


def _png(path: Path, color=(200, 30, 30), size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _pixels(img) -> str:
    return hashlib.sha1(img.convert("RGB").tobytes()).hexdigest()


def _write_jsonl(path: Path, records) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- easy-vqa


def test_easyvqa_train_samples():
    ev = _needs_easy_vqa()
    from qvlm_offline.vqa_data import vqa_question

    samples = load_calibration("easyvqa", 8, seed=0)
    assert len(samples) == 8
    texts, answers, _ = ev.get_train_questions()
    for s in samples:
        assert isinstance(s, CalibrationSample)
        assert s.image.mode == "RGB" and s.image.size == (64, 64)
        assert s.prompt.startswith("USER: <image>\n") and s.prompt.count("<image>") == 1
        i = int(re.search(r"question (\d+)", s.source).group(1))
        assert s.question == vqa_question(texts[i]) and s.answer == answers[i]
        assert s.prompt == f"USER: <image>\n{s.question} ASSISTANT: {s.answer}"
    assert load_calibration("easyvqa:train", 8, seed=0)[0].prompt == samples[0].prompt


def test_easyvqa_deterministic_and_seeded():
    _needs_easy_vqa()
    a = load_calibration("easyvqa", 6, seed=1)
    b = load_calibration("easyvqa", 6, seed=1)
    c = load_calibration("easyvqa", 6, seed=2)
    assert [(s.source, s.prompt, _pixels(s.image)) for s in a] == [(s.source, s.prompt, _pixels(s.image)) for s in b]
    assert [s.source for s in a] != [s.source for s in c]


def test_easyvqa_never_touches_the_test_split(monkeypatch):
    ev = _needs_easy_vqa()
    test_images = {_pixels(Image.open(p)) for p in ev.get_test_image_paths().values()}
    train_paths = ev.get_train_image_paths()

    def forbidden(*a, **k):
        raise AssertionError("calibration read the easy-vqa test split")

    monkeypatch.setattr(ev, "get_test_questions", forbidden)
    monkeypatch.setattr(ev, "get_test_image_paths", forbidden)
    samples = load_calibration("easyvqa", 16, seed=3)
    assert len(samples) == 16
    for s in samples:
        assert "easyvqa:train" in s.source
        image_id = int(re.search(r"image (\d+)", s.source).group(1))
        # Same pixels as the train image, none of the test images' pixels.
        assert _pixels(s.image) == _pixels(Image.open(train_paths[image_id]))
        # (Train and test image ids are both numbered from 0 and the questions come from
        # the same 107 templates: what must differ is the image, and it does.)
        assert _pixels(s.image) not in test_images
    with pytest.raises(EvaluationSplitError, match="test"):
        load_calibration("easyvqa:test", 4, seed=0)
    with pytest.raises(CalibrationError, match="only 'train'"):
        load_calibration("easyvqa:extra", 4, seed=0)


def test_easyvqa_missing_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "easy_vqa", None)
    with pytest.raises(ModuleNotFoundError, match="easy-vqa"):
        load_calibration("easyvqa", 2, seed=0)


# ----------------------------------------------------------------------------- jsonl


def test_jsonl_record_styles(tmp_path):
    _png(tmp_path / "img" / "a.png", (200, 30, 30))
    abs_b = _png(tmp_path / "elsewhere" / "b.jpg", (30, 30, 200))
    path = _write_jsonl(tmp_path / "data" / "calib.jsonl", [
        {"image": "../img/a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat shape is in the image?"},
            {"from": "gpt", "value": "a red square"},
            {"from": "human", "value": "Is it big?"},
            {"from": "gpt", "value": "no"}]},
        "",  # blank lines are skipped
        {"image": str(abs_b), "text": "A blue square."},
        {"image": "../img/a.png", "question": "What color is it?", "answer": "red"},
        {"text": "Plain text without an image."},
        {"image": "../img/a.png", "conversations": [
            {"role": "user", "content": "What is this?\n<image>"}, {"role": "assistant", "content": "red"}]},
    ])
    with pytest.warns(UserWarning, match="only 5 available"):
        samples = load_calibration(f"jsonl:{path}", 10, seed=0)
    by_line = {int(s.source.rsplit(":", 1)[1]): s for s in samples}
    assert sorted(by_line) == [1, 3, 4, 5, 6]
    assert by_line[1].prompt == ("USER: <image>\nWhat shape is in the image? ASSISTANT: a red square "
                                 "USER: Is it big? ASSISTANT: no")
    assert by_line[1].turns == (("What shape is in the image?", "a red square"), ("Is it big?", "no"))
    assert by_line[1].image.getpixel((0, 0)) == (200, 30, 30)
    assert by_line[3].prompt == f"USER: <image>\n{CAPTION_INSTRUCTION} ASSISTANT: A blue square."
    assert by_line[3].image.getpixel((0, 0))[2] > 150
    assert by_line[4].prompt == "USER: <image>\nWhat color is it? ASSISTANT: red"
    assert by_line[5].image is None and by_line[5].prompt == "Plain text without an image."
    assert by_line[6].prompt == "USER: <image>\nWhat is this? ASSISTANT: red"
    assert all(s.prompt.count("<image>") == (s.image is not None) for s in samples)
    # A bare .jsonl path works too.
    assert [s.prompt for s in load_calibration(str(path), 5, seed=0)] == [s.prompt for s in samples]


def test_jsonl_subsampling(tmp_path):
    _png(tmp_path / "x.png")
    path = _write_jsonl(tmp_path / "c.jsonl",
                        [{"image": "x.png", "question": f"q{i}", "answer": "a"} for i in range(30)])
    a = [s.question for s in load_calibration(f"jsonl:{path}", 5, seed=0)]
    assert len(a) == len(set(a)) == 5
    assert a == [s.question for s in load_calibration(f"jsonl:{path}", 5, seed=0)]
    assert a != [s.question for s in load_calibration(f"jsonl:{path}", 5, seed=1)]


@pytest.mark.parametrize("bad, message", [
    ({"image": "missing.png", "text": "a caption"}, r"image file not found: .*missing\.png"),
    ({"image": "broken.png", "text": "a caption"}, r"cannot read image .*broken\.png"),
    ({"image": "ok.png"}, r"no text"),
    ({"image": "ok.png", "text": "   "}, r"no text"),
    ({"image": "ok.png", "conversations": [{"from": "gpt", "value": "hi"}]}, r"answer without a question"),
    ({"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nA <image>"}]}, r"2 <image>"),
    ({"text": "<image>\nwhat?"}, r"no image"),
    ({"image": 3, "text": "x"}, r"'image' must be a path"),
    ("{not json", r"invalid JSON"),
    ("[1, 2]", r"expected a JSON object"),
])
def test_jsonl_bad_record_names_the_line(tmp_path, bad, message):
    _png(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    path = _write_jsonl(tmp_path / "c.jsonl", [{"image": "ok.png", "text": "fine"}, bad])
    with pytest.raises(CalibrationError, match=re.escape(f"{path}:2") + ".*" + message):
        load_calibration(f"jsonl:{path}", 2, seed=0)


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        load_calibration(f"jsonl:{tmp_path / 'nope.jsonl'}", 2, seed=0)
    with pytest.raises(CalibrationError, match="unknown calibration spec"):
        load_calibration("imagenet", 2, seed=0)
    with pytest.raises(ValueError, match="num_samples"):
        load_calibration("easyvqa", 0, seed=0)


# ----------------------------------------------------------------------------- folder


def test_folder_with_txt_captions(tmp_path):
    for i, c in enumerate(["red", "green", "blue"]):
        _png(tmp_path / f"{i}.png", (40 * i, 100, 100))
        (tmp_path / f"{i}.txt").write_text(f"A {c} square.\n")
    (tmp_path / "notes.md").write_text("ignored")
    samples = load_calibration(f"folder:{tmp_path}", 3, seed=0)
    assert sorted(s.prompt for s in samples) == sorted(
        f"USER: <image>\n{CAPTION_INSTRUCTION} ASSISTANT: A {c} square." for c in ["red", "green", "blue"])
    for s in samples:
        i = int(Path(s.source).stem)
        assert s.image.getpixel((0, 0)) == (40 * i, 100, 100)
    assert [s.prompt for s in load_calibration(str(tmp_path), 3, seed=0)] == [s.prompt for s in samples]
    assert len(load_calibration(f"folder:{tmp_path}", 2, seed=5)) == 2

    (tmp_path / "3.png").write_bytes((tmp_path / "0.png").read_bytes())
    with pytest.raises(CalibrationError, match=r"3\.png: no caption: expected 3\.txt"):
        load_calibration(f"folder:{tmp_path}", 3, seed=0)


def test_folder_with_captions_jsonl_and_csv(tmp_path):
    a, b = tmp_path / "j", tmp_path / "c"
    for d in (a, b):
        _png(d / "one.png", (1, 2, 3))
        _png(d / "two.jpg", (200, 200, 200))
    _write_jsonl(a / "captions.jsonl", [{"file_name": "one.png", "text": "first"},
                                        {"image": "two.jpg", "question": "What?", "answer": "second"}])
    samples = load_calibration(f"folder:{a}", 2, seed=0)
    assert sorted(s.prompt for s in samples) == [
        f"USER: <image>\n{CAPTION_INSTRUCTION} ASSISTANT: first", "USER: <image>\nWhat? ASSISTANT: second"]

    (b / "captions.csv").write_text("file_name,caption\none.png,\"first, with a comma\"\ntwo.jpg,\n")
    with pytest.raises(CalibrationError, match=re.escape(str(b / "captions.csv")) + r":3: no text"):
        load_calibration(f"folder:{b}", 2, seed=0)
    (b / "captions.csv").write_text("file_name,caption\none.png,\"first, with a comma\"\ntwo.jpg,second\n")
    samples = load_calibration(f"folder:{b}", 2, seed=0)
    assert sorted(s.answer for s in samples) == ["first, with a comma", "second"]

    with pytest.raises(CalibrationError, match="not a directory"):
        load_calibration(f"folder:{tmp_path / 'nope'}", 2, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no images"):
        load_calibration(f"folder:{tmp_path / 'empty'}", 2, seed=0)


# ----------------------------------------------------------------------------- hf


def test_hf_without_datasets_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ModuleNotFoundError, match="`datasets` package"):
        load_calibration("hf:someone/some-data", 2, seed=0)


def test_hf_offline_error_is_clear(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache", raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CalibrationError) as e:
        load_calibration("hf:qvlm-tests/no-such-calibration-set", 2, seed=0)
    msg = str(e.value)
    assert "hf:qvlm-tests/no-such-calibration-set:train" in msg
    assert "offline mode is on" in msg and "jsonl:PATH" in msg


def test_hf_rows_with_a_fake_hub(monkeypatch):
    datasets = pytest.importorskip("datasets")
    imgs = [Image.new("RGB", (32, 32), (10 * i, 0, 0)) for i in range(6)]
    ds = datasets.Dataset.from_dict(
        {"image": imgs, "conversations": [[{"from": "human", "value": f"<image>\nq{i}"},
                                           {"from": "gpt", "value": f"a{i}"}] for i in range(6)]},
        features=datasets.Features({"image": datasets.Image(), "conversations": [
            {"from": datasets.Value("string"), "value": datasets.Value("string")}]}),
    )
    calls = []

    def fake_load_dataset(name, config=None, split=None, **kw):
        calls.append((name, config, split))
        return ds

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    samples = load_calibration("hf:org/llava-style", 4, seed=0)
    assert calls == [("org/llava-style", None, "train")]
    assert len(samples) == 4 and len({s.prompt for s in samples}) == 4
    for s in samples:
        i = int(s.question[1:])
        assert s.prompt == f"USER: <image>\nq{i} ASSISTANT: a{i}"
        assert s.image.getpixel((0, 0)) == (10 * i, 0, 0)
        assert s.source.startswith("hf:org/llava-style:train row ")
    assert [s.prompt for s in load_calibration("hf:org/llava-style", 4, seed=0)] == [s.prompt for s in samples]
    load_calibration("hf:org/llava-style:cfg:train[:50%]", 1, seed=0)
    assert calls[-1] == ("org/llava-style", "cfg", "train[:50%]")


# ----------------------------------------------------------------------------- evaluation data


@pytest.mark.parametrize("spec", [
    "easyvqa:test", "easy-vqa:TEST", "hf:org/data:test", "hf:org/data:validation", "hf:org/data:val",
    "hf:org/data:cfg:test[:10%]", "hf:org/data:train+test", "hf:lmms-lab/VQAv2:testdev", "hf:x:dev",
])
def test_evaluation_splits_are_refused(spec, monkeypatch):
    # Refused before anything is imported or loaded (works without `datasets` too).
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(EvaluationSplitError, match="evaluation split"):
        load_calibration(spec, 4, seed=0)


def test_is_evaluation_split():
    assert not any(map(is_evaluation_split, ["train", "train[:100]", "train[10%:]", "pretrain"]))
    assert all(map(is_evaluation_split, ["test", "validation[:5]", "train+validation", "eval", "test_dev"]))


def test_local_evaluation_data_is_refused(tmp_path):
    corpus = Path(cal.__file__).parent / "lm_eval_tasks" / "corpus.jsonl"
    with pytest.raises(EvaluationSplitError, match="evaluation data"):
        load_calibration(f"jsonl:{corpus}", 4, seed=0)
    ev = pytest.importorskip("easy_vqa")
    test_image = next(iter(ev.get_test_image_paths().values()))
    with pytest.raises(EvaluationSplitError, match="evaluation data"):
        load_calibration(f"folder:{Path(test_image).parent}", 4, seed=0)
    path = _write_jsonl(tmp_path / "c.jsonl", [{"image": test_image, "text": "sneaky"}])
    with pytest.raises(EvaluationSplitError, match=re.escape(f"{path}:1")):
        load_calibration(f"jsonl:{path}", 1, seed=0)


# ----------------------------------------------------------------------------- model inputs

IMAGE_SIZE, PATCH = 64, 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoProcessor

    from qvlm_offline.testmodels.tiny_llava import build_tiny_llava

    d = build_tiny_llava(
        tmp_path_factory.mktemp("calib_tiny") / "model", text_hidden=64, text_intermediate=128, text_layers=1,
        text_heads=2, text_kv_heads=1, vision_hidden=32, vision_intermediate=64, vision_layers=1, vision_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH,
    )
    return d, AutoProcessor.from_pretrained(d)


def test_build_model_inputs(tiny, tmp_path):
    import torch
    from transformers import LlavaForConditionalGeneration

    from qvlm_offline.testmodels.tiny_llava import IMAGE

    model_dir, processor = tiny
    _png(tmp_path / "wide.png", (200, 30, 30), size=(90, 50))
    _png(tmp_path / "small.png", (30, 200, 30), size=(20, 20))
    path = _write_jsonl(tmp_path / "c.jsonl", [
        {"image": "wide.png", "conversations": [{"from": "human", "value": "<image>\nWhat shape is in the image?"},
                                                {"from": "gpt", "value": "circle"}]},
        {"image": "small.png", "text": "A green square."},
        {"text": "The picture shows a red circle."},
    ])
    samples = load_calibration(f"jsonl:{path}", 3, seed=0, processor=processor)
    if cal.importlib.util.find_spec("easy_vqa") is not None:
        samples += load_calibration("easyvqa", 2, seed=0, processor=processor)
    inputs = build_model_inputs(samples, processor)
    assert len(inputs) == len(samples)
    n_image_tokens = (IMAGE_SIZE // PATCH) ** 2
    for s, x in zip(samples, inputs):
        ids = x["input_ids"]
        assert ids.shape[0] == 1 and x["attention_mask"].shape == ids.shape and bool(x["attention_mask"].all())
        if s.image is None:
            assert "pixel_values" not in x and int((ids == IMAGE).sum()) == 0
        else:
            assert int((ids == IMAGE).sum()) == n_image_tokens
            assert tuple(x["pixel_values"].shape) == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
            assert x["pixel_values"].dtype == torch.float32
        # The answer is in the tokens, after the image.
        if s.answer:
            answer_ids = processor.tokenizer(s.answer, add_special_tokens=False)["input_ids"]
            tail = ids[0].tolist()[-len(answer_ids) - 2:]
            assert any(tail[k:k + len(answer_ids)] == answer_ids for k in range(len(tail)))

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for x in inputs[:2] + inputs[2:3]:
            logits = model(**x).logits
            assert logits.shape[:2] == x["input_ids"].shape and torch.isfinite(logits).all()


def test_build_model_inputs_prompt_fn(tiny):
    _, processor = tiny
    from qvlm_offline.calibration import format_prompt

    s = CalibrationSample(Image.new("RGB", (64, 64)), "USER: <image>\nWhat? ASSISTANT: red", (("What?", "red"),), "t")
    default = build_model_inputs([s], processor)[0]["input_ids"]
    same = build_model_inputs(
        [s], processor, lambda x: format_prompt(x.turns, has_image=True, processor=processor))[0]["input_ids"]
    assert default.tolist() == same.tolist()
    alias = build_model_inputs([s], processor, chat_template_fn=lambda x: f"USER: <image>\n{x.question} ASSISTANT:")
    assert alias[0]["input_ids"].shape[1] == default.shape[1] - 1
    with pytest.raises(CalibrationError, match="expected exactly 1"):
        build_model_inputs([s], processor, lambda x: x.question)
    with pytest.raises(CalibrationError, match="no image"):
        build_model_inputs([CalibrationSample(None, "USER: <image>\nhi ASSISTANT:")], processor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_model_inputs([], processor) == []


# A text LLM's template (string content only), as a LLaVA assembled from that LLM keeps it.
STRING_ONLY_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def test_string_only_chat_template_gets_the_placeholder_in_the_string(tiny):
    """A template that concatenates ``message['content']`` as a string used to die inside jinja with
    ``TypeError: can only concatenate str (not "list") to str``; calibration renders the image
    placeholder into the string instead, and the processor expands it."""
    import copy

    from qvlm_offline.calibration import format_prompt

    _, processor = tiny
    p = copy.copy(processor)
    p.chat_template = STRING_ONLY_TEMPLATE
    with pytest.raises(TypeError, match="concatenate"):  # the failure mode, as the template behaves
        p.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], tokenize=False)
    text = format_prompt((("What shape is in the image?", "circle"),), has_image=True, processor=p)
    assert text == "<|user|><image>\nWhat shape is in the image?\n<|assistant|>circle\n"
    s = CalibrationSample(Image.new("RGB", (64, 64)), text, (("What shape is in the image?", "circle"),), "t")
    ids = build_model_inputs([s], p)[0]["input_ids"]
    from qvlm_offline.testmodels.tiny_llava import IMAGE

    assert int((ids == IMAGE).sum()) == (IMAGE_SIZE // PATCH) ** 2


def test_broken_chat_template_is_one_clear_error(tiny):
    import copy

    from qvlm_offline.calibration import format_prompt

    _, processor = tiny
    p = copy.copy(processor)
    p.chat_template = "{{ messages[0]['content'] + 1 }}"
    with pytest.raises(CalibrationError, match="renders neither list content .* nor string content"):
        format_prompt((("What?", None),), has_image=True, processor=p)
