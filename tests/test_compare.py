"""`qvlm compare`: the coarsened KL, and a real run of two models in vLLM."""

import math

import pytest

from qvlm_offline.tools.compare import _kl_coarse, format_table, run_compare
from qvlm_offline.export import export_checkpoint
from qvlm_offline.testmodels.tiny_llava import build_tiny_llava


def _lp(probs: dict) -> dict:
    return {k: math.log(v) for k, v in probs.items()}


def test_coarse_kl_is_exact_when_the_top_tokens_hold_all_mass():
    p = {"1": 0.7, "2": 0.2, "3": 0.1}
    q = {"1": 0.5, "2": 0.3, "3": 0.2}
    exact = sum(p[t] * math.log(p[t] / q[t]) for t in p)
    assert _kl_coarse(_lp(p), _lp(q), k_fp=3) == pytest.approx(exact)
    assert _kl_coarse(_lp(p), _lp(p), k_fp=3) == pytest.approx(0.0, abs=1e-12)


def test_coarse_kl_lower_bounds_the_full_kl():
    p = {"1": 0.6, "2": 0.25, "3": 0.1, "4": 0.05}
    q = {"1": 0.4, "2": 0.2, "3": 0.3, "4": 0.1}
    full = sum(p[t] * math.log(p[t] / q[t]) for t in p)
    coarse = _kl_coarse(_lp(p), _lp(q), k_fp=2)  # tokens 3 and 4 merge into the rest bucket
    assert 0 <= coarse <= full


def test_missing_token_gets_the_smallest_listed_logprob():
    p = {"1": 0.9, "2": 0.1}
    q = {"1": 0.8, "3": 0.15}  # token 2 not in q's list: q(2) <= 0.15 is all we know
    got = _kl_coarse(_lp(p), _lp(q), k_fp=2)
    want = 0.9 * math.log(0.9 / 0.8) + 0.1 * math.log(0.1 / 0.15)
    assert got == pytest.approx(max(want, 0.0))


def test_measurements_are_cached_until_the_model_directory_changes(tmp_path, monkeypatch):
    import qvlm_offline.tools.compare as compare

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    calls = []
    monkeypatch.setattr(compare, "_run_child", lambda task, job, *a, **k: calls.append(job) or {"n": len(calls)})
    job = {"model": str(model), "questions": 3}
    first = compare._measure_cached(job, tmp_path / "w", "m", 1, 10)
    assert compare._measure_cached(job, tmp_path / "w", "m", 1, 10) == first and len(calls) == 1
    assert compare._measure_cached({**job, "questions": 4}, tmp_path / "w", "m", 1, 10) != first  # other settings
    (model / "config.json").write_text('{"changed": 1}')
    compare._measure_cached(job, tmp_path / "w", "m", 1, 10)
    assert len(calls) == 3  # a rewritten model is measured again


@pytest.mark.slow
def test_compare_runs_models_in_vllm(tmp_path):
    pytest.importorskip("easy_vqa")
    src = build_tiny_llava(tmp_path / "src")
    export_checkpoint(src, tmp_path / "w8a8", scheme="w8a8", progress=False)
    res = run_compare(src, [tmp_path / "w8a8"], questions=3, answer_tokens=2, workdir=tmp_path / "run",
                      threads=1, say=lambda m: None)
    r = res["models"][str(tmp_path / "w8a8")]
    assert r["positions"] == 6 and r["questions"] == 3
    assert r["kl"] >= 0 and 0 <= r["top1_agreement"] <= 1 and 0 <= r["accuracy"] <= 1
    assert "| " in format_table(res)
