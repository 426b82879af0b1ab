"""Reading GGUF files: metadata, the tensor index, and tensors as torch tensors.

gguf's `GGUFReader` builds a numpy memmap view for every string of the vocabulary
(≈1.6 s for SmolLM2's 49k tokens, a third of our load budget), so the header is
parsed here in one struct pass. The format's enums, block sizes and every
dequantiser come from the `gguf` package.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf import quants as gguf_quants

GGUF_MAGIC = b"GGUF"
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NUMPY_DTYPES = {
    GGUFValueType.UINT8: np.uint8, GGUFValueType.INT8: np.int8, GGUFValueType.UINT16: np.uint16,
    GGUFValueType.INT16: np.int16, GGUFValueType.UINT32: np.uint32, GGUFValueType.INT32: np.int32,
    GGUFValueType.FLOAT32: np.float32, GGUFValueType.BOOL: np.bool_, GGUFValueType.UINT64: np.uint64,
    GGUFValueType.INT64: np.int64, GGUFValueType.FLOAT64: np.float64,
}
_FLOAT_TYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}


class GGUFFormatError(ValueError):
    """The file is not a GGUF file we can read."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (rows first), i.e. reversed GGML dims
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    def __init__(self, buf: mmap.mmap):
        self.buf = buf
        self.pos = 0

    def scalar(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        raw = self.buf[self.pos:self.pos + length]
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item_type = GGUFValueType(self.scalar("<I"))
            count = self.scalar("<Q")
            if item_type in _NUMPY_DTYPES:
                dtype = np.dtype(_NUMPY_DTYPES[item_type]).newbyteorder("<")
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += arr.nbytes
                return arr.copy()
            return [self.value(item_type) for _ in range(count)]
        return self.scalar(_SCALAR_FORMATS[vtype])


class GGUFFile:
    """A GGUF file opened read-only through mmap; tensors are read on demand."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self.metadata, self.tensors = self._parse()
        except (struct.error, ValueError, UnicodeDecodeError, IndexError) as exc:
            self.close()
            if isinstance(exc, GGUFFormatError):
                raise
            raise GGUFFormatError(f"{path}: corrupt or truncated GGUF file ({exc})") from None

    def _parse(self) -> tuple[dict[str, Any], dict[str, GGUFTensorInfo]]:
        cur = _Cursor(self._mm)
        if self._mm[:4] != GGUF_MAGIC:
            raise GGUFFormatError(f"{self.path} is not a GGUF file (bad magic)")
        cur.pos = 4
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise GGUFFormatError(f"{self.path}: unsupported GGUF version {version}")
        n_tensors = cur.scalar("<Q")
        n_kv = cur.scalar("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            dims = [cur.scalar("<Q") for _ in range(n_dims)]
            qtype = GGMLQuantizationType(cur.scalar("<I"))
            offset = cur.scalar("<Q")
            infos.append((name, tuple(reversed(dims)), qtype, offset))
        alignment = int(metadata.get("general.alignment", 32))
        data_start = (cur.pos + alignment - 1) // alignment * alignment
        tensors = {}
        for name, shape, qtype, offset in infos:
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            nbytes = prod(shape) // block_size * type_size
            start = data_start + offset
            if start + nbytes > len(self._mm):
                raise GGUFFormatError(f"{self.path}: tensor {name} runs past the end of the file")
            tensors[name] = GGUFTensorInfo(name, shape, qtype, start, nbytes)
        return metadata, tensors

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def drop_arrays(self) -> None:
        """Drops the metadata's arrays (the vocabulary: tokens, scores, token types, merges) once the
        config and tokenizer are built from them; the scalars stay. A checkpoint keeps its file open
        for the weights, and the arrays as Python objects took 11 MB for the default model, 33 MB
        for Gemma 3's 262k-token vocabulary."""
        self.metadata = {k: v for k, v in self.metadata.items() if not isinstance(v, (list, tuple, np.ndarray))}

    def raw(self, name: str) -> np.ndarray:
        """The named tensor's bytes as stored, one row of the tensor per row (a view of the file)."""
        info = self.tensors[name]
        raw = np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        block_size, type_size = GGML_QUANT_SIZES[info.qtype]
        return raw.reshape(-1, info.shape[-1] // block_size * type_size)

    def load(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The named tensor, dequantised to `dtype`."""
        info = self.tensors[name]
        raw = np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        if info.qtype in _FLOAT_TYPES:
            tensor = torch.from_numpy(raw.copy()).view(_FLOAT_TYPES[info.qtype]).reshape(info.shape)
            return tensor.to(dtype)
        block_size, type_size = GGML_QUANT_SIZES[info.qtype]
        rows = raw.reshape(-1, info.shape[-1] // block_size * type_size)
        try:
            values = gguf_quants.dequantize(rows, info.qtype)
        except NotImplementedError:
            raise GGUFFormatError(f"tensor {name}: GGML type {info.qtype.name} cannot be dequantised") from None
        return torch.from_numpy(values).reshape(info.shape).to(dtype)

    def release_pages(self, name: str | None = None) -> None:
        """Drops the file's pages read so far (or those of tensor `name`) from this process's resident
        memory (the mapping stays: a later read brings them back from the page cache). Called as each
        tensor is loaded and once all are, so the file's bytes are not counted beside the model's own
        copy, neither at the end nor at the load's peak."""
        if getattr(self, "_mm", None) is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        if name is None:
            self._mm.madvise(mmap.MADV_DONTNEED)
            return
        info = self.tensors[name]
        start = info.offset - info.offset % mmap.PAGESIZE  # madvise takes whole pages
        self._mm.madvise(mmap.MADV_DONTNEED, start, info.offset + info.nbytes - start)

    def close(self) -> None:
        if getattr(self, "_mm", None) is not None:
            self._mm.close()
            self._mm = None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
