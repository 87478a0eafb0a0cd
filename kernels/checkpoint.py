"""Safetensors checkpoint I/O shared by the writer and the loader.

Reads headers and single tensors with plain file reads (no mmap, no pickle), so a
scan touches only headers and a streaming rewrite holds one tensor at a time; and
validates a qvlm checkpoint against ``format.py`` with errors that name the file
and the tensor at fault.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .format import QUANT_TENSOR_SUFFIXES, QWEIGHT, QZEROS, SCALES, FormatError, QVLMQuantConfig

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.dtype, self.dtype)


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Tensor table of one safetensors file; raises FormatError for a damaged or truncated file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise FormatError(f"{path}: not a safetensors file (only {size} bytes)")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > min(_MAX_HEADER, size - 8):
            raise FormatError(f"{path}: truncated or not a safetensors file (header length {hlen}, file {size} bytes)")
        try:
            header = json.loads(f.read(hlen))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"{path}: corrupt safetensors header: {e}") from None
    base = 8 + hlen
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (s, e) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: tensor {name!r}: malformed header entry {meta!r}") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise FormatError(f"{path}: tensor {name!r}: unsupported dtype {dtype}")
        if base + e > size:
            raise FormatError(
                f"{path}: truncated: tensor {name!r} ends at byte {base + e} but the file has {size} bytes"
            )
        numel = 1
        for d in shape:
            numel *= d
        if (e - s) != numel * SAFETENSORS_DTYPES[dtype].itemsize:
            raise FormatError(f"{path}: tensor {name!r}: {e - s} bytes do not match {dtype} shape {list(shape)}")
        out[name] = TensorInfo(path, name, dtype, shape, base + s, base + e)
    return out


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor into fresh memory (plain read: RSS grows by this tensor only)."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    with open(info.file, "rb") as f:
        f.seek(info.start)
        n = f.readinto(memoryview(buf.numpy()))
    if n != info.nbytes:
        raise FormatError(f"{info.file}: truncated: tensor {info.name!r} is short by {info.nbytes - n} bytes")
    return buf.view(SAFETENSORS_DTYPES[info.dtype]).reshape(info.shape)


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors shards of a model directory (index file or a single file)."""
    d = Path(model_dir)
    index = d / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise FormatError(f"{index}: not a valid safetensors index: {e}") from None
        files = []
        for fname in dict.fromkeys(weight_map.values()):
            p = (d / fname).resolve()
            if d.resolve() not in p.parents:
                raise FormatError(f"{index}: shard {fname!r} points outside the model directory")
            if not p.exists():
                raise FormatError(f"{index}: shard {fname!r} is missing")
            files.append(p)
        return files
    if (d / SINGLE_FILE).exists():
        return [d / SINGLE_FILE]
    found = sorted(d.glob("*.safetensors"))
    if found:
        return found
    if any(d.glob("*.bin")) or any(d.glob("*.pt")):
        raise FormatError(f"{d}: only pickle weights (.bin/.pt) found; qvlm reads safetensors only")
    raise FormatError(f"{d}: no safetensors weights found")


def tensor_table(model_dir: str | Path) -> dict[str, TensorInfo]:
    table: dict[str, TensorInfo] = {}
    for f in weight_files(model_dir):
        for name, info in read_header(f).items():
            if name in table:
                raise FormatError(f"{f}: tensor {name!r} also appears in {table[name].file.name}")
            table[name] = info
    return table


def read_config(model_dir: str | Path) -> dict:
    p = Path(model_dir) / "config.json"
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise FormatError(f"{p}: missing") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{p}: invalid JSON: {e}") from None


def find_quant_config(config: dict) -> dict | None:
    """``quantization_config`` at the top level or in ``text_config`` (where vLLM also looks)."""
    qc = config.get("quantization_config")
    if qc is None:
        qc = (config.get("text_config") or {}).get("quantization_config")
    return qc


def load_quant_config(model_dir: str | Path) -> QVLMQuantConfig:
    p = Path(model_dir) / "config.json"
    qc = find_quant_config(read_config(model_dir))
    if qc is None:
        raise FormatError(f"{p}: no quantization_config; produce a qvlm checkpoint with `qvlm quantize` first")
    return QVLMQuantConfig.from_dict(qc, source=str(p))


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _find_key(obj, key: str, path: str = "") -> str | None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            here = f"{path}.{k}" if path else k
            if k == key:
                return here
            found = _find_key(v, key, here)
            if found:
                return found
    return None


def check_trusted(model_dir: str | Path) -> None:
    """Refuse what a qvlm checkpoint never needs: remote code, pickles, files outside the directory."""
    d = Path(model_dir)
    root = d.resolve()
    config = read_config(d)
    for key in ("auto_map", "trust_remote_code"):
        where = _find_key(config, key)
        if where:
            raise FormatError(
                f"{d / 'config.json'}: '{where}' asks for remote code; qvlm checkpoints never need it"
            )
    pickles = sorted(p.name for p in d.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise FormatError(f"{d}: pickle files {pickles} found; qvlm loads safetensors only and never unpickles")
    for f in weight_files(d):
        if root not in f.resolve().parents:
            raise FormatError(f"{f}: weight file resolves outside the model directory ({f.resolve()})")


def validate_checkpoint(model_dir: str | Path, cfg: QVLMQuantConfig | None = None) -> dict[str, tuple[int, int]]:
    """Check every quantized module against the format; return ``{module: (K, N)}``."""
    cfg = cfg or load_quant_config(model_dir)
    table = tensor_table(model_dir)
    modules: dict[str, tuple[int, int]] = {}
    for name, info in table.items():
        module, _, suffix = name.rpartition(".")
        if suffix not in QUANT_TENSOR_SUFFIXES:
            continue
        qw = table.get(f"{module}.{QWEIGHT}")
        if qw is None:
            raise FormatError(f"{info.file}: tensor {name!r} has no matching {module}.{QWEIGHT}")
        if module in modules:
            continue
        spec = cfg.layer_spec(module)
        if spec is None:
            raise FormatError(f"{qw.file}: tensor {qw.name!r} is quantized but quantization_config ignores {module!r}")
        if len(qw.shape) != 2:
            raise FormatError(f"{qw.file}: tensor {qw.name!r}: expected 2 dims, got shape {list(qw.shape)}")
        k, n = qw.shape[0] * spec.pack_factor, qw.shape[1]
        for suffix_, (shape, dtype) in spec.tensor_shapes(k, n).items():
            t = table.get(f"{module}.{suffix_}")
            if t is None:
                raise FormatError(
                    f"{qw.file}: tensor '{module}.{suffix_}' is missing "
                    f"({spec.scheme}, group_size {spec.group_size}, symmetric={spec.symmetric} needs it)"
                )
            if t.shape != shape or t.dtype_name != dtype:
                raise FormatError(
                    f"{t.file}: tensor {t.name!r}: expected {dtype} {list(shape)}, got {t.dtype_name} {list(t.shape)}"
                )
        if spec.symmetric and f"{module}.{QZEROS}" in table:
            raise FormatError(f"{qw.file}: tensor '{module}.{QZEROS}' present but the layer is symmetric")
        if f"{module}.weight" in table:
            raise FormatError(f"{qw.file}: module {module!r} has both a dense 'weight' and a '{QWEIGHT}'")
        modules[module] = (k, n)
    return modules


__all__ = [
    "TensorInfo", "read_header", "read_tensor", "weight_files", "tensor_table", "read_config",
    "find_quant_config", "load_quant_config", "validate_checkpoint", "SCALES",
]
