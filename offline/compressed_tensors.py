"""Write a qvlm checkpoint in compressed-tensors' layout, for stock vLLM and transformers.

The same integer codes and float16 scales a qvlm checkpoint holds (see ``kernels/format.py``),
re-laid out as compressed-tensors stores them, with a ``quantization_config`` built from the
``compressed-tensors`` package's own schema (``QuantizationArgs``, ``QuantizationScheme``,
``QuantizationConfig``) and written by its ``ModelCompressor.update_config``. Sub-byte codes are
packed with its ``pack_to_int32``. Nothing is re-rounded: codes ``u`` become ``u - 2**(b-1)``
(compressed-tensors' signed codes), zero points ``z`` become ``z - 2**(b-1)``, so
``(q - zp) * s == (u - z) * s`` for every weight. Scales stay float16 (bit for bit) unless
``scale_dtype`` asks for the model's dtype, which transformers needs (see ``SCALE_DTYPES``).

========  ==================  =====================================================
scheme    format              tensors per linear (``W [N, K]``)
========  ==================  =====================================================
w4a16     ``pack-quantized``  ``weight_packed`` int32 ``[N, K/8]``, ``weight_scale``
                              ``[N, G]``, ``weight_shape`` ``[N, K]``, asymmetric:
                              ``weight_zero_point`` int32 ``[ceil(N/8), G]``
w8a8      ``int-quantized``   ``weight`` int8 ``[N, K]``, ``weight_scale`` ``[N, 1]``;
                              activations int8 per token, dynamic, symmetric
w4a8      ``int-quantized``   ``weight`` int8 ``[N, K]`` (values in [-8, 7]),
                              ``weight_scale`` ``[N, G]``; activations as w8a8
========  ==================  =====================================================

What it refuses, with the module or setting named (never writes a checkpoint that reads back
as something else): w6a6 and w4a4 (per-token fake quantization with our ``absmax / qmax``
grid; compressed-tensors' dynamic activation grid is ``absmax / (qmax + 1/2)`` and vLLM has no
CPU or common GPU kernel for them); a partial last group (compressed-tensors' quantize and
decompress, vLLM's loaders and kernels all need ``K % group_size == 0``); asymmetric w4a8
(vLLM 0.32's int-quantized w4a8 scheme is symmetric only); per-module ``overrides`` and
``ignore`` regexes other than ours (they cannot be mapped to both readers' module names).

What it does not do: quantize. ``qvlm quantize --format compressed-tensors`` writes a qvlm
checkpoint first (RTN, GPTQ or the Q-VLM search) and converts it here.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm import tqdm

from qvlm_kernels.checkpoint import (
    check_trusted,
    find_quant_config,
    load_quant_config,
    read_config,
    read_tensor,
    tensor_table,
    validate_checkpoint,
)
from qvlm_kernels.format import QWEIGHT, QZEROS, SCALES, FormatError, LayerSpec, QVLMQuantConfig, get_scheme
from qvlm_kernels.pack import unpack_codes

from .adapters import ModelAdapter, adapter_for
from .export import (
    ExportReport,
    ShardWriter,
    build_quant_config,
    check_output_dir,
    copy_side_files,
    parse_size,
    staged_output,
)

FORMATS = ("qvlm", "compressed-tensors")
# float16: our scales exactly (vLLM casts them to its serving dtype when it loads).
# bfloat16 / float32: for transformers, which dequantizes in the scales' dtype and runs a
# pre-quantized llava-hf checkpoint in its stored dtypes, so the scales must match the model's
# float dtype (bfloat16 rounds each scale, relative error <= 2**-9; float32 is exact).
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"

# Ignore patterns of qvlm checkpoints written before the model adapters (hub names only) ->
# patterns that match the module in both readers' names: vLLM's (``vision_tower.vision_model.*``,
# ``language_model.lm_head``) and transformers 5's (``model.vision_tower.*``, ``lm_head``). Both
# use ``re.match``. The adapters' own patterns already match every reader's names.
_LEGACY_CT_IGNORE = {
    "re:^vision_tower\\.": "re:.*vision_tower\\.",
    "re:^multi_modal_projector\\.": "re:.*multi_modal_projector\\.",
}
# vLLM's ParallelLMHead is not a "Linear" by class; a quantized lm_head needs a name target.
_CT_LM_HEAD_TARGET = "re:(.*\\.)?lm_head$"


class NotExpressibleError(FormatError):
    """A qvlm checkpoint or setting that compressed-tensors (or vLLM's reader of it) cannot express."""


def _quantization_args(**kw):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(**kw)


def check_expressible(scheme: str, group_size: int, symmetric: bool, where: str = "") -> None:
    """Refuse settings compressed-tensors cannot hold for every layer (before any work is done)."""
    s = get_scheme(scheme)
    if s.act_mode == "fake":
        raise NotExpressibleError(
            f"{where}scheme {scheme} cannot be exported to compressed-tensors: its activations are fake-quantized "
            f"per token to {s.act_bits} bits on the grid absmax/{(1 << (s.act_bits - 1)) - 1}, compressed-tensors' "
            f"dynamic grid is absmax/{(1 << (s.act_bits - 1)) - 0.5} and vLLM has no kernel for it; "
            "use w4a16, w8a8 or w4a8, or keep --format qvlm"
        )
    if s.act_mode == "int8_dynamic" and s.weight_bits == 4 and not symmetric:
        raise NotExpressibleError(
            f"{where}scheme {scheme} with --no-symmetric cannot be exported to compressed-tensors: vLLM 0.32 "
            "reads int-quantized int4 weights with int8 activations only with symmetric weights "
            "(CompressedTensorsW4A8Int); use --symmetric, or keep --format qvlm"
        )
    if group_size != -1 and group_size <= 0:
        raise NotExpressibleError(f"{where}group_size {group_size} is neither -1 nor positive")


def check_layer_expressible(module: str, in_features: int, spec: LayerSpec) -> None:
    """Refuse a layer whose last group would be partial (K not a multiple of the group size)."""
    if spec.group_size != -1 and in_features % spec.group_size:
        fits = [g for g in range(8, min(spec.group_size, in_features) + 1, 8) if in_features % g == 0]
        hint = f"e.g. --group-size {fits[-1]}" if fits else "--group-size -1"
        raise NotExpressibleError(
            f"{module}: input width {in_features} is not a multiple of group_size {spec.group_size}; "
            "its partial last group cannot be expressed in compressed-tensors (its quantize/decompress and "
            f"vLLM's loaders need K % group_size == 0); re-quantize with a group size that divides {in_features} "
            f"({hint}) or keep --format qvlm"
        )


def ct_scheme(spec: LayerSpec, targets: list[str], scale_dtype: torch.dtype = torch.float16):
    """The compressed-tensors ``QuantizationScheme`` of layers stored as ``spec``."""
    from compressed_tensors.quantization import QuantizationScheme

    check_expressible(spec.scheme, spec.group_size, spec.symmetric)
    channel = spec.group_size == -1
    weights = _quantization_args(
        num_bits=spec.bits, type="int", symmetric=spec.symmetric, dynamic=False,
        strategy="channel" if channel else "group", group_size=None if channel else spec.group_size,
        scale_dtype=scale_dtype,
    )
    inputs = None
    if spec.act_mode == "int8_dynamic":
        inputs = _quantization_args(num_bits=8, type="int", symmetric=True, dynamic=True, strategy="token")
    fmt = PACK_QUANTIZED if inputs is None else INT_QUANTIZED
    return QuantizationScheme(targets=targets, weights=weights, input_activations=inputs, format=fmt)


def ct_ignore(ignore: Iterable[str], adapter: ModelAdapter) -> list[str]:
    """Our ``ignore`` entries in names both vLLM and transformers give the model's modules."""
    known = {p: p for p in (*adapter.ignore_vision, *adapter.ignore_lm_head)} | _LEGACY_CT_IGNORE
    out: list[str] = []
    for pat in ignore:
        if pat in known:
            mapped = [known[pat]]
        elif pat.startswith("re:"):
            raise NotExpressibleError(
                f"ignore pattern {pat!r} cannot be mapped to compressed-tensors' module names "
                f"(known patterns: {', '.join(known)})"
            )
        else:  # an exact checkpoint (hub layout) module name (vLLM maps it itself) and transformers' name
            mapped = [pat, adapter.transformers_name(pat)]
        out += [m for m in mapped if m not in out]
    return out


def build_ct_config(qcfg: QVLMQuantConfig, quantized: dict[str, tuple[int, int]], adapter: ModelAdapter,
                    scale_dtype: torch.dtype = torch.float16):
    """``QuantizationConfig`` for a qvlm checkpoint whose quantized modules are ``{module: (K, N)}``."""
    from compressed_tensors.quantization import QuantizationConfig

    if qcfg.overrides:
        raise NotExpressibleError(f"per-module overrides {sorted(qcfg.overrides)} are not supported by this converter")
    check_expressible(qcfg.scheme, qcfg.group_size, qcfg.symmetric)
    specs = {m: qcfg.layer_spec(m) for m in quantized}
    for m, (k, _) in quantized.items():
        check_layer_expressible(m, k, specs[m])
    targets = ["Linear"]
    if any(adapter.is_lm_head(m) for m in quantized):
        targets.append(_CT_LM_HEAD_TARGET)
    spec = qcfg.layer_spec(adapter.decoder_linears(0)[-1])
    scheme = ct_scheme(spec, targets, scale_dtype)
    return QuantizationConfig(
        config_groups={"group_0": scheme}, format=scheme.format, quantization_status="compressed",
        ignore=ct_ignore(qcfg.ignore, adapter),
    )


def _signed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes -> compressed-tensors' signed int8 codes (``u - 2**(b-1)``)."""
    return (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def ct_tensors(module: str, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
               spec: LayerSpec, scale_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """One layer's qvlm tensors -> its compressed-tensors tensors (names prefixed with ``module``)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = _signed(unpack_codes(qweight, spec.bits), spec.bits).t().contiguous()  # [N, K]
    out = {f"{module}.weight_scale": scales.t().to(scale_dtype).contiguous()}  # [N, G]
    if spec.act_mode == "none":
        out[f"{module}.weight_packed"] = pack_to_int32(codes, spec.bits)
        out[f"{module}.weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
        if qzeros is not None:
            zp = _signed(qzeros, spec.bits).t().contiguous()  # [N, G]
            out[f"{module}.weight_zero_point"] = pack_to_int32(zp, spec.bits, packed_dim=0).contiguous()
    else:
        out[f"{module}.weight"] = codes
        if qzeros is not None:
            out[f"{module}.weight_zero_point"] = _signed(qzeros, spec.bits).t().contiguous()
    return out


def expected_ct_shapes(spec: LayerSpec, k: int, n: int, scale_dtype: str = "float16"
                       ) -> dict[str, tuple[tuple[int, ...], str]]:
    g = 1 if spec.group_size == -1 else k // spec.group_size
    if spec.act_mode == "none":
        shapes = {"weight_packed": ((n, k * spec.bits // 32), "int32"), "weight_scale": ((n, g), scale_dtype),
                  "weight_shape": ((2,), "int64")}
        if not spec.symmetric:
            shapes["weight_zero_point"] = ((math.ceil(n * spec.bits / 32), g), "int32")
    else:
        shapes = {"weight": ((n, k), "int8"), "weight_scale": ((n, g), scale_dtype)}
        if not spec.symmetric:
            shapes["weight_zero_point"] = ((n, g), "int8")
    return shapes


def _linear_modules(table, adapter: ModelAdapter) -> list[str]:
    """Every linear of a checkpoint the adapter knows (quantized or not), by its hub-layout module name."""
    names = set()
    for name in table:
        module, _, suffix = name.rpartition(".")
        if suffix in ("weight", QWEIGHT, "weight_packed") and (
            adapter.is_decoder_linear(module) or adapter.is_vision_linear(module) or adapter.is_lm_head(module)
        ):
            names.add(module)
    return sorted(names)


def validate_ct_checkpoint(model_dir: str | Path) -> dict[str, tuple[int, int]]:
    """Check a compressed-tensors LLaVA checkpoint written here: config, tensors, coverage.

    The config must validate with compressed-tensors' ``QuantizationConfig``; every linear that
    its targets/ignore select (checked with compressed-tensors' own ``is_match``, in vLLM's and
    transformers' module names) must carry exactly the tensors its scheme's compressor reads, and
    every other linear must stay dense. Returns ``{module: (K, N)}`` of the quantized linears.
    """
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match

    model_dir = Path(model_dir)
    qc_dict = read_config(model_dir).get("quantization_config")
    if not isinstance(qc_dict, dict) or qc_dict.get("quant_method") != "compressed-tensors":
        raise FormatError(f"{model_dir / 'config.json'}: no compressed-tensors quantization_config")
    qc = QuantizationConfig.model_validate(qc_dict)
    (scheme,) = qc.config_groups.values()
    spec = LayerSpec("ct", scheme.weights.num_bits, scheme.weights.group_size or -1, scheme.weights.symmetric,
                     None if scheme.input_activations is None else 8,
                     "none" if scheme.input_activations is None else "int8_dynamic")
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    wanted = set(compressor.compression_param_names(scheme))
    scale_dtype = str(scheme.weights.scale_dtype or torch.float16).removeprefix("torch.")
    table = tensor_table(model_dir)
    adapter = adapter_for(model_dir, tensor_names=table)
    probe = torch.nn.Linear(1, 1, device="meta")
    modules: dict[str, tuple[int, int]] = {}
    for m in _linear_modules(table, adapter):
        selected = {is_match(name, probe, scheme.targets, qc.ignore) for name in (m, adapter.transformers_name(m))}
        if len(selected) != 1:
            raise FormatError(f"{model_dir}: module {m!r} is selected in one reader's names but not the other's")
        have = {name.rpartition(".")[2] for name in table if name.rpartition(".")[0] == m} - {"bias"}
        if not selected.pop():
            if have != {"weight"}:
                raise FormatError(f"{model_dir}: module {m!r} is ignored by quantization_config but holds {sorted(have)}")
            continue
        if have != wanted:
            raise FormatError(f"{model_dir}: module {m!r} holds {sorted(have)}, {scheme.format} needs {sorted(wanted)}")
        scale = table[f"{m}.weight_scale"]
        n = scale.shape[0]
        k = table[f"{m}.weight"].shape[1] if "weight" in wanted else int(read_tensor(table[f"{m}.weight_shape"])[1])
        for suffix, (shape, dtype) in expected_ct_shapes(spec, k, n, scale_dtype).items():
            t = table[f"{m}.{suffix}"]
            if tuple(t.shape) != shape or t.dtype_name != dtype:
                raise FormatError(f"{t.file}: tensor {t.name!r}: expected {dtype} {list(shape)}, "
                                  f"got {t.dtype_name} {list(t.shape)}")
        modules[m] = (k, n)
    if not modules:
        raise FormatError(f"{model_dir}: no quantized linear layer")
    return modules


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    *,
    scale_dtype: str = "float16",
    max_shard_size: str | int = "2GB",
    overwrite: bool = False,
    progress: bool = True,
) -> ExportReport:
    """Rewrite the qvlm checkpoint ``src`` as a compressed-tensors checkpoint ``out`` (atomically).

    Quantized layers are re-laid out (same codes, same scales); every other tensor is copied byte
    for byte, side files (tokenizer, processor, chat template) too. ``out`` appears only once it
    has been written and validated (``validate_ct_checkpoint``). ``scale_dtype``: see
    ``SCALE_DTYPES`` (float16 keeps our scales bit for bit).
    """
    from compressed_tensors.compressors import ModelCompressor

    src, out = Path(src), Path(out)
    check_trusted(src)
    check_output_dir(src, out, overwrite)
    qcfg = load_quant_config(src)
    quantized = validate_checkpoint(src, qcfg)
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {scale_dtype!r}")
    ct_config = build_ct_config(qcfg, quantized, adapter_for(src), SCALE_DTYPES[scale_dtype])  # refuses before anything is written
    config = read_config(src)
    config.pop("quantization_config", None)
    table = tensor_table(src)
    report = ExportReport(out)
    with staged_output(out) as tmp:
        writer = ShardWriter(tmp, parse_size(max_shard_size))
        for info in tqdm(table.values(), desc="convert to compressed-tensors", unit="tensor", disable=not progress):
            report.bytes_in += info.nbytes
            module, _, suffix = info.name.rpartition(".")
            if module not in quantized:
                writer.copy(info)
                continue
            if suffix != QWEIGHT:  # scales / qzeros are written with their qweight; biases are copied
                if suffix not in (SCALES, QZEROS):
                    writer.copy(info)
                continue
            qz = table.get(f"{module}.{QZEROS}")
            tensors = ct_tensors(module, read_tensor(info), read_tensor(table[f"{module}.{SCALES}"]),
                                 None if qz is None else read_tensor(qz), qcfg.layer_spec(module),
                                 SCALE_DTYPES[scale_dtype])
            for name, t in tensors.items():
                writer.add(name, t)
            report.quantized.append(module)
        writer.finish()
        report.bytes_out = writer.total_bytes
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        ModelCompressor(quantization_config=ct_config).update_config(str(tmp))
        copy_side_files(src, tmp)
        if set(validate_ct_checkpoint(tmp)) != set(quantized):
            raise FormatError(f"{out}: the written config selects other modules than {src} quantized")
    return report


def preflight_export(src: str | Path, scheme: str, group_size: int | None, symmetric: bool,
                     quantize_vision: bool, quantize_lm_head: bool) -> None:
    """Refuse a ``quantize --format compressed-tensors`` run before any calibration or search."""
    table = tensor_table(src)
    adapter = adapter_for(src, tensor_names=table)
    qcfg = build_quant_config(scheme, group_size, symmetric, quantize_vision, quantize_lm_head, producer={},
                              adapter=adapter)
    check_expressible(qcfg.scheme, qcfg.group_size, qcfg.symmetric)
    for info in table.values():
        module, _, suffix = info.name.rpartition(".")
        spec = qcfg.layer_spec(module)
        if (suffix == "weight" and len(info.shape) == 2 and spec is not None
                and adapter.wants_quantization(module, quantize_vision, quantize_lm_head)
                and info.shape[1] % spec.pack_factor == 0):
            check_layer_expressible(module, info.shape[1], spec)


def export_compressed_tensors(src: str | Path, out: str | Path, *, scale_dtype: str = "float16",
                              overwrite: bool = False, max_shard_size: str | int = "2GB", progress: bool = True,
                              **export_kwargs) -> ExportReport:
    """``export_checkpoint`` (same arguments) to a qvlm checkpoint in a scratch sibling of ``out``,
    then ``convert_checkpoint`` of it to ``out``; the scratch directory is always removed."""
    from .export import export_checkpoint

    src, out = Path(src), Path(out)
    check_output_dir(src, out, overwrite)
    if find_quant_config(read_config(src)) is not None:
        raise FormatError(f"{src / 'config.json'}: the source is already quantized; start from a 16/32-bit model")
    preflight_export(src, export_kwargs["scheme"], export_kwargs.get("group_size"),
                     export_kwargs.get("symmetric", True), export_kwargs.get("quantize_vision", False),
                     export_kwargs.get("quantize_lm_head", False))
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.qvlm-", dir=out.parent))
    try:
        qdir = scratch / "qvlm"
        report = export_checkpoint(src, qdir, max_shard_size=max_shard_size, progress=progress, **export_kwargs)
        converted = convert_checkpoint(qdir, out, scale_dtype=scale_dtype, max_shard_size=max_shard_size,
                                       overwrite=overwrite, progress=progress)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report.out_dir, report.bytes_out = out, converted.bytes_out
    return report


__all__ = [
    "FORMATS", "SCALE_DTYPES", "NotExpressibleError", "check_expressible", "check_layer_expressible", "ct_scheme", "ct_ignore",
    "build_ct_config", "ct_tensors", "validate_ct_checkpoint", "convert_checkpoint", "export_compressed_tensors",
    "preflight_export",
]
