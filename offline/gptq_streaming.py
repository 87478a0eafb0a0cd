"""``--method gptq`` through the streaming pipeline: GPTQ one decoder layer at a time.

The same layer-by-layer walk as the Q-VLM search (:class:`~qvlm_offline.sequential.StreamingModel`:
skeleton in memory, one decoder layer read from disk at a time), with plain GPTQ as the
per-layer algorithm: the Hessians of a layer's linears come from the outputs of the
already-quantized layers before it (llm-compressor's sequential pipeline), with the
activations fake-quantized per token as the kernels do for schemes with integer
activations. Peak memory is the skeleton + one layer + the calibration activations,
independent of the number of decoder layers.

Linears outside the decoder layers that the quantization config asks for get GPTQ
too: vision tower and projector linears (``--quantize-vision``) on Hessians collected
while the skeleton embeds the samples (float inputs: the tower runs before any
quantized layer), ``lm_head`` (``--quantize-lm-head``) on the final norm of the
quantized path's last hidden states.

What it does not do: choose blocks, smooth, or optimise rounding (that is
:mod:`qvlm_offline.qvlm`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping

import torch
from tqdm import tqdm

from qvlm_kernels.format import FormatError, LayerSpec
from qvlm_kernels.reference import fake_quantize_per_token

from .gptq import HessianAccumulator, quantize_gptq
from .placement import Placement
from .report import peak_rss_gib
from .qvlm import Block, SearchResult, _set, dequantized_linear, gptq_block, input_groups
from .sequential import StreamingModel


def _side_modules(model: StreamingModel, spec_for: Callable[[str], LayerSpec | None]) -> list[str]:
    ad = model.adapter
    return [n.rpartition(".")[0] for n, info in model.table.items()
            if n.endswith(".weight") and len(info.shape) == 2
            and (ad.is_vision_linear(n.rpartition(".")[0]) or ad.is_lm_head(n.rpartition(".")[0]))
            and spec_for(n.rpartition(".")[0]) is not None]


def _host(stored: tuple) -> tuple:
    """Stored tensors in host memory (the export writes from there)."""
    return tuple(None if t is None else t.cpu() for t in stored)


def _hook(acc: HessianAccumulator, act_bits: int | None):
    return lambda _m, args: acc.update(fake_quantize_per_token(args[0], act_bits) if act_bits else args[0])


@torch.no_grad()
def gptq_sequential(
    model_dir,
    model_inputs: list[dict],
    spec_for: Callable[[str], LayerSpec | None],
    *,
    progress: bool = True,
    placement: Placement | None = None,
    store: MutableMapping | None = None,
) -> SearchResult:
    """GPTQ of every linear the config quantizes, decoder layers streamed one at a time
    (``placement``: device, precision of the passes, activation store; default CPU, float32).
    ``store``: where each finished linear's stored tensors go (default a dict in memory;
    :class:`~qvlm_offline.spill.SpilledTensors` keeps them on disk, so memory stays flat in depth)."""
    t_start = time.perf_counter()
    model = StreamingModel(model_dir, placement=placement)
    P = model.placement
    ad, layout = model.adapter, model.adapter.decoder
    side = _side_modules(model, spec_for)
    vision = [m for m in side if ad.is_vision_linear(m)]
    accs, hooks = {}, []
    for m in vision:
        lin = model.model.get_submodule(ad.transformers_name(m))
        accs[m] = HessianAccumulator(lin.in_features, dtype=torch.float32, device=P.device)
        hooks.append(lin.register_forward_pre_hook(_hook(accs[m], spec_for(m).act_bits)))
    try:
        xs = model.first_layer_inputs(model_inputs, progress=progress)
    finally:
        for h in hooks:
            h.remove()
    tensors = {} if store is None else store
    for m in vision:
        tensors[m] = _host(quantize_gptq(model.model.get_submodule(ad.transformers_name(m)).weight.detach(),
                                         spec_for(m), accs.pop(m).take(), name=m, overwrite_hessian=True))
    del accs
    head = [m for m in side if ad.is_lm_head(m)]
    model.release_input_side(keep_head=bool(head))  # the head only serves its own GPTQ
    peaks = {"capture": peak_rss_gib(), "layers": []}

    tokens = sum(x.tokens for x in xs)
    hidden = [x.hidden for x in xs]
    for x in xs:  # the layers read hidden[j]: one set of activations alive, not layer 0's beside it
        x.hidden = None
    for i in tqdm(range(model.num_layers), desc="gptq", unit="layer", disable=not progress):
        prefix = ad.layer_prefix(i)
        specs = {(0, n): spec_for(f"{prefix}.{n}") for n in layout.linears}
        if any(s is None for s in specs.values()):
            raise FormatError(f"{prefix}: --method gptq quantizes whole decoder layers; some linears are ignored")
        act_bits = specs[(0, layout.linears[0])].act_bits
        layer = model.load_layer(i, stored_linears=True).requires_grad_(False)
        block = Block([layer], layout.linears, P)
        solved = gptq_block(block, specs, act_bits, xs, hidden, input_groups(layout))
        for (_, name), q in solved.items():
            tensors[f"{prefix}.{name}"] = _host(q)
            _set(layer, name, dequantized_linear(layer.get_submodule(name), q, specs[(0, name)], act_bits))
        with P.autocast():
            for j, x in enumerate(xs):  # replaced one sample at a time: one set of activations alive
                hidden[j] = P.store(block.outputs(x, hidden[j])[-1])
        del layer, block, solved
        peaks["layers"].append(peak_rss_gib())

    if head:
        spec = spec_for(head[0])
        acc = HessianAccumulator(model.model.lm_head.in_features, dtype=torch.float32, device=P.device)
        for h in hidden:
            y = model.language_model.norm(P.fetch(h))
            acc.update(fake_quantize_per_token(y, spec.act_bits) if spec.act_bits else y)
        q = quantize_gptq(model.model.lm_head.weight.detach(), spec, acc.take(), name=head[0], overwrite_hessian=True)
        tensors[head[0]] = _host(q)
    report = {"method": "gptq", "pipeline": "sequential", "num_samples": len(xs),
              "tokens": tokens, "placement": P.describe(), "peak_rss_gib_after": peaks,
              "seconds": time.perf_counter() - t_start}
    return SearchResult(tensors, {}, report)
