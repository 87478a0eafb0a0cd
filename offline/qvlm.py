"""The Q-VLM search: entropy-guided blocks of decoder layers, each block's rounding searched jointly.

Pipeline (one call of :func:`qvlm_search`; see ``shared/DESIGN.md`` "The method"):

1. **Profile.** Calibration samples go through the float model once, layer by layer
   (:class:`~qvlm_offline.sequential.StreamingModel`). For every decoder layer the
   entropy of its quantized input (the normalised residual stream that q/k/v read) and
   the dependency ``D(k, k+1)`` between consecutive layers' inputs are measured
   (:mod:`qvlm_offline.entropy`; the residual basis makes channel pairing meaningful).
2. **Partition.** :func:`~qvlm_offline.partition.partition_blocks` groups consecutive
   layers whose entropy (the paper's proxy for dependency) is high, at most
   ``max_block_layers`` per block.
3. **Search, block by block.** Inputs come from the already-quantized previous blocks
   (``X_q``), targets from the float model (``Y_fp``). Per block:
   a. *Smoothing* (schemes with int activations): per-channel factors migrate
      activation outliers into the weights, chosen from a small grid of migration
      strengths by block error, folded into the RMSNorm weights / ``up_proj`` rows.
   b. *GPTQ initialisation* on Hessians of ``X_q`` through the block.
   c. *Joint optimisation* of all linears of the block: learnable rounding offsets
      (rectified sigmoid, AdaRound-style, started at GPTQ's decisions) and per-group
      scale multipliers, minimising the entropy-weighted relative error of every
      layer output in the block against the float model, plus the KL divergence of
      next-token distributions for the last block (the auto-regressive term).
      Activations are fake-quantized per token exactly as the kernels do (with a
      straight-through gradient).
   d. *Hardening and a guard.* Offsets are rounded; the block error on the calibration
      set is compared with the GPTQ start and the better of the two is kept (recorded).
4. The quantized block runs on ``X_q`` to give the next block's inputs.

Output: the stored tensors of every decoder linear (``qweight``, float16 ``scales``,
``qzeros``) plus float tensors that changed (smoothed norms), ready for
:func:`qvlm_offline.export.export_checkpoint`, and a JSON-able report.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from qvlm_kernels.format import FormatError, LayerSpec, effective_group_size
from qvlm_kernels.pack import pack_codes, unpack_codes
from qvlm_kernels.reference import dequantize, fake_quantize_per_token

from .entropy import (
    DependencyMeter,
    EntropyMeter,
    entropy_dependency_correlation,
    measurement_bits,
    quantize_codes_per_token,
)
from .gptq import HessianAccumulator, quantize_gptq
from .partition import default_threshold, describe_partition, partition_blocks
from .rtn import quantize_rtn, to_float16_at_least
from .adapters import DecoderLayout
from .placement import Placement
from .report import peak_rss_gib
from .sequential import LayerInputs, StreamingModel, run_layer

_ZETA, _GAMMA = 1.1, -0.1  # rectified sigmoid stretch (AdaRound)
SMOOTH_ALPHAS = (0.0, 0.25, 0.5, 0.75)


@dataclass
class SearchConfig:
    max_block_layers: int = 2
    threshold: float | None = None  # None: lower median of the entropy profile
    iters: int = 150
    batch_samples: int = 4
    lr_round: float = 5e-2
    lr_scale: float = 1e-3
    eval_every: int = 25
    patience: int = 0  # stop a block after this many held-out checks without a new best (0: run all iters)
    holdout: float = 0.25  # share of calibration samples that only judge states (see _optimize)
    kl_weight: float = 1.0
    init: str = "gptq"  # or "rtn"
    smooth: bool | None = None  # None: on for schemes with int activations
    entropy_weighting: bool = True
    optimize_vision: bool = False
    vision_iters: int = 40
    vision_lr: float = 1e-4
    seed: int = 0
    compile: str = "auto"  # the soft weight through torch.compile: on, off, auto (layers >= COMPILE_MIN_WEIGHTS)

    def compiles(self, linear: nn.Linear) -> bool:
        if self.compile not in ("auto", "on", "off"):
            raise ValueError(f"compile must be auto, on or off, got {self.compile!r}")
        return self.compile == "on" or (self.compile == "auto" and linear.weight.numel() >= COMPILE_MIN_WEIGHTS)


@dataclass
class SearchResult:
    tensors: MutableMapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]  # hub module -> stored
    replaced: dict[str, torch.Tensor]  # hub tensor name -> new float tensor (smoothed norms)
    report: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- quantized linear


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _fake_act(x: torch.Tensor, bits: int | None) -> torch.Tensor:
    """Per-token symmetric fake-quant as the kernels do (in float32, also under bf16 autocast);
    straight-through gradient."""
    if bits is None:
        return x
    x = x.float()
    return x + (fake_quantize_per_token(x.detach(), bits) - x.detach())


def _group_index(k: int, group_size: int, device=None) -> torch.Tensor:
    if group_size == -1:
        return torch.zeros(k, dtype=torch.long, device=device)
    return torch.arange(k, device=device) // group_size


def _offsets(v: torch.Tensor, hard: bool) -> torch.Tensor:
    """Rounding offsets in [0, 1] from the logits ``v``: hard ``v >= 0``; soft, the hard value
    with the rectified sigmoid's gradient."""
    h = (v >= 0).to(torch.float32)
    if hard:
        return h
    # Train on the hard rounding (the loss is the real quantized error) with the
    # rectified sigmoid's gradient: a few hundred steps cannot close AdaRound's
    # soft-to-hard gap, a straight-through estimate has none.
    soft = torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)
    return soft + (h - soft).detach()


def _per_group(codes: torch.Tensor, z: torch.Tensor, s: torch.Tensor, gs: int) -> torch.Tensor:
    """``(codes [N, K] - zero) * scale`` with ``z, s [G, N]`` (groups of ``gs`` columns, the last one
    possibly narrower), by broadcasting over a ``[N, G, gs]``
    view: the same arithmetic per element as gathering each column's scale, but its gradient is
    a sum over the group (a gather's is a scatter-add, several times slower at 7B widths)."""
    z, s = z.t().unsqueeze(-1), s.t().unsqueeze(-1)  # [N, G, 1]
    n, k = codes.shape
    g = z.shape[1]
    if g * gs == k:
        return ((codes.view(n, g, gs) - z) * s).view(n, k)
    # a last group narrower than the others: the per-group values widened to the columns
    cols = lambda t: t.expand(n, g, gs).reshape(n, g * gs)[:, :k]  # noqa: E731
    return (codes - cols(z)) * cols(s)


def _soft_weight(v, log_mult, base, s0, z, qmax: float, gs: int) -> torch.Tensor:
    """The searched weight in training (soft) mode: what :meth:`SearchLinear.weight` computes."""
    return _per_group(torch.clamp(base + _offsets(v, False), 0, qmax), z, s0 * torch.exp(log_mult), gs)


COMPILE_MIN_WEIGHTS = 1 << 22  # ``compile="auto"``: layers this large (every LLaVA-7B linear; not smol-llava's)
_compiled: dict[str, Callable | None] = {}


def _compiled_soft_weight() -> Callable | None:
    """``_soft_weight`` through torch.compile (one fused loop per direction: C++ on CPUs, Triton
    on CUDA), or None once compiling failed here (then the eager ops serve, with one warning)."""
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(_soft_weight, dynamic=False)
    return _compiled["fn"]


class SearchLinear(nn.Module):
    """A linear layer on the qvlm grid with learnable rounding offsets and scale multipliers.

    Codes are ``base + h`` with ``h`` in [0, 1] (soft: rectified sigmoid of ``V``; hard:
    ``V >= 0``), clamped to the grid; weight = (code - zero) * scale. ``base`` is fixed
    at construction from a starting solution (GPTQ or RTN codes), so the hard start
    reproduces that solution exactly. All state lives on the float linear's device; the
    float weight itself is not kept (the search never reads it again). ``compile``: build
    the soft weight with :func:`torch.compile` (the steps' elementwise work, which at 7B widths
    costs about as much as the matmuls of one sample) instead of eager ops; same values.
    """

    def __init__(self, linear: nn.Linear, spec: LayerSpec, qweight, scales, qzeros, act_bits: int | None,
                 compile: bool = False):
        super().__init__()
        w = linear.weight.detach().to(torch.float32)
        dev = w.device
        n, k = w.shape
        self.in_features, self.out_features = k, n
        self.spec, self.act_bits = spec, act_bits
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.float32)
        self.register_buffer("s0", scales.to(dev, torch.float32))  # [G, N]
        z = torch.full_like(self.s0, float(spec.implicit_zero)) if qzeros is None else qzeros.to(dev, torch.float32)
        self.register_buffer("z", z)
        self.qmax = float((1 << spec.bits) - 1)
        self.group = effective_group_size(k, spec.group_size)
        codes = unpack_codes(qweight.to(dev), spec.bits).to(torch.float32).t()  # [N, K]
        # base so that the start code is base + r with r in {0, 1}, r = 1 where w/s lies below it
        gidx = _group_index(k, spec.group_size, dev)
        ratio = w / self.s0[gidx].t() + self.z[gidx].t()
        r = (ratio < codes).to(torch.float32)
        del ratio, w, gidx
        self.register_buffer("base", (codes - r).to(torch.float16))  # integers in [-1, 255]: exact in float16
        h0 = 0.25 + 0.5 * r  # soft start leaning to the start's decision
        self.v = nn.Parameter(-torch.log((_ZETA - _GAMMA) / (h0 - _GAMMA) - 1))
        self.log_mult = nn.Parameter(torch.zeros_like(self.s0))
        self.hard = True
        self.compiled = compile  # (not "compile": nn.Module.compile is a method)
        self.cached = None  # weight() shared by the samples of one step (set by weights_once)

    def scales(self) -> torch.Tensor:
        s = self.s0 * torch.exp(self.log_mult)
        if self.hard:  # exactly what is stored
            s = to_float16_at_least(s.detach()).to(torch.float32)
        return s

    def codes(self) -> torch.Tensor:
        return torch.clamp(self.base + _offsets(self.v, self.hard), 0, self.qmax)

    def weight(self) -> torch.Tensor:
        if self.compiled and not self.hard:
            fn = _compiled_soft_weight()
            if fn is not None:
                try:
                    return fn(self.v, self.log_mult, self.base, self.s0, self.z, self.qmax, self.group)
                except Exception as e:  # no C++ compiler / Triton here: eager from now on
                    warnings.warn(f"qvlm search: torch.compile of the soft weight failed ({type(e).__name__}: "
                                  f"{str(e)[:200]}); using eager ops", stacklevel=2)
                    _compiled["fn"] = None
        return _per_group(self.codes(), self.z, self.scales(), self.group)

    def forward(self, x):
        w = self.cached if self.cached is not None else self.weight()
        return F.linear(_fake_act(x, self.act_bits), w, self.bias)

    @torch.no_grad()
    def stored(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        was = self.hard
        self.hard = True
        scales = to_float16_at_least(self.s0 * torch.exp(self.log_mult))
        codes = self.codes().t().contiguous().to(torch.uint8)  # [K, N]
        self.hard = was
        zeros = None if self.spec.symmetric else self.z.to(torch.uint8).cpu()
        return pack_codes(codes, self.spec.bits).cpu(), scales.cpu(), zeros


class ActQuantLinear(nn.Module):
    """A float linear whose input is fake-quantized per token (for Hessians and smoothing trials)."""

    def __init__(self, linear: nn.Linear, act_bits: int | None):
        super().__init__()
        self.linear, self.act_bits = linear, act_bits

    def forward(self, x):
        return self.linear(_fake_act(x, self.act_bits))


# ----------------------------------------------------------------------------- module plumbing

def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _rel_err(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of each token's relative squared error.

    Per token, not over the whole tensor: from the middle of a decoder stack on, the
    attention-sink token's residual state carries ~99% of the squared norm (measured on
    SmolLM2: norm 25,000 vs a median of 170), so a tensor-wide ratio would fit that one
    token and ignore the rest. The next layer's RMSNorm divides each token by its own
    norm, which is what this error sees.
    """
    t = target.to(y.device, torch.float32)
    num = (y.float() - t).pow(2).sum(-1)
    return (num / t.pow(2).sum(-1).clamp(min=1e-12)).mean()


def _kl(logits_q: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(P_fp || P_q) of next-token distributions (``lp``: float log-probs)."""
    lq = F.log_softmax(logits_q.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean()


class Block:
    """The decoder layers of one block, run on samples, with per-layer outputs.

    ``autocast()`` is the precision of passes through the quantized path (the placement's
    search dtype; float32 when none is given)."""

    def __init__(self, layers: list[nn.Module], linears: tuple[str, ...], placement: Placement | None = None):
        self.layers, self.linear_names = layers, linears
        self.autocast = placement.autocast if placement is not None else contextlib.nullcontext
        self.dtype = placement.search_dtype if placement is not None else torch.float32

    def outputs(self, x: LayerInputs, hidden: torch.Tensor | None = None) -> list[torch.Tensor]:
        h = x.hidden if hidden is None else hidden
        outs = []
        for layer in self.layers:
            h = run_layer(layer, x, h)
            outs.append(h)
        return outs

    def linears(self):
        for i, layer in enumerate(self.layers):
            for name in self.linear_names:
                yield i, name, layer


# ----------------------------------------------------------------------------- search


def _profile(model: StreamingModel, xs: list[LayerInputs], bits: int, progress: bool):
    """Float pass: per-layer input entropy and D(k, k+1) on the normalised residual stream.

    Each layer's input is quantized to codes once; the codes feed its entropy and both
    dependencies it takes part in.
    """
    P = model.placement
    ent, dep = [], []
    prev_codes = None
    hidden = [x.hidden for x in xs]
    input_norm = model.adapter.decoder.groups[0].norm  # the normalised residual stream layer i reads
    code_dtype = torch.int8 if bits <= 8 else torch.int32
    for i in tqdm(range(model.num_layers), desc="profile", unit="layer", disable=not progress):
        layer = model.load_layer(i)
        em = EntropyMeter(bits)
        dm = DependencyMeter(bits)
        codes = []
        with torch.no_grad():
            for j, x in enumerate(xs):
                c = quantize_codes_per_token(layer.get_submodule(input_norm)(P.fetch(hidden[j])), bits)
                em.update_codes(c)
                codes.append(c.to(P.store_device, code_dtype))
                if prev_codes is not None:
                    dm.update_codes(prev_codes[j].to(P.device), c)
                hidden[j] = P.store(run_layer(layer, x, hidden[j]))
        ent.append(em.entropy())
        if prev_codes is not None:
            dep.append(dm.conditional_entropy())
        prev_codes = codes
        del layer
    return ent, dep


def _smooth_factors(xmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    wmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0).clamp(min=1e-5)
    s = xmax.clamp(min=1e-5).pow(alpha) / wmax.pow(1 - alpha)
    return s.clamp(min=1e-4, max=1e4)


@torch.no_grad()
def _apply_smoothing(layer: nn.Module, stats: dict[str, torch.Tensor], alpha: float, layout: DecoderLayout) -> None:
    """Fold per-channel factors s (activations / s, weights * s) into each input group's norm or producer rows."""
    if alpha == 0.0:
        return
    for g in layout.groups:
        consumers = [layer.get_submodule(n) for n in g.linears]
        s = _smooth_factors(stats[g.key], [c.weight for c in consumers], alpha)
        if g.norm is not None:
            layer.get_submodule(g.norm).weight.div_(s)
        else:
            producer = layer.get_submodule(g.producer)
            producer.weight.div_(s.unsqueeze(1))
            if producer.bias is not None:
                producer.bias.div_(s)
        for c in consumers:
            c.weight.mul_(s.unsqueeze(0))


@torch.no_grad()
def _input_absmax(layer: nn.Module, xs: list[LayerInputs], hidden: list[torch.Tensor],
                  layout: DecoderLayout) -> dict[str, torch.Tensor]:
    stats: dict[str, torch.Tensor] = {}
    watch = {g.key: layer.get_submodule(g.linears[0]) for g in layout.groups}
    hooks = []
    for key, mod in watch.items():
        def hook(_m, args, key=key):
            v = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0)
            stats[key] = v if key not in stats else torch.maximum(stats[key], v)
        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        for x, h in zip(xs, hidden):
            run_layer(layer, x, h)
    finally:
        for hk in hooks:
            hk.remove()
    return stats


def _quantize_layer_rtn(layer: nn.Module, specs: dict[str, LayerSpec], act_bits) -> None:
    for name in specs:
        lin = layer.get_submodule(name)
        q = quantize_rtn(lin.weight.detach(), specs[name], name)
        _set(layer, name, dequantized_linear(lin, q, specs[name], act_bits))


def _searched(block: Block) -> list[SearchLinear]:
    return [m for layer in block.layers for m in layer.modules() if isinstance(m, SearchLinear)]


def _block_error(block: Block, xs, hidden_q, targets) -> float:
    """Mean relative squared error of the block's output over the samples."""
    with torch.no_grad(), weights_once(_searched(block), False, block.dtype), block.autocast():
        errs = [float(_rel_err(block.outputs(x, h)[-1], t[-1])) for x, h, t in zip(xs, hidden_q, targets)]
    return sum(errs) / max(len(errs), 1)


def _float_logp(head: Callable, target: list[torch.Tensor]) -> torch.Tensor:
    """The float model's next-token log-probs for one sample (from its last-layer target).

    Recomputed where needed rather than kept: ``[T, vocab]`` float32 per sample is more
    than the sample's hidden states by the ratio vocab / width (8x at LLaVA-7B)."""
    with torch.no_grad(), torch.autocast(target[-1].device.type, enabled=False):
        return F.log_softmax(head(target[-1]).float(), -1)


def _sample_loss(block: Block, x, h, target, weights, head, kl_weight) -> torch.Tensor:
    """The search objective on one sample: entropy-weighted layer errors (+ KL to the float
    model's next-token distribution for the last block, ``head`` = final norm + lm_head)."""
    outs = block.outputs(x, h)
    loss = sum(w * _rel_err(y, t) for w, y, t in zip(weights, outs, target))
    if head is not None and kl_weight:
        loss = loss + kl_weight * _kl(head(outs[-1]), _float_logp(head, target))
    return loss


def _objective(block: Block, xs, hidden_q, targets, weights, head, kl_weight) -> float:
    with torch.no_grad(), block.autocast():
        vals = [float(_sample_loss(block, x, h, t, weights, head, kl_weight))
                for x, h, t in zip(xs, hidden_q, targets)]
    return sum(vals) / max(len(vals), 1)


def _choose_smoothing(layer_fp: nn.Module, specs, act_bits, xs, hidden_q, targets, layout: DecoderLayout,
                      placement: Placement | None = None) -> float:
    """Best migration strength for one decoder layer, by its output error with RTN weights."""
    stats = _input_absmax(layer_fp, xs, hidden_q, layout)
    best, best_err = 0.0, math.inf
    for alpha in SMOOTH_ALPHAS:
        trial = copy.deepcopy(layer_fp)
        _apply_smoothing(trial, stats, alpha, layout)
        _quantize_layer_rtn(trial, specs, act_bits)
        err = _block_error(Block([trial], layout.linears, placement), xs, hidden_q, [[t] for t in targets])
        if err < best_err:
            best, best_err = alpha, err
    _apply_smoothing(layer_fp, stats, best, layout)
    return best


def gptq_block(block: Block, specs: dict[tuple[int, str], LayerSpec], act_bits, xs, hidden_q,
               shared: tuple[tuple[str, ...], ...] = ()) -> dict:
    """Hessians of the block's linear inputs (X_q through the float block) -> GPTQ solutions.

    ``shared``: groups of linears that read the same input (the layout's input groups,
    e.g. q/k/v): one Hessian per group, the same matrix each would accumulate alone."""
    leader = {n: g[0] for g in shared for n in g}
    accs: dict[tuple[int, str], HessianAccumulator] = {}
    hooks = []
    for i, name, layer in block.linears():
        lin = layer.get_submodule(name)
        if leader.get(name, name) != name:
            continue
        # float32 sums: exact enough over one calibration set's tokens, and twice as fast as float64
        acc = HessianAccumulator(lin.in_features, dtype=torch.float32, device=lin.weight.device)
        accs[(i, name)] = acc
        hooks.append(lin.register_forward_pre_hook(
            lambda _m, args, acc=acc: acc.update(fake_quantize_per_token(args[0], act_bits) if act_bits else args[0])))
    try:
        with torch.no_grad(), block.autocast():
            for x, h in zip(xs, hidden_q):
                block.outputs(x, h)
    finally:
        for hk in hooks:
            hk.remove()
    hessians = {key: accs.pop(key).take() for key in list(accs)}  # scaled in place: no copies
    # The linears of one group with one spec are solved as one GPTQ problem, their rows stacked:
    # GPTQ treats rows independently given the Hessian, so this is each one's own solution, with
    # one Hessian inverse and one column sweep for the group instead of one per linear.
    jobs: dict[tuple, list[tuple[int, str]]] = {}
    for i, name, _layer in block.linears():
        jobs.setdefault((i, leader.get(name, name), specs[(i, name)]), []).append((i, name))
    uses = collections.Counter((i, lead) for i, lead, _spec in jobs)
    out = {key: None for key in specs}  # the block's order
    # Widest inputs first (the solves are independent): the largest Hessian (down_proj's, K x K
    # at K = 11008) is solved while only the small ones are alive, and freed first.
    order = sorted(jobs.items(), key=lambda kv: -hessians[kv[0][:2]].shape[0])
    for (i, lead, spec), members in order:
        lins = [block.layers[j].get_submodule(name) for j, name in members]
        w = [lin.weight.detach() for lin in lins]
        uses[(i, lead)] -= 1  # a Hessian's last use solves in its memory (K x K: 0.5 GB at K = 11008)
        last = uses[(i, lead)] == 0
        h = hessians.pop((i, lead)) if last else hessians[(i, lead)]
        solved = quantize_gptq(w, spec, h, name="+".join(name for _, name in members), overwrite_hessian=last)
        del w, h
        sizes = [lin.out_features for lin in lins]
        parts = [t.split(sizes, dim=1) if t is not None else [None] * len(sizes) for t in solved]
        for key, *stored in zip(members, *parts):
            out[key] = tuple(None if t is None else t.contiguous() for t in stored)
    return out


def input_groups(layout: DecoderLayout) -> tuple[tuple[str, ...], ...]:
    """Linears of a decoder layer that read the same input (one Hessian serves each group)."""
    return tuple(g.linears for g in layout.groups)


def _layer_weights(ent: list[float], start: int, end: int, on: bool) -> list[float]:
    if not on:
        return [1.0 / (end - start)] * (end - start)
    e = [max(ent[i], 1e-6) for i in range(start, end)]
    return [v / sum(e) for v in e]


class weights_once:
    """Compute each searched layer's weight once for a step or an evaluation, not once per sample,
    in the search dtype: under bf16 autocast one cast per step instead of one per sample (and one
    bf16 copy kept for the backward pass instead of one per sample)."""

    def __init__(self, slins: list[SearchLinear], grad: bool, dtype: torch.dtype = torch.float32):
        self.slins, self.grad, self.dtype = slins, grad, dtype

    def __enter__(self):
        with torch.set_grad_enabled(self.grad):
            for s in self.slins:
                s.cached = s.weight().to(self.dtype)

    def __exit__(self, *exc):
        for s in self.slins:
            s.cached = None


def _take(values: list, idx: list[int]) -> list:
    return [values[j] for j in idx]


def _split(n: int, holdout: float) -> tuple[list[int], list[int]]:
    """(held-out, training) sample indices: every k-th sample held out; all of them for both if too few."""
    if holdout <= 0 or n < 4:
        return list(range(n)), list(range(n))
    k = max(2, round(1 / holdout))
    held = list(range(k - 1, n, k))
    return held, [j for j in range(n) if j not in set(held)]


def _optimize(block: Block, slins: list[SearchLinear], xs, hidden_q, targets, weights, cfg: SearchConfig,
              head: Callable | None, gen: torch.Generator) -> tuple[list[float], float, int]:
    """Adam on rounding logits and scale multipliers; returns (losses, best objective, its step).

    Steps draw from the training part of the calibration samples; the hard objective on
    the held-out part (``cfg.holdout``, every k-th sample) is checked every
    ``cfg.eval_every`` steps and at the start, and the best state seen is restored. The
    hold-out keeps a few dozen samples' worth of rounding decisions from being fitted to
    noise: a state is kept only if it also helps samples it was not trained on. With
    ``cfg.patience`` the block stops after that many checks in a row without a new best
    (the steps it saves are where the held-out error has stopped improving).
    """
    opt = torch.optim.Adam([{"params": [s.v for s in slins], "lr": cfg.lr_round},
                            {"params": [s.log_mult for s in slins], "lr": cfg.lr_scale}])
    snapshot = lambda: [(s.v.detach().clone(), s.log_mult.detach().clone()) for s in slins]  # noqa: E731
    held, train = _split(len(xs), cfg.holdout)

    def evaluate() -> float:
        with weights_once(slins, False, block.dtype):
            return _objective(block, _take(xs, held), _take(hidden_q, held), _take(targets, held), weights, head,
                              cfg.kl_weight)

    best_err, best_step, best = evaluate(), 0, snapshot()
    losses = []
    for it in range(1, cfg.iters + 1):
        for s in slins:
            s.hard = False
        idx = [train[j] for j in torch.randperm(len(train), generator=gen)[: cfg.batch_samples].tolist()]
        with weights_once(slins, True, block.dtype):
            with block.autocast():
                loss = sum(_sample_loss(block, xs[j], hidden_q[j], targets[j], weights, head, cfg.kl_weight)
                           for j in idx) / len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        for s in slins:
            s.hard = True
        if it % cfg.eval_every == 0 or it == cfg.iters:
            err = evaluate()
            if err < best_err:
                best_err, best_step, best = err, it, snapshot()
            elif cfg.patience and (it - best_step) // cfg.eval_every >= cfg.patience:
                break
    with torch.no_grad():
        for s, (v, lm) in zip(slins, best):
            s.v.copy_(v)
            s.log_mult.copy_(lm)
    return losses, best_err, best_step


def _dequantize_into(out: torch.Tensor, stored, spec: LayerSpec, band: int = 512) -> None:
    """The stored tensors' float32 weight written into ``out [N, K]`` a band of input rows at a
    time (the band's temporaries, not three ``[K, N]`` float32 copies beside ``out``)."""
    qweight, scales, qzeros = stored
    k = out.shape[1]
    rows = 8 if spec.bits == 4 else 1  # code rows per stored row
    gs = effective_group_size(k, spec.group_size)
    unit = math.lcm(gs if spec.group_size != -1 else 1, rows)
    band = unit * max(1, band // unit)
    for k0 in range(0, k, band):
        k1 = min(k0 + band, k)
        grouped = spec.group_size != -1
        g = slice(k0 // gs, -(-k1 // gs)) if grouped else slice(None)
        part = dequantize(qweight[k0 // rows:k1 // rows], scales[g], None if qzeros is None else qzeros[g], spec)
        out[:, k0:k1].copy_(part.t())


@torch.no_grad()
def dequantized_linear(lin: nn.Linear, stored, spec: LayerSpec, act_bits: int | None) -> ActQuantLinear:
    """``lin`` turned in place into the stored math: its weight becomes the dequantized stored
    tensors (no copy of the layer), its input fake-quantized per token as the kernels do."""
    stored = tuple(t.to(lin.weight.device) if t is not None else None for t in stored)
    if lin.weight.dtype != torch.float32:  # a 16-bit StoredLinear: the stored math needs float32
        shape, device = lin.weight.shape, lin.weight.device  # (codes x scales are not 16-bit exact)
        lin.weight = None  # the 16-bit weight goes before its float32 successor is allocated
        lin.weight = nn.Parameter(torch.empty(shape, dtype=torch.float32, device=device), requires_grad=False)
    _dequantize_into(lin.weight, stored, spec)
    return ActQuantLinear(lin, act_bits)


def _frozen_layer(layer: nn.Module, act_bits: int | None) -> nn.Module:
    """A searched decoder layer with its linears as plain float layers holding the stored math."""
    for name, sl in list(layer.named_modules()):
        if not isinstance(sl, SearchLinear):
            continue
        lin = nn.Linear(sl.in_features, sl.out_features, bias=sl.bias is not None, device=sl.s0.device)
        with torch.no_grad():
            lin.weight.copy_(sl.weight())
            if sl.bias is not None:
                lin.bias.copy_(sl.bias)
        _set(layer, name, ActQuantLinear(lin, act_bits))
    return layer.requires_grad_(False)


def _text_positions(inputs: dict, image_token_id: int) -> torch.Tensor:
    return inputs["input_ids"][0] != image_token_id


def _optimize_vision(model: StreamingModel, qlayers: list[nn.Module], model_inputs: list[dict],
                     hidden_fp: list[torch.Tensor], cfg: SearchConfig, gen: torch.Generator, progress: bool) -> dict:
    """Visual stage: tune the projector so the *quantized* language model reproduces the float model.

    The block-wise search ignores how the error of one block propagates through the next
    (the cross-block dependency); visual tokens carry most of the calibration tokens, and
    the projector decides where they sit in the residual stream. Minimising the next-token
    KL of the whole quantized model to the float model w.r.t. the projector (a first-order
    treatment of that dependency) moves visual tokens to where the quantized blocks
    reproduce the float model, while the KL keeps the float model's outputs. The best
    state on the calibration set (including the start) is kept. Needs the whole quantized
    language model in memory (dequantized float32 weights).
    """
    lm = model.language_model
    saved_layers, saved_n = lm.layers, lm.config.num_hidden_layers
    lm.layers, lm.config.num_hidden_layers = nn.ModuleList(qlayers), len(qlayers)
    proj = model.model.get_submodule(model.adapter.projector_module)
    image_token = model.config.image_token_id
    P = model.placement
    targets = [F.log_softmax(model.head(h).float(), -1)[0] for h in hidden_fp]
    masks = [_text_positions(inp, image_token).to(P.device) for inp in model_inputs]

    def kl(j: int) -> torch.Tensor:
        inp = P.to_device({k: (v.to(torch.float32) if torch.is_floating_point(v) else v)
                           for k, v in model_inputs[j].items()})
        logits = model.model(**inp, use_cache=False).logits[0]
        lq = F.log_softmax(logits.float(), -1)
        lp = targets[j]
        m = masks[j]
        return (lp[m].exp() * (lp[m] - lq[m])).sum(-1).mean()

    def evaluate() -> float:
        with torch.no_grad():
            return sum(float(kl(j)) for j in range(len(model_inputs))) / len(model_inputs)

    try:
        t0 = time.perf_counter()
        proj.requires_grad_(True)
        start_state = {k: v.detach().clone() for k, v in proj.state_dict().items()}
        best_kl = kl_start = evaluate()
        best_state, best_step = start_state, 0
        opt = torch.optim.Adam(proj.parameters(), lr=cfg.vision_lr)
        n = len(model_inputs)
        for it in tqdm(range(1, cfg.vision_iters + 1), desc="vision", unit="step", disable=not progress):
            idx = torch.randperm(n, generator=gen)[: cfg.batch_samples].tolist()
            loss = sum(kl(j) for j in idx) / len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if it % cfg.eval_every == 0 or it == cfg.vision_iters:
                val = evaluate()
                if val < best_kl:
                    best_kl, best_step = val, it
                    best_state = {k: v.detach().clone() for k, v in proj.state_dict().items()}
        proj.load_state_dict(best_state)
        proj.requires_grad_(False)
        return {"kl_start": kl_start, "kl_final": best_kl, "best_step": best_step, "iters": cfg.vision_iters,
                "seconds": time.perf_counter() - t0}
    finally:
        lm.layers, lm.config.num_hidden_layers = saved_layers, saved_n


def _head_fn(model: StreamingModel):
    for p in model.model.parameters():
        p.requires_grad_(False)
    return model.head


def qvlm_search(
    model_dir,
    model_inputs: list[dict],
    spec_for: Callable[[str], LayerSpec | None],
    cfg: SearchConfig | None = None,
    *,
    progress: bool = True,
    placement: Placement | None = None,
    store: MutableMapping | None = None,
) -> SearchResult:
    """Run the Q-VLM search on the language model of ``model_dir`` (any family in :mod:`qvlm_offline.adapters`).

    ``model_inputs``: processor outputs per calibration sample
    (:func:`qvlm_offline.calibration.build_model_inputs`). ``spec_for(hub module name)``
    gives each decoder linear's storage spec (the export's quantization config).
    ``placement``: device, search precision and activation store (default: CPU, float32).
    ``store``: where each finished linear's stored tensors go (default a dict in memory;
    :class:`~qvlm_offline.spill.SpilledTensors` keeps them on disk).
    """
    cfg = cfg or SearchConfig()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t_start = time.perf_counter()
    model = StreamingModel(model_dir, placement=placement)
    P = model.placement
    layout = model.adapter.decoder
    head = _head_fn(model)
    xs = model.first_layer_inputs(model_inputs, progress=progress)
    if not cfg.optimize_vision:  # the visual stage runs the whole model again
        model.release_input_side()

    names = model.adapter.layer_prefixes
    specs_all = []
    for prefix in names:
        specs = {n: spec_for(f"{prefix}.{n}") for n in layout.linears}
        if any(s is None for s in specs.values()):
            raise FormatError(f"{prefix}: the qvlm search quantizes whole decoder layers; some linears are ignored")
        specs_all.append(specs)
    act_bits = specs_all[0][layout.linears[0]].act_bits
    smooth = cfg.smooth if cfg.smooth is not None else act_bits is not None

    peaks = {"capture": peak_rss_gib(), "blocks": []}
    t0 = time.perf_counter()
    bits = measurement_bits(act_bits)
    ent, dep = _profile(model, xs, bits, progress)
    profile_s = time.perf_counter() - t0
    threshold = cfg.threshold if cfg.threshold is not None else default_threshold(ent)
    blocks = partition_blocks(ent, cfg.max_block_layers, threshold)

    tensors, replaced, block_reports, kept_layers = {} if store is None else store, {}, [], []
    held, _ = _split(len(xs), cfg.holdout)
    # the reported block errors (rtn / start / final) are measured on the held-out samples:
    # a diagnostic needs no full pass over the calibration set per block and state
    held_out = lambda *lists: [_take(v, held) for v in lists]  # noqa: E731
    hidden_fp = [x.hidden for x in xs]
    hidden_q = [x.hidden for x in xs]
    bar = tqdm(blocks, desc="search", unit="block", disable=not progress)
    for b, (start, end) in enumerate(bar):
        tb = time.perf_counter()
        layers = [model.load_layer(i).requires_grad_(False) for i in range(start, end)]
        with torch.no_grad():  # float targets in float32, also with a bf16 search
            targets = [[P.store(y) for y in Block(layers, layout.linears).outputs(x, h)]
                       for x, h in zip(xs, hidden_fp)]
        alphas = []
        if smooth:  # layer by layer on the quantized path's inputs
            h_in = hidden_q
            for li, layer in enumerate(layers):
                t_layer = [t[li] for t in targets]
                alphas.append(_choose_smoothing(layer, specs_all[start + li], act_bits, xs, h_in, t_layer, layout, P))
                with torch.no_grad(), P.autocast():
                    h_in = [P.store(run_layer(layer, x, h)) for x, h in zip(xs, h_in)]
            del h_in
            for i, layer in enumerate(layers):
                for norm in layout.norms:
                    replaced[f"{names[start + i]}.{norm}.weight"] = layer.get_submodule(norm).weight.detach().cpu().clone()
        specs = {(i, n): specs_all[start + i][n] for i in range(end - start) for n in layout.linears}

        # RTN reference and the GPTQ start
        rtn_layers = [copy.deepcopy(layer) for layer in layers]
        for i, layer in enumerate(rtn_layers):
            _quantize_layer_rtn(layer, specs_all[start + i], act_bits)
        err_rtn = _block_error(Block(rtn_layers, layout.linears, P), *held_out(xs, hidden_q, targets))
        del rtn_layers
        starts = (gptq_block(Block(layers, layout.linears, P), specs, act_bits, xs, hidden_q, input_groups(layout))
                  if cfg.init == "gptq" else
                  {(i, n): quantize_rtn(layer.get_submodule(n).weight.detach(), specs[(i, n)], n)
                   for i, layer in enumerate(layers) for n in layout.linears})
        searched = {}  # the float layers become the searched ones: each linear's float weight is freed here
        for (i, name), q in starts.items():
            lin = layers[i].get_submodule(name)
            sl = SearchLinear(lin, specs[(i, name)], *q, act_bits, compile=cfg.compiles(lin))
            _set(layers[i], name, sl)
            searched[(i, name)] = sl
        del starts
        slins = list(searched.values())
        qblock = Block(layers, layout.linears, P)
        err_init = _block_error(qblock, *held_out(xs, hidden_q, targets))
        weights = _layer_weights(ent, start, end, cfg.entropy_weighting)
        is_last = end == model.num_layers
        losses, obj, best_step = [], None, 0
        t_steps = time.perf_counter()
        if cfg.iters > 0:
            losses, obj, best_step = _optimize(qblock, slins, xs, hidden_q, targets, weights, cfg,
                                               head if is_last else None, gen)
        t_steps = time.perf_counter() - t_steps
        err_final = _block_error(qblock, *held_out(xs, hidden_q, targets))

        with torch.no_grad(), weights_once(slins, False, P.search_dtype), P.autocast():
            hidden_q = [P.store(qblock.outputs(x, h)[-1]) for x, h in zip(xs, hidden_q)]
        hidden_fp = [t[-1] for t in targets]
        for (i, name), sl in searched.items():
            tensors[f"{names[start + i]}.{name}"] = sl.stored()
        block_reports.append({
            "block": b, "start": start, "end": end, "layer_weights": weights, "smoothing_alpha": alphas,
            "error_rtn": err_rtn, f"error_{cfg.init}": err_init, "error_final": err_final, "objective_final": obj,
            "best_step": best_step, "steps": len(losses), "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "seconds": time.perf_counter() - tb, "seconds_steps": t_steps,  # the optimisation steps (+ held-out checks)
        })
        bar.set_postfix(rtn=f"{err_rtn:.3g}", init=f"{err_init:.3g}", final=f"{err_final:.3g}")
        if cfg.optimize_vision:
            kept_layers.extend(_frozen_layer(layer, act_bits) for layer in layers)
        del layers, qblock, slins, targets, searched
        peaks["blocks"].append(peak_rss_gib())

    vision_report = None
    if cfg.optimize_vision:
        vision_report = _optimize_vision(model, kept_layers, model_inputs, hidden_fp, cfg, gen, progress)
        proj = model.model.get_submodule(model.adapter.projector_module)
        for name, p in proj.named_parameters():
            replaced[f"{model.adapter.projector}{name}"] = p.detach().clone()
        # does the tuned projector lower the cross-layer dependency? (measured, not assumed)
        ent_v, dep_v = _profile(model, model.first_layer_inputs(model_inputs), bits, progress)
        vision_report |= {"entropy_after": ent_v, "dependency_after": dep_v,
                          "mean_dependency_before": sum(dep) / max(len(dep), 1),
                          "mean_dependency_after": sum(dep_v) / max(len(dep_v), 1)}

    report = {
        "method": "qvlm", "config": cfg.__dict__ | {"threshold": threshold}, "num_samples": len(xs),
        "tokens": sum(x.tokens for x in xs), "measurement_bits": bits,
        "block_errors_on": f"{len(held)} held-out samples",
        "layers": [{"index": i, "name": names[i], "entropy": ent[i],
                    "dependency_next": dep[i] if i < len(dep) else None} for i in range(len(names))],
        "correlation": entropy_dependency_correlation(ent[:-1], dep) if len(dep) > 1 else None,
        "partition": describe_partition(blocks, names), "blocks": block_reports,
        "profile_seconds": profile_s, "vision": vision_report, "placement": P.describe(), "peak_rss_gib_after": peaks,
        "seconds": time.perf_counter() - t_start,
    }
    return SearchResult(tensors, replaced, report)
