"""Lazy, memory-mapped GGUF reader that treats the file as untrusted input.

Opening a file parses only the header, the key/value table and the tensor table; array
values (a 262,144-entry vocabulary, say) are skipped and decoded on first access, and tensor
data is read only when a tensor, or one expert of a 3-D expert bank, is asked for. Every
count and size the header declares is checked against the file size before anything is
allocated from it.

Pages of the map that a read has copied out of are released again (``madvise(MADV_DONTNEED)``):
they are clean file pages, so the kernel refills them from the page cache if they are touched
again, and a pass over a 48 GB model keeps about one tensor's pages resident instead of
every page it has read.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf import quants as gguf_quants

from anepack.errors import GGUFFormatError, UnsupportedModelError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
HEADER_BYTES = 4 + 4 + 8 + 8
MIN_KV_BYTES = 8 + 4 + 1  # empty key, type, smallest value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims, type, offset
DEQUANT_CHUNK_ELEMENTS = 1 << 22

_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_SCALAR_DTYPES: dict[GGUFValueType, np.dtype] = {
    vtype: np.dtype(fmt) for vtype, fmt in _SCALAR_FORMATS.items()
}


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table. ``shape`` is in numpy order (slowest dim first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    offset: int  # absolute offset of the data in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def type_name(self) -> str:
        return self.ggml_type.name


@dataclass(frozen=True)
class _LazyArray:
    element_type: GGUFValueType
    count: int
    offset: int  # of the first element


@dataclass(frozen=True)
class MetadataEntry:
    """A key's raw GGUF type, needed to write the key back unchanged."""

    value_type: GGUFValueType
    element_type: GGUFValueType | None  # arrays only


class Metadata(Mapping[str, Any]):
    """Key/value metadata; array values are decoded on first access and then cached."""

    def __init__(self, reader: GGUFFile, values: dict[str, Any], entries: dict[str, MetadataEntry]):
        self._reader = reader
        self._values = values
        self.entries = entries

    def __getitem__(self, key: str) -> Any:
        value = self._values[key]
        if isinstance(value, _LazyArray):
            value = self._reader._decode_array(key, value)
            self._values[key] = value
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def array_length(self, key: str) -> int:
        """Length of an array value without decoding it."""
        value = self._values[key]
        return value.count if isinstance(value, _LazyArray) else len(value)


class _Cursor:
    """Bounds-checked little-endian reads over the memory map."""

    def __init__(self, path: Path, buffer: mmap.mmap, size: int):
        self.path = path
        self.buffer = buffer
        self.size = size
        self.pos = 0

    def need(self, nbytes: int, what: str) -> None:
        if nbytes < 0 or self.pos + nbytes > self.size:
            raise GGUFFormatError(
                self.path,
                f"truncated or corrupt GGUF: {what} needs {nbytes} bytes at offset {self.pos}, "
                f"but the file has {self.size} bytes",
            )

    def scalar(self, fmt: str, what: str) -> Any:
        width = struct.calcsize(fmt)
        self.need(width, what)
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += width
        return value

    def u32(self, what: str) -> int:
        return self.scalar("<I", what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", what)

    def string(self, what: str) -> str:
        length = self.u64(f"length of {what}")
        self.need(length, what)
        raw = bytes(self.buffer[self.pos : self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFFormatError(self.path, f"{what} is not valid UTF-8") from None

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.u32(what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise GGUFFormatError(self.path, f"{what} has unknown value type {raw}") from None


_U64 = struct.Struct("<Q")


def _widen_bf16(data: np.ndarray, out: np.ndarray) -> None:
    """bfloat16 is the top half of a float32: one shift, written straight into ``out``."""
    np.left_shift(data.view("<u2"), 16, out=out.view(np.uint32), dtype=np.uint32)


def _widen_f16(data: np.ndarray, out: np.ndarray) -> None:
    out[...] = data.view("<f2")


# Types whose float32 value is an exact widening: done in one pass, without gguf-py's
# full-size temporaries.
_WIDENED = {GGMLQuantizationType.BF16: _widen_bf16, GGMLQuantizationType.F16: _widen_f16}


def _skip_strings(buffer: mmap.mmap, pos: int, count: int, size: int, path: Path, key: str) -> int:
    """Position after ``count`` length-prefixed strings; a tight loop since vocabularies are huge."""
    unpack = _U64.unpack_from
    for _ in range(count):
        if pos + 8 > size:
            break
        pos += 8 + unpack(buffer, pos)[0]
    else:
        if pos <= size:
            return pos
    raise GGUFFormatError(path, f"truncated or corrupt GGUF: the strings of metadata {key!r} run past the end of the file")


class GGUFFile:
    """A GGUF file opened lazily. Use :func:`open_gguf`; close it or use it as a context."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            handle = open(self.path, "rb")
        except FileNotFoundError:
            raise GGUFFormatError(self.path, "no such file") from None
        except IsADirectoryError:
            raise GGUFFormatError(self.path, "is a directory, not a GGUF file") from None
        except OSError as err:
            raise GGUFFormatError(self.path, f"cannot open: {err.strerror}") from None
        with handle:
            self.size = os.fstat(handle.fileno()).st_size
            if self.size < HEADER_BYTES:
                raise GGUFFormatError(self.path, f"not a GGUF file (only {self.size} bytes)")
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse()
        except BaseException:
            self._map.close()
            raise

    # -- parsing -------------------------------------------------------------------------

    def _parse(self) -> None:
        cursor = _Cursor(self.path, self._map, self.size)
        magic = bytes(self._map[:4])
        if magic != GGUF_MAGIC:
            raise GGUFFormatError(self.path, f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
        cursor.pos = 4
        self.version = cursor.u32("version")
        if self.version not in SUPPORTED_VERSIONS:
            if self.version & 0xFFFF == 0 and (self.version >> 16) in (2, 3):
                raise UnsupportedModelError(self.path, "big-endian GGUF is not supported")
            raise GGUFFormatError(self.path, f"unsupported GGUF version {self.version}")
        n_tensors = cursor.u64("tensor count")
        n_kv = cursor.u64("metadata count")
        remaining = self.size - cursor.pos
        if n_kv * MIN_KV_BYTES > remaining:
            raise GGUFFormatError(
                self.path, f"header declares {n_kv} metadata entries, more than the file can hold"
            )
        if n_tensors * MIN_TENSOR_INFO_BYTES > remaining:
            raise GGUFFormatError(
                self.path, f"header declares {n_tensors} tensors, more than the file can hold"
            )

        values: dict[str, Any] = {}
        entries: dict[str, MetadataEntry] = {}
        for index in range(n_kv):
            key = cursor.string(f"metadata key #{index}")
            vtype = cursor.value_type(f"metadata {key!r}")
            if vtype == GGUFValueType.ARRAY:
                element_type = cursor.value_type(f"element type of {key!r}")
                count = cursor.u64(f"length of {key!r}")
                values[key] = self._skip_array(cursor, key, element_type, count)
                entries[key] = MetadataEntry(vtype, element_type)
            else:
                values[key] = self._read_scalar(cursor, key, vtype)
                entries[key] = MetadataEntry(vtype, None)
        self.metadata = Metadata(self, values, entries)

        alignment = values.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFFormatError(self.path, f"general.alignment {alignment!r} is not a power of two")

        pending: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int]] = []
        for index in range(n_tensors):
            name = cursor.string(f"name of tensor #{index}")
            n_dims = cursor.u32(f"rank of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFFormatError(self.path, f"tensor {name!r} declares rank {n_dims}")
            dims = [cursor.u64(f"shape of tensor {name!r}") for _ in range(n_dims)]
            raw_type = cursor.u32(f"type of tensor {name!r}")
            try:
                ggml_type = GGMLQuantizationType(raw_type)
            except ValueError:
                raise UnsupportedModelError(
                    self.path, f"tensor {name!r} has unknown GGML type id {raw_type}"
                ) from None
            offset = cursor.u64(f"offset of tensor {name!r}")
            pending.append((name, tuple(reversed(dims)), ggml_type, offset))

        data_start = -(-cursor.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, ggml_type, offset in pending:
            info = self._check_tensor(name, shape, ggml_type, data_start + offset)
            if name in self.tensors:
                raise GGUFFormatError(self.path, f"tensor {name!r} appears twice")
            self.tensors[name] = info

    def _read_scalar(self, cursor: _Cursor, key: str, vtype: GGUFValueType) -> Any:
        if vtype == GGUFValueType.STRING:
            return cursor.string(f"metadata {key!r}")
        return cursor.scalar(_SCALAR_FORMATS[vtype], f"metadata {key!r}")

    def _skip_array(
        self, cursor: _Cursor, key: str, element_type: GGUFValueType, count: int
    ) -> _LazyArray:
        start = cursor.pos
        if element_type == GGUFValueType.STRING:
            if count * 8 > self.size - cursor.pos:
                raise GGUFFormatError(
                    self.path, f"metadata {key!r} declares {count} strings, more than the file can hold"
                )
            cursor.pos = _skip_strings(self._map, cursor.pos, count, self.size, self.path, key)
        elif element_type == GGUFValueType.ARRAY:
            raise UnsupportedModelError(self.path, f"metadata {key!r} is a nested array")
        else:
            width = _SCALAR_DTYPES[element_type].itemsize
            cursor.need(count * width, f"metadata {key!r} ({count} values)")
            cursor.pos += count * width
        return _LazyArray(element_type, count, start)

    def _decode_array(self, key: str, lazy: _LazyArray) -> list[Any]:
        if lazy.element_type == GGUFValueType.STRING:
            cursor = _Cursor(self.path, self._map, self.size)
            cursor.pos = lazy.offset
            return [cursor.string(f"element of {key!r}") for _ in range(lazy.count)]
        dtype = _SCALAR_DTYPES[lazy.element_type]
        return np.frombuffer(self._map, dtype=dtype, count=lazy.count, offset=lazy.offset).tolist()

    def _check_tensor(
        self, name: str, shape: tuple[int, ...], ggml_type: GGMLQuantizationType, offset: int
    ) -> TensorInfo:
        if any(dim == 0 for dim in shape) or any(dim > self.size * 8 for dim in shape):
            raise GGUFFormatError(self.path, f"tensor {name!r} declares absurd shape {list(shape)}")
        if ggml_type not in GGML_QUANT_SIZES:
            raise UnsupportedModelError(self.path, f"tensor {name!r} has unsupported type {ggml_type.name}")
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        if shape[-1] % block_size:
            raise GGUFFormatError(
                self.path,
                f"tensor {name!r}: row length {shape[-1]} is not a multiple of the "
                f"{ggml_type.name} block size {block_size}",
            )
        n_rows = 1
        for dim in shape[:-1]:
            n_rows *= dim
        nbytes = n_rows * (shape[-1] // block_size) * type_size
        if offset + nbytes > self.size:
            raise GGUFFormatError(
                self.path,
                f"truncated: tensor {name!r} needs bytes up to {offset + nbytes}, "
                f"but the file has {self.size} bytes",
            )
        return TensorInfo(name, shape, ggml_type, offset, nbytes)

    # -- access --------------------------------------------------------------------------

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise UnsupportedModelError(self.path, "metadata has no general.architecture")
        return arch

    @cached_property
    def config(self):  # -> ModelConfig; imported lazily to keep the reader free of model code
        from anepack.source.config import config_from_gguf

        return config_from_gguf(self)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise UnsupportedModelError(self.path, f"missing required tensor {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored bytes, as a read-only uint8 view of the memory map."""
        info = self.info(name)
        return np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def tensor(self, name: str) -> np.ndarray:
        """Dequantize one tensor to float32, numpy order."""
        info = self.info(name)
        return self._dequantize(info, info.offset, info.shape)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Dequantize rows ``start:stop`` of a tensor viewed as ``[rows, row_length]``."""
        info = self.info(name)
        n_rows = info.n_elements // info.shape[-1]
        start, stop = max(0, start), min(stop, n_rows)
        block_size, type_size = GGML_QUANT_SIZES[info.ggml_type]
        row_bytes = info.shape[-1] // block_size * type_size
        return self._dequantize(info, info.offset + start * row_bytes, (stop - start, info.shape[-1]))

    def expert(self, name: str, index: int) -> np.ndarray:
        """Dequantize one expert ``index`` of a 3-D expert bank ``[E, ...]`` to float32."""
        info = self.info(name)
        if len(info.shape) != 3:
            raise UnsupportedModelError(self.path, f"tensor {name!r} is not a 3-D expert bank")
        n_experts = info.shape[0]
        if not 0 <= index < n_experts:
            raise IndexError(f"expert {index} out of range for {name!r} with {n_experts} experts")
        per_expert = info.nbytes // n_experts
        return self._dequantize(info, info.offset + index * per_expert, info.shape[1:])

    def _dequantize(self, info: TensorInfo, offset: int, shape: tuple[int, ...]) -> np.ndarray:
        block_size, type_size = GGML_QUANT_SIZES[info.ggml_type]
        row_bytes = shape[-1] // block_size * type_size
        n_rows = int(np.prod(shape[:-1], dtype=np.int64))
        data = np.frombuffer(self._map, dtype=np.uint8, count=n_rows * row_bytes, offset=offset)
        data = data.reshape(n_rows, row_bytes)
        if info.ggml_type == GGMLQuantizationType.F32:
            return data.view(np.float32).reshape(shape)  # a read-only view of the map, no copy
        out = np.empty((n_rows, shape[-1]), dtype=np.float32)
        widen = _WIDENED.get(info.ggml_type)
        if widen is not None:
            widen(data, out)
        else:
            self._dequantize_chunks(info, data, out)
        self._release(offset, n_rows * row_bytes)
        return out.reshape(shape)

    def _dequantize_chunks(self, info: TensorInfo, data: np.ndarray, out: np.ndarray) -> None:
        # gguf-py's dequantizers make several full-size temporaries: going through row chunks
        # keeps the peak near the float32 result itself.
        step = max(1, DEQUANT_CHUNK_ELEMENTS // out.shape[-1])
        try:
            for start in range(0, len(out), step):
                out[start : start + step] = gguf_quants.dequantize(data[start : start + step], info.ggml_type)
        except NotImplementedError:
            raise UnsupportedModelError(
                self.path,
                f"tensor {info.name!r} has type {info.ggml_type.name}, "
                "which the gguf package cannot dequantize",
            ) from None

    def _release(self, offset: int, nbytes: int) -> None:
        """Drop the map's pages over ``offset .. offset + nbytes`` from this process's memory."""
        start = offset - offset % mmap.PAGESIZE
        length = offset + nbytes - start
        if hasattr(self._map, "madvise") and length > 0:
            self._map.madvise(mmap.MADV_DONTNEED, start, min(length, self.size - start))

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:
            pass  # float32 tensors are views of the map; it closes when the last one is freed

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open a GGUF file lazily; raises :class:`GGUFFormatError` on malformed input."""
    return GGUFFile(path)
