"""Activation entropy and cross-layer dependency: the Q-VLM block-partition proxy.

What it is for
--------------
Q-VLM (Wang et al., NeurIPS 2024) splits the model into blocks for the block-wise
rounding search, and it uses the entropy of each layer's activations as a cheap
stand-in (a proxy) for how strongly the layer depends on the next one. This module
measures both quantities on calibration data, so that the proxy can be **checked**
and not just assumed (see :func:`entropy_dependency_correlation`). The scores go to
:func:`qvlm_offline.partition.partition_blocks`.

What is measured
----------------
* The entropy ``H(X_q^k)`` of the *quantized* input of every quantizable linear
  ``k``, in nats. The codes are exactly the ones the kernels use
  (:func:`qvlm_kernels.reference.quantize_per_token`): symmetric dynamic per-token
  codes ``q = round(x / s)`` with ``s = absmax_token / (2^(b-1) - 1)``, clamped to
  ``[-2^(b-1), 2^(b-1) - 1]``. The histogram covers all ``2^b`` codes and pools every
  (token, channel) entry of the layer input. Because the variable is discrete, this
  is the exact entropy of the empirical code distribution: no binning or density
  estimate is involved. Weight-only schemes (16-bit activations, ``act_bits=None``)
  are measured at ``b = 8`` (:func:`measurement_bits`).
* The dependency ``D(k, k+1) = H(X_q^(k+1) | X_q^k)
  = -sum p(a, b) log p(b | a)``, the conditional entropy from a joint code histogram
  (``2^b x 2^b`` counts, 64K at 8 bits).

The joint variable (the pairing) and why
----------------------------------------
Consecutive layers read inputs of different widths, so "the joint distribution of
``x^k`` and ``x^(k+1)``" has to be defined on matched entries. We use **channel-index
pairing, pooled over channels**: for every token ``t`` and every channel
``c < m = min(width_k, width_(k+1))`` the pair ``(q^k[t, c], q^(k+1)[t, c])`` is one
sample of ``(A, B)``, and all ``T * m`` pairs fill **one** joint histogram.
:class:`DependencyMeter` takes explicit channel index lists to use another
correspondence. Why this pairing:

1. **It measures the deployed codes.** ``A`` and ``B`` are the same discrete codes
   whose entropies are reported, quantized with the same per-token grid. There is no
   second quantizer for a projection or a summary statistic. So ``0 <= D <= H(B)``
   holds exactly on the empirical distribution, and ``D = 0`` exactly when layer
   ``k+1`` reads the same tensor as layer ``k`` (q/k/v, gate/up).
2. **Channel index means something where it matters.** In a pre-norm decoder the
   inputs of q/k/v (``input_layernorm(h)``) and gate/up
   (``post_attention_layernorm(h)``), and those of the next decoder layer, live in
   the residual-stream basis. Channel ``c`` is the same residual feature in each of
   them, only rescaled per channel by the norm weight.
3. **The estimate is sound and cheap.** Pooling treats the channel as a uniformly
   random index ``C``, so the estimate is ``H(B | A)`` of the mixture, an upper
   bound on the per-channel average ``mean_c H(B_c | A_c) = H(B | A, C)``. Its one
   histogram gets ``T * m`` samples and has a fixed size whatever the width. The
   per-channel alternative would need ``m`` histograms of 64K cells each
   (gigabytes at width 4096) and a few hundred tokens per cell, and its plug-in
   estimate would be heavily biased downward. Projecting each token to one scalar
   code (a random projection) throws away the channel axis, leaves only ``T``
   samples, and measures a variable that the model never quantizes.

Limits: where the bases differ (the input of ``o_proj`` is concatenated heads, the
input of ``down_proj`` has intermediate width), index pairing is a fixed but
arbitrary correspondence. ``D`` then reflects dependence at the token level (shared
per-token scale and outlier structure) rather than at the feature level. Pass
``channels_a``/``channels_b`` when a better correspondence is known. Both entropies
are plug-in (maximum-likelihood) values for the observed samples. With few samples
per occupied cell they underestimate the population value, which is why the pooled
histogram is used.

Alignment convention: ``dependency[k] = D(k, k+1)`` for ``k < n - 1``, so it is paired
with ``entropy[k]`` (the entropy of the layer on the *upstream* side of the boundary).
This is the pairing that :func:`entropy_dependency_correlation` tests and that
``partition_blocks`` uses to score boundaries.

What it does not do
-------------------
It does not register hooks or run models; a caller feeds it activations
(:class:`LayerStatsRecorder` expects each batch's layers in order). It does not
choose blocks (see :mod:`qvlm_offline.partition`) or search rounding. It keeps
histograms, not activations: the only activation-sized state is one batch of int8
codes for the previous layer, held inside :class:`LayerStatsRecorder`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from qvlm_kernels.reference import quantize_per_token

DEFAULT_MEASUREMENT_BITS = 8
MIN_BITS, MAX_BITS = 2, 8

__all__ = [
    "DEFAULT_MEASUREMENT_BITS",
    "DependencyMeter",
    "EntropyMeter",
    "LayerStatsRecorder",
    "code_entropy",
    "conditional_entropy",
    "entropy_dependency_correlation",
    "entropy_from_counts",
    "conditional_entropy_from_joint",
    "measurement_bits",
    "quantize_codes_per_token",
]


# ----------------------------------------------------------------------------- codes


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return bits


def measurement_bits(act_bits: int | None) -> int:
    """Bit-width at which a scheme's activations are measured (8 for 16-bit activations)."""
    return DEFAULT_MEASUREMENT_BITS if act_bits is None else _check_bits(act_bits)


def quantize_codes_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Float ``x [..., C]`` -> int32 codes ``[..., C]`` of symmetric per-token quantization.

    These are exactly the codes from :func:`qvlm_kernels.reference.quantize_per_token`,
    the oracle that the kernels are tested against, so the measured distribution is
    the deployed one. Codes lie in ``[-2^(b-1), 2^(b-1) - 1]``. A token that is all
    zeros gets the codes 0.
    """
    _check_bits(bits)
    if x.dim() == 0:
        raise ValueError("x must have a channel dimension")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    q, _ = quantize_per_token(x, bits)
    return q.to(torch.int32)


def _code_index(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes -> bin index in ``[0, 2^b)`` (int64, flattened); checks the range."""
    if codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.is_floating_point() and not bool(torch.isfinite(codes).all() and torch.equal(codes, codes.round())):
        raise ValueError("codes must be integer-valued")
    idx = codes.reshape(-1).to(torch.int64) + (1 << (bits - 1))
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= (1 << bits)):
        raise ValueError(
            f"codes outside [{-(1 << (bits - 1))}, {(1 << (bits - 1)) - 1}] for {bits}-bit histogram"
        )
    return idx


def _histogram(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.bincount(_code_index(codes, bits), minlength=1 << bits).cpu()


def _joint_histogram(codes_a: torch.Tensor, codes_b: torch.Tensor, bits: int) -> torch.Tensor:
    """``[2^b, 2^b]`` int64 counts, rows indexed by ``a``, columns by ``b``."""
    if codes_a.shape != codes_b.shape:
        raise ValueError(f"paired codes must have the same shape, got {tuple(codes_a.shape)} and {tuple(codes_b.shape)}")
    k = 1 << bits
    ia = _code_index(codes_a, bits)
    ib = _code_index(codes_b, bits).to(ia.device)
    return torch.bincount(ia * k + ib, minlength=k * k).cpu().reshape(k, k)


# --------------------------------------------------------------------------- entropies


def entropy_from_counts(counts: torch.Tensor) -> float:
    """Plug-in entropy, in nats, of a histogram of non-negative counts.

    Raises ValueError on an empty histogram (no distribution to measure).
    """
    c = torch.as_tensor(counts).reshape(-1).to(torch.float64)
    if (c < 0).any():
        raise ValueError("counts must be non-negative")
    n = float(c.sum())
    if n <= 0:
        raise ValueError("entropy of an empty histogram is undefined (no samples)")
    p = c[c > 0] / n
    return max(0.0, float(-(p * torch.log(p)).sum()))


def conditional_entropy_from_joint(joint: torch.Tensor) -> float:
    """``H(B | A)`` in nats from joint counts ``[A, B]`` (rows: conditioning variable).

    Computed as ``-sum p(a, b) log(n(a, b) / n(a))``. A cell with ``n(a, b) = n(a)``
    (B is determined by A) contributes exactly 0.
    """
    j = torch.as_tensor(joint).to(torch.float64)
    if j.dim() != 2:
        raise ValueError("joint histogram must be 2-D")
    if (j < 0).any():
        raise ValueError("counts must be non-negative")
    n = float(j.sum())
    if n <= 0:
        raise ValueError("conditional entropy of an empty histogram is undefined (no samples)")
    row = j.sum(dim=1, keepdim=True).expand_as(j)
    nz = j > 0
    cab, ca = j[nz], row[nz]
    return max(0.0, float(-(cab / n * torch.log(cab / ca)).sum()))


def code_entropy(codes: torch.Tensor, bits: int) -> float:
    """Entropy (nats) of signed ``bits``-bit codes, from the histogram over all ``2^b`` codes."""
    return entropy_from_counts(_histogram(codes, _check_bits(bits)))


def conditional_entropy(codes_a: torch.Tensor, codes_b: torch.Tensor, bits: int) -> float:
    """``H(B | A)`` in nats from the joint histogram of element-wise paired codes."""
    return conditional_entropy_from_joint(_joint_histogram(codes_a, codes_b, _check_bits(bits)))


# ------------------------------------------------------------------------------ meters


def _tokens(codes: torch.Tensor) -> torch.Tensor:
    """``[..., C]`` -> ``[T, C]``."""
    if codes.dim() == 0:
        raise ValueError("activations must have a channel dimension")
    return codes.reshape(-1, codes.shape[-1])


class EntropyMeter:
    """Streaming entropy of one layer's quantized input: keeps a ``2^b`` histogram.

    ``update(x)`` with float activations ``[..., C]`` (any number of tokens per call);
    ``update_codes`` with codes that are already quantized. The result depends only
    on the multiset of codes seen, so any batching gives the same value.
    """

    def __init__(self, bits: int = DEFAULT_MEASUREMENT_BITS):
        self.bits = _check_bits(bits)
        self.counts = torch.zeros(1 << bits, dtype=torch.int64)

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    def update(self, x: torch.Tensor) -> None:
        self.update_codes(quantize_codes_per_token(x.detach(), self.bits))

    def update_codes(self, codes: torch.Tensor) -> None:
        self.counts += _histogram(codes, self.bits)

    def merge(self, other: EntropyMeter) -> None:
        if other.bits != self.bits:
            raise ValueError("cannot merge meters of different bit-widths")
        self.counts += other.counts

    def entropy(self) -> float:
        return entropy_from_counts(self.counts)


class DependencyMeter:
    """Streaming ``H(B | A)`` between the quantized inputs of two layers: a joint histogram.

    ``update(xa, xb)`` takes the inputs of layer ``k`` (``A``) and layer ``k+1`` (``B``)
    for the **same tokens**, shaped ``[..., Ca]`` and ``[..., Cb]`` with equal leading
    dimensions. Each token is quantized per layer over its full width. Then the codes
    of channel ``channels_a[i]`` are paired with those of ``channels_b[i]``. By default
    this is channel ``i`` with channel ``i`` for ``i < min(Ca, Cb)``; see the module
    docstring for why.
    """

    def __init__(
        self,
        bits: int = DEFAULT_MEASUREMENT_BITS,
        channels_a: Sequence[int] | torch.Tensor | None = None,
        channels_b: Sequence[int] | torch.Tensor | None = None,
    ):
        self.bits = _check_bits(bits)
        if (channels_a is None) != (channels_b is None):
            raise ValueError("give both channels_a and channels_b, or neither")
        self.channels_a = None if channels_a is None else torch.as_tensor(channels_a, dtype=torch.int64).reshape(-1)
        self.channels_b = None if channels_b is None else torch.as_tensor(channels_b, dtype=torch.int64).reshape(-1)
        if self.channels_a is not None and self.channels_a.numel() != self.channels_b.numel():
            raise ValueError("channels_a and channels_b must have the same length")
        k = 1 << bits
        self.joint = torch.zeros(k, k, dtype=torch.int64)

    @property
    def num_samples(self) -> int:
        return int(self.joint.sum())

    def update(self, xa: torch.Tensor, xb: torch.Tensor) -> None:
        self.update_codes(
            quantize_codes_per_token(xa.detach(), self.bits), quantize_codes_per_token(xb.detach(), self.bits)
        )

    def update_codes(self, codes_a: torch.Tensor, codes_b: torch.Tensor) -> None:
        if codes_a.shape[:-1] != codes_b.shape[:-1]:
            raise ValueError(
                f"paired layers must see the same tokens: leading shapes {tuple(codes_a.shape[:-1])} "
                f"and {tuple(codes_b.shape[:-1])} differ"
            )
        a, b = _tokens(codes_a), _tokens(codes_b)
        if self.channels_a is None:
            m = min(a.shape[1], b.shape[1])
            a, b = a[:, :m], b[:, :m]
        else:
            a = a[:, self.channels_a.to(a.device)]
            b = b[:, self.channels_b.to(b.device)]
        self.joint += _joint_histogram(a, b, self.bits)

    def merge(self, other: DependencyMeter) -> None:
        if other.bits != self.bits:
            raise ValueError("cannot merge meters of different bit-widths")
        self.joint += other.joint

    def conditional_entropy(self) -> float:
        """``D = H(B | A)`` in nats."""
        return conditional_entropy_from_joint(self.joint)

    def entropy_a(self) -> float:
        """Entropy of the paired ``A`` codes, i.e. over the paired channels only."""
        return entropy_from_counts(self.joint.sum(dim=1))

    def entropy_b(self) -> float:
        """Entropy of the paired ``B`` codes, i.e. over the paired channels only."""
        return entropy_from_counts(self.joint.sum(dim=0))

    def mutual_information(self) -> float:
        """``I(A; B) = H(B) - H(B | A)`` (clamped at 0 against rounding)."""
        return max(0.0, self.entropy_b() - self.conditional_entropy())


class LayerStatsRecorder:
    """Per-layer entropy and consecutive-layer dependency over an ordered list of layers.

    Feed each calibration batch layer by layer in model order: ``observe(name, x)``
    with the layer's input activations. Layer ``k`` must come directly after layer
    ``k-1`` of the same batch (a forward hook does this). Observing layer 0 starts a
    new batch. The recorder holds one batch of int8 codes from the previous layer to
    pair with the next one, plus the histograms.

    Layers that read the same tensor (q/k/v, gate/up) give ``D = 0``. Register one
    of them per input if that is not what you want.
    """

    def __init__(self, names: Sequence[str], bits: int = DEFAULT_MEASUREMENT_BITS):
        self.names = list(names)
        if len(set(self.names)) != len(self.names):
            raise ValueError("layer names must be unique")
        self.bits = _check_bits(bits)
        self._index = {n: i for i, n in enumerate(self.names)}
        self.entropy_meters = [EntropyMeter(bits) for _ in self.names]
        self.dependency_meters = [DependencyMeter(bits) for _ in self.names[1:]]
        self._prev: tuple[int, torch.Tensor] | None = None

    def observe(self, name: str | int, x: torch.Tensor) -> None:
        k = name if isinstance(name, int) else self._index.get(name)
        if k is None or not 0 <= k < len(self.names):
            raise KeyError(f"unknown layer {name!r}")
        codes = quantize_codes_per_token(x.detach(), self.bits)
        self.entropy_meters[k].update_codes(codes)
        if k > 0:
            if self._prev is None or self._prev[0] != k - 1:
                got = "nothing" if self._prev is None else repr(self.names[self._prev[0]])
                raise ValueError(
                    f"layer {self.names[k]!r} observed after {got}; "
                    f"observe layers in order, starting each batch at {self.names[0]!r}"
                )
            self.dependency_meters[k - 1].update_codes(self._prev[1], codes)
        self._prev = (k, codes.to(torch.int8)) if k < len(self.names) - 1 else None

    def entropies(self) -> list[float]:
        return [m.entropy() for m in self.entropy_meters]

    def dependencies(self) -> list[float]:
        """``[D(0, 1), ..., D(n-2, n-1)]``."""
        return [m.conditional_entropy() for m in self.dependency_meters]

    def records(self) -> list[dict]:
        """JSON-able per-layer records: name, entropy, and ``D(k, k+1)`` (None for the last layer)."""
        ent, dep = self.entropies(), self.dependencies()
        return [
            {
                "index": k,
                "name": n,
                "entropy": ent[k],
                "dependency_next": dep[k] if k < len(dep) else None,
                "num_samples": self.entropy_meters[k].num_samples,
            }
            for k, n in enumerate(self.names)
        ]

    def correlation(self) -> dict[str, float]:
        """Correlation of ``entropy[k]`` with ``D(k, k+1)`` over ``k < n - 1``."""
        return entropy_dependency_correlation(self.entropies()[:-1], self.dependencies())


# ------------------------------------------------------------------------- correlation


def _rank_average(v: np.ndarray) -> np.ndarray:
    """1-based ranks, with tied values given the average of their ranks."""
    order = np.argsort(v, kind="mergesort")
    sorted_v = v[order]
    ranks = np.empty(len(v), dtype=np.float64)
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy = float(dx @ dx), float(dy @ dy)
    if sxx == 0.0 or syy == 0.0:
        return math.nan  # a constant sequence has no defined correlation
    return float(np.clip((dx @ dy) / math.sqrt(sxx * syy), -1.0, 1.0))


def entropy_dependency_correlation(entropy: Sequence[float], dependency: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman (ties get averaged ranks) correlation of two equal-length sequences.

    Pair ``entropy[k]`` with ``D(k, k+1)``: pass ``entropies[:-1]`` with the ``n - 1``
    dependencies. Returns ``{"pearson": r, "spearman": rho}``. A value is NaN when it is
    undefined (fewer than 2 points, or a constant sequence).
    """
    x = np.asarray(list(entropy), dtype=np.float64)
    y = np.asarray(list(dependency), dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(
            f"entropy and dependency must be 1-D of equal length, got {x.shape} and {y.shape} "
            "(pair entropy[k] with D(k, k+1): drop the last layer's entropy)"
        )
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("entropy and dependency must be finite")
    return {"pearson": _pearson(x, y), "spearman": _pearson(_rank_average(x), _rank_average(y))}
