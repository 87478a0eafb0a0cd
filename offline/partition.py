"""Entropy-guided block partition for the Q-VLM block-wise rounding search.

Consecutive layers whose dependency is strong are searched together as one block.
Q-VLM scores the dependency with the activation entropy, a cheap proxy; see
:mod:`qvlm_offline.entropy` for how the scores and the true dependency are measured.

Rule (greedy, left to right, deterministic):

* ``scores[k]`` scores the boundary between layer ``k`` and layer ``k + 1``. It is
  the entropy of layer ``k``, or the measured ``D(k, k+1)``, following the alignment
  of :mod:`qvlm_offline.entropy`. ``scores`` has one entry per layer. The last
  entry closes no boundary and is ignored, so a list of ``n - 1`` dependencies must
  be padded to ``n`` (with any finite value).
* Layer ``k + 1`` joins the block of layer ``k`` when ``scores[k] > threshold``
  (strictly) **and** that block has fewer than ``max_block_layers`` layers.
  Otherwise it starts a new block.
* Default threshold: the **median of the boundary scores** ``scores[:-1]``, taking
  the lower middle value when their number is even (``statistics.median_low``).
  Because the comparison is strict, at most half of the boundaries are joined. The
  threshold is one of the scores and is not an average of two, so the partition
  does not depend on the units of the score: any strictly increasing transform of
  the scores gives the same blocks, exactly and with no floating-point rounding.

Degenerate cases: ``max_block_layers == 1`` gives singletons. ``threshold=-inf`` gives
greedy fixed-size chunks of ``max_block_layers`` (the scores must be finite).
``threshold=+inf`` gives singletons. No layers gives ``[]``.

This module does not measure anything and does not run the search. It only maps
scores to ``[start, end)`` ranges.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["default_threshold", "describe_partition", "partition_blocks"]


def _finite_scores(entropy: Sequence[float]) -> list[float]:
    scores = [float(s) for s in entropy]
    bad = [k for k, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise ValueError(f"scores must be finite; non-finite at layer(s) {bad[:8]}")
    return scores


def default_threshold(entropy: Sequence[float]) -> float:
    """Lower median of the boundary scores ``scores[:-1]``; ``+inf`` when there is no boundary."""
    scores = _finite_scores(entropy)
    return statistics.median_low(scores[:-1]) if len(scores) > 1 else math.inf


def partition_blocks(
    entropy: Sequence[float], max_block_layers: int, threshold: float | None = None
) -> list[tuple[int, int]]:
    """Half-open ``[start, end)`` blocks that cover layers ``0 .. n-1`` in order.

    Each block has at most ``max_block_layers`` layers. ``entropy`` holds one boundary
    score per layer (see the module docstring for the rule and the default threshold).
    """
    if isinstance(max_block_layers, bool) or not isinstance(max_block_layers, int) or max_block_layers < 1:
        raise ValueError(f"max_block_layers must be an int >= 1, got {max_block_layers!r}")
    scores = _finite_scores(entropy)
    if threshold is None:
        threshold = default_threshold(scores)
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("threshold must not be NaN")
    n = len(scores)
    if n == 0:
        return []
    blocks: list[tuple[int, int]] = []
    start = 0
    for k in range(n - 1):
        has_room = (k + 1 - start) < max_block_layers
        if not (scores[k] > threshold and has_room):
            blocks.append((start, k + 1))
            start = k + 1
    blocks.append((start, n))
    return blocks


def describe_partition(blocks: Sequence[tuple[int, int]], names: Sequence[str]) -> list[dict]:
    """JSON-able summary: ``[{"block", "start", "end", "size", "layers": [names]}]``.

    Checks that ``blocks`` is a partition of ``range(len(names))`` in order.
    """
    names = list(names)
    expected = 0
    out = []
    for i, (start, end) in enumerate(blocks):
        start, end = int(start), int(end)
        if start != expected or end <= start:
            raise ValueError(f"block {i} = [{start}, {end}) does not continue the partition at {expected}")
        out.append({"block": i, "start": start, "end": end, "size": end - start, "layers": names[start:end]})
        expected = end
    if expected != len(names):
        raise ValueError(f"blocks cover {expected} layers but {len(names)} names were given")
    return out
