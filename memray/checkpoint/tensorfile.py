"""safetensors files written and read one tensor at a time.

A checkpoint's dense weights and Adam moments are produced one parameter at a time (under ZeRO
each is assembled from the ranks' partitions by a collective), so a writer that needed every
tensor at once would hold the whole model in one process. :class:`TensorFileWriter` writes the
header first (every name, dtype, shape and byte range, known before any tensor exists) and then
each tensor's bytes as it comes; the file is an ordinary safetensors file. :class:`TensorFile`
reads one (memory-mapped by safetensors) and returns a tensor only when it is asked for.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

# safetensors' names of the dtypes a checkpoint holds
_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

TensorSpecs = dict[str, tuple[torch.dtype, tuple[int, ...]]]  # name -> (dtype, shape)


class TensorFileWriter:
    """Write a safetensors file of ``specs`` (name -> (dtype, shape)), one tensor at a time, in
    the order of ``specs``: never more than one tensor in memory."""

    def __init__(self, path: str | Path, specs: TensorSpecs, metadata: dict[str, str] | None = None):
        self.order = list(specs)
        self.specs = {name: (dtype, tuple(int(n) for n in shape)) for name, (dtype, shape) in specs.items()}
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, (dtype, shape) in self.specs.items():
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.handle = open(path, "wb")
        self._digest = hashlib.sha256()  # of the bytes as they are written: the file is never read back
        self._write(struct.pack("<Q", len(raw)) + raw)
        self.written = 0

    def _write(self, data: bytes) -> None:
        self.handle.write(data)
        self._digest.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.written >= len(self.order) or name != self.order[self.written]:
            expected = self.order[self.written] if self.written < len(self.order) else "nothing"
            raise ValueError(f"tensor file: got '{name}', expected {expected}")
        dtype, shape = self.specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor file: '{name}' is {tensor.dtype} {list(tensor.shape)}, not {dtype} {list(shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._write(data.numpy().tobytes() if data.numel() else b"")
        self.written += 1

    def close(self) -> str:
        """Close the file once every tensor is written; its SHA-256 (hex)."""
        self.handle.close()
        if self.written != len(self.order):
            raise ValueError(f"tensor file: {len(self.order) - self.written} of {len(self.order)} tensors not written")
        return self._digest.hexdigest()

    def abort(self) -> None:
        """Close the file, incomplete (the save it belongs to is not committed)."""
        self.handle.close()


class TensorFile(Mapping):
    """The tensors of a safetensors file by name, each read from the file when asked for."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        self._file = safe_open(str(path), framework="pt")
        self._names = list(self._file.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._file.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name``, without reading it."""
        return tuple(self._file.get_slice(name).get_shape())
