"""Specification of the entropy/dependency measurement and the entropy-guided block partition.

The estimates are exact for the empirical distribution of discrete codes, so the known
cases are checked with tight tolerances, and streaming results must equal one-shot
results bit for bit.
"""

import json
import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qvlm_kernels import reference
from qvlm_offline.entropy import (
    DependencyMeter,
    EntropyMeter,
    LayerStatsRecorder,
    code_entropy,
    conditional_entropy,
    entropy_dependency_correlation,
    measurement_bits,
    quantize_codes_per_token,
)
from qvlm_offline.partition import default_threshold, describe_partition, partition_blocks

LN2 = math.log(2.0)
bits_st = st.sampled_from([2, 4, 6, 8])


def all_codes(bits: int, repeat: int = 1) -> torch.Tensor:
    half = 1 << (bits - 1)
    return torch.arange(-half, half, dtype=torch.int32).repeat(repeat)


# ------------------------------------------------------------------ entropy of codes


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_uniform_codes_have_entropy_b_ln2(bits):
    codes = all_codes(bits, repeat=3)[torch.randperm(3 << bits)]
    assert code_entropy(codes, bits) == pytest.approx(bits * LN2, rel=1e-12)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_constant_codes_have_zero_entropy(bits):
    assert code_entropy(torch.full((97,), -(1 << (bits - 1)), dtype=torch.int32), bits) == 0.0
    assert code_entropy(torch.zeros(5, 7, dtype=torch.int64), bits) == 0.0


def test_entropy_of_a_known_skewed_distribution():
    # p = (1/2, 1/4, 1/4) -> H = 1.5 bits
    codes = torch.tensor([0, 0, 1, -3] * 25)
    assert code_entropy(codes, 4) == pytest.approx(1.5 * LN2, rel=1e-12)


def test_entropy_counts_all_codes_including_the_negative_extreme():
    # -2^(b-1) is a valid code (the reference clamps to it), 2^(b-1) is not.
    assert code_entropy(torch.tensor([-8, 7]), 4) == pytest.approx(LN2)
    with pytest.raises(ValueError):
        code_entropy(torch.tensor([8]), 4)
    with pytest.raises(ValueError):
        code_entropy(torch.tensor([-9]), 4)
    with pytest.raises(ValueError):
        code_entropy(torch.tensor([0.5]), 4)
    with pytest.raises(ValueError):
        code_entropy(torch.tensor([], dtype=torch.int32), 4)  # no samples, no distribution
    with pytest.raises(ValueError):
        code_entropy(torch.tensor([0]), 9)


# ------------------------------------------------------------- conditional entropy


@settings(max_examples=30, deadline=None)
@given(bits=bits_st, n=st.integers(1, 400), seed=st.integers(0, 2**16))
def test_conditional_entropy_of_identical_or_determined_variables_is_zero(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    half = 1 << (bits - 1)
    a = torch.randint(-half, half, (n,), generator=g)
    assert conditional_entropy(a, a, bits) == 0.0
    f_of_a = (a.abs() - half // 2).clamp(-half, half - 1)  # any function of A
    assert conditional_entropy(a, f_of_a, bits) == 0.0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_conditional_entropy_of_independent_variables_is_h_b(bits):
    # The exact product of a skewed A marginal and a skewed B marginal.
    half = 1 << (bits - 1)
    a_vals = torch.tensor([-half, 0, 1])
    a_reps = torch.tensor([1, 2, 5])
    b_vals = torch.tensor([half - 1, -1, 0, -half])
    b_reps = torch.tensor([3, 1, 1, 2])
    a_marg = a_vals.repeat_interleave(a_reps)
    b_marg = b_vals.repeat_interleave(b_reps)
    a = a_marg.repeat_interleave(len(b_marg))
    b = b_marg.repeat(len(a_marg))
    h_b = code_entropy(b_marg, bits)
    assert h_b > 0
    assert conditional_entropy(a, b, bits) == pytest.approx(h_b, rel=1e-12)
    assert conditional_entropy(b, a, bits) == pytest.approx(code_entropy(a_marg, bits), rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(bits=bits_st, n=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_conditional_entropy_bounds_and_chain_rule(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    half = 1 << (bits - 1)
    a = torch.randint(-half, half, (n,), generator=g)
    b = (a + torch.randint(-1, 2, (n,), generator=g)).clamp(-half, half - 1)
    h_b_given_a = conditional_entropy(a, b, bits)
    assert 0.0 <= h_b_given_a <= code_entropy(b, bits) + 1e-12
    # Chain rule H(A, B) = H(A) + H(B | A), with (A, B) encoded as one signed 2b-bit code.
    joint = (a + half) * (1 << bits) + (b + half)
    h_ab = code_entropy(joint - (1 << (2 * bits - 1)), 2 * bits) if 2 * bits <= 8 else None
    if h_ab is not None:
        assert h_ab == pytest.approx(code_entropy(a, bits) + h_b_given_a, abs=1e-12)


def test_conditional_entropy_rejects_unpaired_shapes():
    with pytest.raises(ValueError):
        conditional_entropy(torch.zeros(3, dtype=torch.int32), torch.zeros(4, dtype=torch.int32), 4)


# ------------------------------------------------------------ per-token codes


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(1, 12),
    width=st.integers(1, 48),
    bits=st.sampled_from([4, 6, 8]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    outlier=st.floats(1.0, 1e3),
    zero_token=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_codes_match_reference_quantize_per_token(tokens, width, bits, dtype, outlier, zero_token, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens, width, generator=g)
    x[..., 0] *= outlier
    if zero_token:
        x[0, 0] = 0.0
    x = x.to(dtype)
    codes = quantize_codes_per_token(x, bits)
    ref_q, _ = reference.quantize_per_token(x, bits)
    assert not codes.is_floating_point()
    assert codes.shape == x.shape
    assert torch.equal(codes.to(torch.float32), ref_q)
    half = 1 << (bits - 1)
    assert int(codes.min()) >= -half and int(codes.max()) <= half - 1
    if zero_token:
        assert not codes[0, 0].any()


def test_measurement_bits_defaults_to_8_for_16_bit_activations():
    assert measurement_bits(None) == 8
    assert measurement_bits(4) == 4
    assert measurement_bits(6) == 6


# ---------------------------------------------------------------- streaming meters


@settings(max_examples=25, deadline=None)
@given(bits=bits_st, tokens=st.integers(1, 40), width=st.integers(1, 24), cuts=st.lists(st.integers(0, 40), max_size=4), seed=st.integers(0, 2**16))
def test_entropy_meter_streaming_equals_one_shot(bits, tokens, width, cuts, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g) * torch.rand(tokens, 1, generator=g)
    one_shot = code_entropy(quantize_codes_per_token(x, bits), bits)
    meter = EntropyMeter(bits)
    edges = sorted({0, tokens, *(c for c in cuts if c < tokens)})
    for lo, hi in zip(edges, edges[1:]):
        meter.update(x[lo:hi])
    assert meter.num_samples == tokens * width
    assert meter.entropy() == one_shot  # same histogram -> identical float
    other = EntropyMeter(bits)
    other.update(x)
    assert torch.equal(other.counts, meter.counts)


def test_entropy_meter_keeps_a_histogram_not_activations():
    meter = EntropyMeter(8)
    for _ in range(3):
        meter.update(torch.randn(4, 1000))
    assert meter.counts.shape == (256,)
    assert meter.num_samples == 12000
    assert 0.0 < meter.entropy() <= 8 * LN2
    with pytest.raises(ValueError):
        EntropyMeter(8).entropy()  # nothing observed


@settings(max_examples=25, deadline=None)
@given(bits=bits_st, tokens=st.integers(1, 30), wa=st.integers(1, 20), wb=st.integers(1, 20), cut=st.integers(0, 30), seed=st.integers(0, 2**16))
def test_dependency_meter_pairs_first_min_width_channels_and_streams(bits, tokens, wa, wb, cut, seed):
    g = torch.Generator().manual_seed(seed)
    xa = torch.randn(tokens, wa, generator=g)
    xb = torch.randn(tokens, wb, generator=g)
    xb[:, : min(wa, wb)] += 2 * xa[:, : min(wa, wb)]
    m = min(wa, wb)
    ca, cb = quantize_codes_per_token(xa, bits), quantize_codes_per_token(xb, bits)  # full-width per-token grid
    expected = conditional_entropy(ca[:, :m], cb[:, :m], bits)
    meter = DependencyMeter(bits)
    cut = min(cut, tokens)
    meter.update(xa[:cut], xb[:cut])
    meter.update(xa[cut:], xb[cut:])
    assert meter.num_samples == tokens * m
    assert meter.conditional_entropy() == expected
    assert meter.entropy_b() == code_entropy(cb[:, :m], bits)
    assert 0.0 <= meter.conditional_entropy() <= meter.entropy_b() + 1e-12
    assert meter.mutual_information() >= 0.0


def test_dependency_meter_explicit_channel_pairing_and_identical_inputs():
    x = torch.randn(3, 5, 16)
    same = DependencyMeter(8)
    same.update(x, x)
    assert same.conditional_entropy() == 0.0
    # Pair channel i of A with the reversed channel of B: B == flip(A) -> D == 0 again.
    flipped = DependencyMeter(8, channels_a=list(range(16)), channels_b=list(range(15, -1, -1)))
    flipped.update(x, x.flip(-1))
    assert flipped.conditional_entropy() == 0.0
    with pytest.raises(ValueError):
        same.update(x, x[:, :4])  # different tokens
    with pytest.raises(ValueError):
        DependencyMeter(8, channels_a=[0, 1])


def test_recorder_records_entropy_and_dependency_per_layer():
    names = ["q", "k", "o", "down"]
    rec = LayerStatsRecorder(names, bits=8)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        h = torch.randn(2, 8, 32, generator=g)
        rec.observe("q", h)
        rec.observe("k", h)  # same input as q -> D(q, k) == 0
        rec.observe("o", torch.randn(2, 8, 32, generator=g))
        rec.observe("down", torch.randn(2, 8, 48, generator=g))
    recs = rec.records()
    json.dumps(recs)
    assert [r["name"] for r in recs] == names
    assert recs[0]["dependency_next"] == 0.0
    assert recs[0]["entropy"] == recs[1]["entropy"]
    assert recs[1]["dependency_next"] > 0.0
    assert recs[-1]["dependency_next"] is None
    assert recs[3]["num_samples"] == 3 * 16 * 48
    corr = rec.correlation()
    assert set(corr) == {"pearson", "spearman"}
    with pytest.raises(ValueError):
        rec.observe("o", h)  # out of order: "o" must follow "k"


# ---------------------------------------------------------------------- correlation


def test_correlation_of_monotone_sequences():
    x = [0.5, 1.0, 2.0, 3.5, 7.0]
    lin = entropy_dependency_correlation(x, [3 * v + 1 for v in x])
    assert lin["pearson"] == pytest.approx(1.0) and lin["spearman"] == pytest.approx(1.0)
    mono = entropy_dependency_correlation(x, [math.exp(v) for v in x])
    assert mono["spearman"] == pytest.approx(1.0) and mono["pearson"] < 1.0
    anti = entropy_dependency_correlation(x, [-v**3 for v in x])
    assert anti["spearman"] == pytest.approx(-1.0) and anti["pearson"] < 0


def test_spearman_averages_tied_ranks():
    # ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4): r = 4.5 / sqrt(4.5 * 5)
    got = entropy_dependency_correlation([1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0])
    assert got["spearman"] == pytest.approx(4.5 / math.sqrt(22.5))
    assert entropy_dependency_correlation([1.0, 2.0, 2.0, 3.0], [0.0, 5.0, 5.0, 9.0])["spearman"] == pytest.approx(1.0)


def test_correlation_undefined_cases():
    assert math.isnan(entropy_dependency_correlation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])["pearson"])
    assert math.isnan(entropy_dependency_correlation([1.0], [2.0])["spearman"])
    with pytest.raises(ValueError):
        entropy_dependency_correlation([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        entropy_dependency_correlation([1.0, float("nan")], [1.0, 2.0])


# ------------------------------------------------------------------------ partition

scores_st = st.lists(st.floats(-10, 10, allow_nan=False, allow_infinity=False), max_size=40)
budget_st = st.integers(1, 8)


def check_is_partition(blocks, n, budget):
    assert all(isinstance(b, tuple) and len(b) == 2 for b in blocks)
    covered = [i for s, e in blocks for i in range(s, e)]
    assert covered == list(range(n))  # every layer exactly once, in order
    assert all(1 <= e - s <= budget for s, e in blocks)


@settings(max_examples=150, deadline=None)
@given(scores=scores_st, budget=budget_st, threshold=st.none() | st.floats(-10, 10))
def test_partition_covers_in_order_within_budget_and_is_deterministic(scores, budget, threshold):
    blocks = partition_blocks(scores, budget, threshold)
    check_is_partition(blocks, len(scores), budget)
    assert partition_blocks(list(scores), budget, threshold) == blocks
    assert partition_blocks(tuple(scores), budget, threshold) == blocks


@settings(max_examples=150, deadline=None)
@given(scores=scores_st, budget=budget_st, threshold=st.none() | st.floats(-10, 10))
def test_partition_joins_exactly_the_strong_boundaries_with_room(scores, budget, threshold):
    t = default_threshold(scores) if threshold is None else threshold
    blocks = partition_blocks(scores, budget, threshold)
    for s, e in blocks:
        assert all(scores[k] > t for k in range(s, e - 1))  # inside a block: strong boundaries
        if e < len(scores):
            assert scores[e - 1] <= t or e - s == budget  # a cut: weak boundary or full block


@settings(max_examples=100, deadline=None)
@given(scores=scores_st, budget=budget_st)
def test_partition_default_threshold_is_lower_median_of_boundary_scores(scores, budget):
    if len(scores) > 1:
        assert default_threshold(scores) == statistics.median_low(scores[:-1])
    assert partition_blocks(scores, budget) == partition_blocks(scores, budget, default_threshold(scores))
    # Scale-free: a strictly increasing transform of the scores gives the same blocks.
    assert partition_blocks([v**3 + 2 * v for v in scores], budget) == partition_blocks(scores, budget)
    # The last score closes no boundary.
    if scores:
        assert partition_blocks(scores[:-1] + [1e6], budget, 0.0) == partition_blocks(scores, budget, 0.0)


@settings(max_examples=100, deadline=None)
@given(scores=scores_st, budget=budget_st, threshold=st.none() | st.floats(-10, 10))
def test_partition_degenerate_cases(scores, budget, threshold):
    n = len(scores)
    singletons = [(i, i + 1) for i in range(n)]
    assert partition_blocks(scores, 1, threshold) == singletons
    assert partition_blocks(scores, budget, math.inf) == singletons
    assert partition_blocks(scores, budget, -math.inf) == [(s, min(s + budget, n)) for s in range(0, n, budget)]


def test_partition_empty_and_small_inputs():
    assert partition_blocks([], 4) == []
    assert partition_blocks([], 1, -math.inf) == []
    assert partition_blocks([3.0], 4) == [(0, 1)]
    # Boundary scores (1, 5, 2, 6, 7), median 5: only boundaries 3|4 and 4|5 are strong.
    assert partition_blocks([1, 5, 2, 6, 7, 1], 3) == [(0, 1), (1, 2), (2, 3), (3, 6)]
    assert partition_blocks([1, 5, 2, 6, 7, 1], 2) == [(0, 1), (1, 2), (2, 3), (3, 5), (5, 6)]
    # Even count (4, 1, 3, 2): lower median 2, so boundaries 0|1 and 2|3 are strong.
    assert partition_blocks([4, 1, 3, 2, 0], 4) == [(0, 2), (2, 4), (4, 5)]


def test_partition_rejects_bad_arguments():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            partition_blocks([1.0, 2.0], bad)
    with pytest.raises(ValueError):
        partition_blocks([1.0, float("nan")], 2)
    with pytest.raises(ValueError):
        partition_blocks([1.0, float("inf")], 2)
    with pytest.raises(ValueError):
        partition_blocks([1.0, 2.0], 2, float("nan"))


def test_describe_partition_is_json_able_and_checks_coverage():
    names = ["l0.q", "l0.o", "l0.gate", "l0.down", "l1.q"]
    blocks = partition_blocks([5.0, 1.0, 6.0, 7.0, 0.0], 3)
    desc = describe_partition(blocks, names)
    assert json.loads(json.dumps(desc)) == desc
    assert [layer for d in desc for layer in d["layers"]] == names
    assert [d["size"] for d in desc] == [e - s for s, e in blocks]
    assert describe_partition([], []) == []
    with pytest.raises(ValueError):
        describe_partition([(0, 2)], names)  # does not cover all layers
    with pytest.raises(ValueError):
        describe_partition([(0, 2), (3, 5)], names)  # gap
