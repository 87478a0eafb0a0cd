"""Where the streaming pipeline computes, in which precision, and where it keeps activations.

One :class:`Placement` per calibrated quantize run (``--method gptq`` and ``qvlm``), made
by :func:`choose_placement` from ``--device`` / ``--search-dtype`` and stated in the log
and the report:

- **device** (``cpu``, ``cuda``, ``cuda:N``, ``auto`` = CUDA when available): the
  skeleton (:class:`~qvlm_offline.sequential.StreamingModel`) and one block of decoder
  layers live there; every forward and backward pass runs there.
- **search dtype**: ``float32``, or ``bfloat16`` autocast of the passes through the
  quantized path (matmuls and attention in bf16 with float32 accumulation) where the
  device runs bf16 natively: CUDA GPUs with bf16, CPUs with AVX-512 BF16 or AMX (oneDNN).
  Rounding logits, scales, Hessians, the loss and the float model's reference outputs
  (profile, targets) stay float32. ``auto`` picks bfloat16 where supported.
- **activation store**: the calibration activations of all samples between blocks (the
  quantized path's hidden states, the float model's, the block targets) are kept in
  ``store_dtype`` (``--activation-dtype``: float32, or bfloat16 for half the memory; ``auto``
  = the search dtype) on the
  device when they fit in half of its free memory, else in host memory (pinned with
  CUDA, copied in one sample at a time). On a CPU they are in host memory.

Rules: :meth:`Placement.fetch` gives a stored tensor on the device in float32 (the layers
compute from float32 inputs); :meth:`Placement.store` moves a computed tensor to the store.
Neither copies when store and device agree in device and dtype.

What it does not do: load weights (the pipeline reads a layer and moves it to ``device``)
or choose batch sizes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

DEVICES_HELP = "cpu, cuda, cuda:N or auto (CUDA when available)"
SEARCH_DTYPES = ("auto", "float32", "bfloat16")
ACTIVATION_DTYPES = ("auto", "float32", "bfloat16")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when a CUDA device is usable, else ``cpu``; refuse an unusable CUDA."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: not a device ({DEVICES_HELP})") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is available to this process "
                             f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"--device {name}: unsupported device type {dev.type!r} ({DEVICES_HELP})")
    return dev


def bf16_support(device: torch.device) -> tuple[bool, str]:
    """(ok, reason): does ``device`` run bf16 matmuls natively?"""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name(device)}: bf16 {'supported' if ok else 'not supported'}"
    ok = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return ok, ("CPU with native bf16 (AVX-512 BF16 or AMX)" if ok
                else "this CPU has neither AVX-512 BF16 nor AMX (bf16 would be emulated, slower than float32)")


def resolve_search_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in SEARCH_DTYPES:
        raise ValueError(f"--search-dtype must be one of {', '.join(SEARCH_DTYPES)}, got {name!r}")
    ok, reason = bf16_support(device)
    if name == "auto":
        return torch.bfloat16 if ok else torch.float32
    if name == "bfloat16" and not ok:
        raise ValueError(f"--search-dtype bfloat16 on {device}: {reason}; use float32")
    return torch.float32 if name == "float32" else torch.bfloat16


@dataclass(frozen=True)
class Placement:
    device: torch.device
    search_dtype: torch.dtype = torch.float32
    store_device: torch.device = torch.device("cpu")
    store_dtype: torch.dtype = torch.float32
    reason: str = ""  # why the store is where it is

    @property
    def pinned(self) -> bool:
        return self.device.type == "cuda" and self.store_device.type == "cpu"

    def fetch(self, t: torch.Tensor) -> torch.Tensor:
        """A stored tensor on the device, float32 (no copy when already there)."""
        return t.to(self.device, torch.float32, non_blocking=self.pinned)

    def store(self, t: torch.Tensor) -> torch.Tensor:
        """A computed tensor into the activation store (no copy when already there)."""
        t = t.detach()
        if self.pinned:
            out = torch.empty(t.shape, dtype=self.store_dtype, pin_memory=True)
            out.copy_(t)  # blocking: the host copy is complete when this returns
            return out
        return t.to(self.store_device, self.store_dtype)

    def to_device(self, obj):
        """Tensors (also inside tuples/lists/dicts) on the device, dtypes kept: layer kwargs, model inputs."""
        if isinstance(obj, torch.Tensor):
            return obj.to(self.device)
        if isinstance(obj, (tuple, list)):
            return type(obj)(self.to_device(v) for v in obj)
        if isinstance(obj, dict):
            return {k: self.to_device(v) for k, v in obj.items()}
        return obj

    def autocast(self):
        """The search precision for passes through the quantized path."""
        if self.search_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.search_dtype)

    def describe(self) -> dict:
        return {"device": str(self.device), "search_dtype": str(self.search_dtype).removeprefix("torch."),
                "activations": f"{'pinned host' if self.pinned else 'host' if self.store_device.type == 'cpu' else str(self.store_device)} memory, "
                               f"{str(self.store_dtype).removeprefix('torch.')}",
                "why": self.reason}

    def __str__(self) -> str:
        d = self.describe()
        return (f"device {d['device']}, search {d['search_dtype']}, activations in {d['activations']}"
                + (f" ({d['why']})" if d["why"] else ""))


def activation_bytes(tokens: int, hidden: int, copies: int, dtype: torch.dtype) -> int:
    """Bytes of ``copies`` hidden-state sets over ``tokens`` calibration tokens of width ``hidden``."""
    return tokens * hidden * copies * torch.empty((), dtype=dtype).element_size()


def resolve_activation_dtype(name: str, search_dtype: torch.dtype) -> torch.dtype:
    """The activation store's dtype: ``auto`` = the search dtype. bfloat16 storage needs no native
    bf16 (it is a conversion per stored tensor), so any device may halve its activations."""
    if name not in ACTIVATION_DTYPES:
        raise ValueError(f"--activation-dtype must be one of {', '.join(ACTIVATION_DTYPES)}, got {name!r}")
    return search_dtype if name == "auto" else getattr(torch, name)


def choose_placement(device: str | torch.device = "auto", search_dtype: str = "float32", *,
                     activation_dtype: str = "auto", activation_need: int | None = None,
                     reserve: int = 0) -> Placement:
    """The run's placement. ``activation_need``: bytes of all stored activations in float32
    (halved when stored in bf16); ``reserve``: device bytes the block needs."""
    dev = resolve_device(device)
    dtype = resolve_search_dtype(search_dtype, dev)
    store_dtype = resolve_activation_dtype(activation_dtype, dtype)
    if dev.type != "cuda":
        return Placement(dev, dtype, torch.device("cpu"), store_dtype, "")
    free, _ = torch.cuda.mem_get_info(dev)
    need = activation_need or 0
    if store_dtype != torch.float32:
        need //= 2
    if need <= (free - reserve) // 2:
        return Placement(dev, dtype, dev, store_dtype,
                         f"{need / 2**30:.2f} GiB of activations fit in half of the {free / 2**30:.1f} GiB free")
    return Placement(dev, dtype, torch.device("cpu"), store_dtype,
                     f"{need / 2**30:.2f} GiB of activations exceed half of the {free / 2**30:.1f} GiB free "
                     f"after the block's {reserve / 2**30:.2f} GiB")


# ----------------------------------------------------------------------------- memory estimate

@dataclass(frozen=True)
class LayerShape:
    """What the memory estimate needs of one decoder layer (read off the checkpoint's table)."""

    params: int  # all of the layer's weights
    linear_params: int  # the quantized linears' weights
    stored_bytes: int  # their bytes as the checkpoint stores them (16-bit: 2 per weight)
    solves: tuple[tuple[int, int, int], ...]  # GPTQ problems, layer order: (inputs K, rows N, linears)


def layer_shape(table: dict, adapter, index: int = 0) -> LayerShape:
    """Decoder layer ``index`` of a checkpoint (``table``: name -> TensorInfo; ``adapter``: its
    ModelAdapter). The GPTQ problems are the layout's input groups, one per group (q/k/v
    stacked), other linears alone, in the layer's order (as :func:`qvlm_offline.qvlm.gptq_block`)."""
    import math

    prefix = f"{adapter.layer_prefix(index)}."
    layout = adapter.decoder
    params = sum(math.prod(info.shape) for n, info in table.items() if n.startswith(prefix))
    w = {n: table[f"{prefix}{n}.weight"] for n in layout.linears}
    leader = {n: g.linears[0] for g in layout.groups for n in g.linears}
    solves: dict[str, list[int]] = {}
    for n in layout.linears:
        k_n = solves.setdefault(leader.get(n, n), [w[n].shape[1], 0, 0])
        k_n[1] += w[n].shape[0]
        k_n[2] += 1
    return LayerShape(params, sum(math.prod(i.shape) for i in w.values()), sum(i.nbytes for i in w.values()),
                      tuple(tuple(v) for v in solves.values()))


def skeleton_params(table: dict, adapter) -> tuple[int, int]:
    """(all non-layer weights, the head's: lm_head or, tied, the token embeddings) of a checkpoint."""
    import math

    layers = f"{adapter.layout.text}layers."
    rest = {n: math.prod(i.shape) for n, i in table.items() if not n.startswith(layers)}
    head = sum(v for n, v in rest.items() if adapter.is_lm_head(n.rpartition(".")[0])) or rest.get(adapter.embed_tokens, 0)
    return sum(rest.values()), head


def _inverse_bytes(k: int) -> int:
    from .gptq import FLOAT64_INVERSE_MAX

    return 8 * k * k if k <= FLOAT64_INVERSE_MAX else 0  # a float64 working copy; wider: in place


def _gptq_phase(layers: int, layer: LayerShape, layer_bytes: int) -> int:
    """Peak of GPTQ on ``layers`` layers held in ``layer_bytes`` each (gptq_block): the Hessians
    accumulated together (float32), then solved widest input first, each freed after its solve.
    A solve holds its Hessian (float32, used in place above FLOAT64_INVERSE_MAX; a float64 copy
    up to it), the problem's weights transposed in float32 and its codes; the packed results
    of the solves before it stay."""
    solves = sorted(list(layer.solves) * layers, key=lambda s: -s[0])
    hess = [4 * k * k for k, _, _ in solves]
    peak = sum(hess)
    packed = 0
    for j, (k, n, _count) in enumerate(solves):
        peak = max(peak, sum(hess[j:]) + _inverse_bytes(k) + 5 * k * n + packed)
        packed += k * n // 2
    return layers * layer_bytes + peak


def memory_estimate(method: str, layer: LayerShape, *, tokens: int, hidden: int, store_dtype: torch.dtype,
                    capture_params: int, head_params: int, block_layers: int = 1) -> dict:
    """Predicted peak bytes of a streamed calibration run (without the process's imports): the
    larger of the capture phase and the block phase. The one account of what a run holds,
    used for the activation store's placement and by ``qvlm search-cost``'s formula.

    - capture: the skeleton in float32 (``capture_params``: vision tower, projector,
      embeddings, final norm, lm_head).
    - block phase, ``--method gptq``: one layer with its linears in their stored dtype
      (:class:`~qvlm_offline.sequential.StoredLinear`) during GPTQ (:func:`_gptq_phase`), in
      float32 once dequantized, plus the packed results; one set of activations.
    - block phase, ``--method qvlm``: lm_head + final norm (float32, the last block's KL);
      the block's layers in float32 with the search state (rounding logits, their gradient,
      two Adam moments, the float16 codes base and the step's weights: ~5.5 floats per weight)
      or, while its GPTQ start is solved, the layers + :func:`_gptq_phase`; 4 + ``block_layers``
      sets of activations (inputs, float and quantized paths, one target per block layer).
    Activations: ``tokens x hidden`` per set, in the store's dtype."""
    act = torch.empty((), dtype=store_dtype).element_size() * tokens * hidden
    float_layer = 4 * layer.params
    if method == "qvlm":
        block = max(int(block_layers * float_layer * 5.5), _gptq_phase(block_layers, layer, float_layer))
        skeleton, sets = 4 * head_params, 4 + block_layers
    else:
        rest = 4 * (layer.params - layer.linear_params)
        block = max(_gptq_phase(1, layer, layer.stored_bytes + rest),
                    float_layer + layer.linear_params // 2)
        skeleton, sets = 0, 1
    acts = act * sets
    capture = 4 * capture_params + act
    return {"capture_bytes": capture, "block_bytes": block, "activation_bytes": acts, "skeleton_bytes": skeleton,
            "block_phase_bytes": skeleton + block + acts, "predicted_peak_bytes": max(capture, skeleton + block + acts)}
