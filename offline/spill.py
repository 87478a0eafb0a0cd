"""Finished layers' stored tensors kept on disk until the export writes them.

The calibrated methods produce each decoder layer's stored tensors (packed codes, scales,
zeros) long before the export writes the output: held in a dict, they grow host memory by
the packed size of every layer done (about 0.1 GB per layer at 7B widths in 4 bits), so peak
memory would grow with depth. :class:`SpilledTensors` is the mapping the searches write
into instead: each value goes to a scratch file as it is set and is read back when the
export asks for it, so memory holds one layer's tensors at a time.

Rules: a value is a tuple of tensors or ``None`` (``(qweight, scales, qzeros | None)``);
tensors come back on the CPU with their dtype and shape; setting a key again replaces its
value (the file only grows). The scratch directory is removed by :meth:`close` (also at
garbage collection and interpreter exit).

What it does not do: compress, or survive the process (it is scratch, not a checkpoint).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import torch

_Entry = tuple[int, torch.dtype, tuple[int, ...]] | None


class SpilledTensors(MutableMapping):
    """``module name -> tuple of tensors``, the tensors kept in a scratch file under ``directory``
    (default: the system's temporary directory)."""

    def __init__(self, directory: str | Path | None = None):
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        self._dir = tempfile.TemporaryDirectory(prefix=".qvlm-spill-", dir=directory)
        self.path = Path(self._dir.name) / "tensors.bin"
        self._file = open(self.path, "w+b")
        self._index: dict[str, tuple[_Entry, ...]] = {}
        self.bytes_written = 0

    def _write(self, t: torch.Tensor | None) -> _Entry:
        if t is None:
            return None
        t = t.detach().cpu().contiguous()
        offset = self._file.seek(0, 2)
        if t.numel():
            self._file.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.bytes_written += t.numel() * t.element_size()
        return offset, t.dtype, tuple(t.shape)

    def _read(self, entry: _Entry) -> torch.Tensor | None:
        if entry is None:
            return None
        offset, dtype, shape = entry
        out = torch.empty(shape, dtype=dtype)
        if out.numel():
            self._file.seek(offset)
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            if self._file.readinto(view) != len(view):
                raise OSError(f"{self.path}: truncated scratch file")
        return out

    def __setitem__(self, key: str, value) -> None:
        self._index[key] = tuple(self._write(t) for t in value)

    def __getitem__(self, key: str) -> tuple:
        return tuple(self._read(e) for e in self._index[key])

    def __delitem__(self, key: str) -> None:
        del self._index[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def nbytes(self, key: str) -> int:
        """The bytes of ``key``'s tensors (without reading them)."""
        return sum(math.prod(e[2]) * e[1].itemsize for e in self._index[key] if e is not None)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._dir.cleanup()

    def __enter__(self) -> SpilledTensors:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
