"""The qvlm packed-weight format: the one place that defines it.

The offline writer, the vLLM loader and the kernels all import this module, so a
tensor name, a shape rule or a validation lives here and nowhere else.

Rules (format_version 1)
------------------------
For a linear layer with input width K and output width N quantized to ``b`` bits:

* ``<prefix>.qweight`` holds *unsigned* integer codes ``u`` in ``[0, 2**b - 1]``,
  laid out input-major, ``[K / pack_factor, N]``:
  - ``b == 4``: ``int32`` words, 8 codes per word packed along K, code of row
    ``8*i + j`` in bits ``4*j .. 4*j+3`` of word ``i`` (``pack_factor == 8``);
    K must be a multiple of 8.
  - ``b in (6, 8)``: ``uint8`` ``[K, N]``, one code per byte (``pack_factor == 1``).
* ``<prefix>.scales``: ``float16`` ``[num_groups, N]``. Groups run along K;
  ``group_size == -1`` means one group per output channel (``num_groups == 1``).
  When K is not a multiple of the group size the **last group is partial**:
  ``num_groups == ceil(K / group_size)`` and the last group covers the remaining
  ``K % group_size`` rows. Nothing is padded.
* ``<prefix>.qzeros``: ``uint8`` ``[num_groups, N]``, only for asymmetric layers.
  Symmetric layers have the implicit zero point ``2**(b-1)``.
* Dequantization is always ``w[k, n] = (u[k, n] - z[g(k), n]) * s[g(k), n]``
  with ``g(k) = k // group_size``; the logical weight is ``W = w.T`` ``[N, K]``,
  i.e. ``y = x @ w``.
* ``<prefix>.bias`` and every unquantized tensor keep their original name,
  dtype and shape.

Tensor-parallel note: row-parallel sharding splits K; each shard must start on a
group boundary, which the loader checks (a partial last group cannot be split).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import QVLMError

QUANT_METHOD = "qvlm"
FORMAT_VERSION = 1

QWEIGHT = "qweight"
SCALES = "scales"
QZEROS = "qzeros"
QUANT_TENSOR_SUFFIXES = (QWEIGHT, SCALES, QZEROS)

SCALE_DTYPE_NAME = "float16"
DEFAULT_GROUP_SIZE = 128


class FormatError(QVLMError, ValueError):
    """A checkpoint or config that does not follow this format."""


ActMode = Literal["none", "int8_dynamic", "fake"]


@dataclass(frozen=True)
class Scheme:
    """A named weight/activation precision pair."""

    name: str
    weight_bits: int
    act_bits: int | None  # None: activations stay 16-bit
    act_mode: ActMode
    per_channel_only: bool = False  # weights must use group_size == -1
    symmetric_only: bool = False


SCHEMES: dict[str, Scheme] = {
    "w4a16": Scheme("w4a16", 4, None, "none"),
    "w8a8": Scheme("w8a8", 8, 8, "int8_dynamic", per_channel_only=True, symmetric_only=True),
    "w4a8": Scheme("w4a8", 4, 8, "int8_dynamic"),
    "w6a6": Scheme("w6a6", 6, 6, "fake"),
    "w4a4": Scheme("w4a4", 4, 4, "fake"),
}


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise FormatError(f"unknown scheme {name!r}; known schemes: {', '.join(SCHEMES)}") from None


def pack_factor(bits: int) -> int:
    """Codes per stored element along K."""
    return 8 if bits == 4 else 1


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def effective_group_size(in_features: int, group_size: int) -> int:
    return in_features if group_size == -1 else group_size


@dataclass(frozen=True)
class LayerSpec:
    """How one linear layer is stored: everything a reader needs besides shapes."""

    scheme: str
    bits: int
    group_size: int
    symmetric: bool
    act_bits: int | None
    act_mode: ActMode

    @property
    def pack_factor(self) -> int:
        return pack_factor(self.bits)

    @property
    def implicit_zero(self) -> int:
        return 1 << (self.bits - 1)

    def check_shape(self, in_features: int, where: str = "") -> None:
        if in_features % self.pack_factor:
            raise FormatError(
                f"{where}input width {in_features} is not a multiple of {self.pack_factor}, "
                f"required to pack {self.bits}-bit codes"
            )

    def tensor_shapes(self, in_features: int, out_features: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Expected ``{suffix: (shape, dtype name)}`` of a layer's quantized tensors."""
        self.check_shape(in_features)
        g = num_groups(in_features, self.group_size)
        shapes = {
            QWEIGHT: ((in_features // self.pack_factor, out_features), "int32" if self.bits == 4 else "uint8"),
            SCALES: ((g, out_features), SCALE_DTYPE_NAME),
        }
        if not self.symmetric:
            shapes[QZEROS] = ((g, out_features), "uint8")
        return shapes


class LayerOverride(BaseModel):
    model_config = ConfigDict(extra="forbid")
    group_size: int | None = None
    symmetric: bool | None = None


class QVLMQuantConfig(BaseModel):
    """``quantization_config`` in config.json. Validated on read and write."""

    model_config = ConfigDict(extra="forbid")

    quant_method: Literal["qvlm"] = QUANT_METHOD
    format_version: int = FORMAT_VERSION
    scheme: str
    group_size: int = DEFAULT_GROUP_SIZE
    symmetric: bool = True
    # Module names (checkpoint names, e.g. "language_model.lm_head") or
    # "re:<regex>" patterns (matched with re.match) that stay unquantized.
    ignore: list[str] = Field(default_factory=list)
    # Per-module settings keyed by exact module name or "re:<regex>".
    overrides: dict[str, LayerOverride] = Field(default_factory=dict)
    # Free-form provenance (method, tool version, calibration); never read by the loader.
    producer: dict = Field(default_factory=dict)

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v > FORMAT_VERSION:
            raise ValueError(
                f"format_version {v} is newer than this vllm-qvlm understands "
                f"({FORMAT_VERSION}); upgrade vllm-qvlm"
            )
        if v < 1:
            raise ValueError(f"format_version must be >= 1, got {v}")
        return v

    @field_validator("scheme")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        get_scheme(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "QVLMQuantConfig":
        for name, o in [("<default>", None), *self.overrides.items()]:
            gs = self.group_size if o is None or o.group_size is None else o.group_size
            sym = self.symmetric if o is None or o.symmetric is None else o.symmetric
            _check_layer_settings(self.scheme, gs, sym, name)
        for pat in [*self.ignore, *self.overrides]:
            if pat.startswith("re:"):
                try:
                    re.compile(pat[3:])
                except re.error as e:
                    raise ValueError(f"bad regex {pat!r}: {e}") from None
        return self

    @classmethod
    def from_dict(cls, data: dict, source: str = "config.json") -> "QVLMQuantConfig":
        """Parse with one clear error naming the file."""
        if not isinstance(data, dict):
            raise FormatError(f"{source}: quantization_config must be an object, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            msgs = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'quantization_config'}: {err['msg']}"
                for err in e.errors()
            )
            raise FormatError(f"{source}: invalid qvlm quantization_config: {msgs}") from None

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def is_ignored(self, module: str) -> bool:
        return any(_matches(p, module) for p in self.ignore)

    def layer_spec(self, module: str) -> LayerSpec | None:
        """Storage spec of a checkpoint module, or None if it stays unquantized."""
        if self.is_ignored(module):
            return None
        gs, sym = self.group_size, self.symmetric
        for pat, o in self.overrides.items():
            if _matches(pat, module):
                gs = gs if o.group_size is None else o.group_size
                sym = sym if o.symmetric is None else o.symmetric
        s = get_scheme(self.scheme)
        return LayerSpec(self.scheme, s.weight_bits, gs, sym, s.act_bits, s.act_mode)


def _matches(pattern: str, module: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    return module == pattern


def _check_layer_settings(scheme: str, group_size: int, symmetric: bool, where: str) -> None:
    s = get_scheme(scheme)
    if group_size != -1 and (group_size <= 0 or group_size % 8):
        raise ValueError(f"{where}: group_size must be -1 (per channel) or a positive multiple of 8, got {group_size}")
    if s.per_channel_only and group_size != -1:
        raise ValueError(f"{where}: scheme {scheme} stores one scale per output channel; group_size must be -1")
    if s.symmetric_only and not symmetric:
        raise ValueError(f"{where}: scheme {scheme} is symmetric only")


def default_group_size(scheme: str) -> int:
    return -1 if get_scheme(scheme).per_channel_only else DEFAULT_GROUP_SIZE
