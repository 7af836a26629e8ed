"""A conversion's quantized weights kept on disk: made once, read back when needed.

A Gemma 4 26B-A4B layer's experts are 761 M weights: 380 MB at 4 bits, gigabytes as the
quantizer's arrays (one byte per code), 23 GB for 30 layers. Quantizing them (k-means per
group) is the slowest step of a conversion, and the gate, the build and the checks through the
shards all need them. ``QuantizedStore`` keeps every stored array of a tensor as one raw file:
a bank's ``[E, ...]`` written one expert at a time as the quantizer makes them (``write``), or
a whole tensor at once (``put``: a trunk matrix, 53 MB per 26B-A4B layer in int8, or a bank
with one scale or LUT over it). One expert comes back with a positioned read per array
(``expert``: an array shared by all experts, leading axis 1, is read whole), a whole tensor
with one read per array (``get``); no memory map, so nothing stays resident after a read.
Codes of 1, 2, 3, 4 or 6 bits are stored packed, LSB first (a 6-bit bank's store is 3/4 of a byte
per code). The directory is temporary and removed with the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from anepack.errors import AnepackError
from anepack.quant import QuantizedTensor


def _array_fields(tensor: QuantizedTensor) -> dict[str, np.ndarray]:
    return {
        field.name: array for field in dataclasses.fields(tensor)
        if isinstance(array := getattr(tensor, field.name), np.ndarray)
    }


STORE_PREFIX = ".quantized-"


# Codes packed or unpacked at a time (a multiple of every group below), to bound temporaries.
_PACK_PIECE = 1 << 22


def _packed_fields(tensor: QuantizedTensor) -> dict[str, int]:
    """Fields of sub-byte codes held one per byte (LUT indices, int4 data and offsets) -> their
    bits, where each block of the leading axis (an expert) fills whole bytes: stored packed, so
    an expert still starts on a byte."""
    return {field: bits for field, (array, bits) in tensor.storage_bits().items()
            if bits < 8 and array.dtype.itemsize == 1 and math.prod(array.shape[1:]) * bits % 8 == 0}


def _group(bits: int) -> tuple[int, int, type]:
    """The smallest run of ``bits``-bit codes that fills whole bytes: codes, bytes, and an
    unsigned type that holds the run (1, 2, 4 bits: one byte; 3 and 6 bits: three)."""
    codes = 8 // math.gcd(bits, 8)
    size = codes * bits // 8
    return codes, size, np.uint8 if size == 1 else np.uint32


def _file_bytes(array: np.ndarray, bits: int) -> bytes:
    """The array's bytes, or (``bits`` < 8) its codes' low ``bits`` bits packed LSB first."""
    codes = np.ascontiguousarray(array)
    if bits >= 8:
        return codes.tobytes()
    codes = codes.reshape(-1).view(np.uint8)
    per_run, size, run_type = _group(bits)
    mask = (1 << bits) - 1
    pieces = []
    for start in range(0, codes.size, _PACK_PIECE):
        piece = codes[start:start + _PACK_PIECE]
        value = np.zeros(piece.size // per_run, run_type)
        for j in range(per_run):
            value |= (piece[j::per_run] & mask).astype(run_type) << run_type(bits * j)
        runs = np.empty((value.size, size), np.uint8)
        for k in range(size):
            runs[:, k] = value >> run_type(8 * k)
        pieces.append(runs.tobytes())
    return b"".join(pieces)


def _unpacked(packed: np.ndarray, bits: int, count: int, dtype: np.dtype) -> np.ndarray:
    """``count`` codes of ``bits`` bits from ``packed`` bytes, as ``dtype`` (signed: two's complement)."""
    per_run, size, run_type = _group(bits)
    mask = run_type((1 << bits) - 1)
    codes = np.empty(count, np.uint8)
    for start in range(0, count, _PACK_PIECE):
        stop = min(start + _PACK_PIECE, count)
        runs = packed[start * bits // 8:stop * bits // 8].reshape(-1, size)
        value = runs[:, 0].astype(run_type)
        for k in range(1, size):
            value |= runs[:, k].astype(run_type) << run_type(8 * k)
        piece = codes[start:stop]
        for j in range(per_run):
            piece[j::per_run] = (value >> run_type(bits * j)) & mask
    if np.dtype(dtype).kind == "i":  # the top code bit is the sign: 2**(bits-1).. are negative
        codes = codes.view(np.int8)
        codes[codes >= 1 << (bits - 1)] -= 1 << bits
    return codes.view(dtype)


def remove_stale_stores(parent: str | Path) -> list[Path]:
    """Delete store directories a killed run left under ``parent`` (a store is removed when its
    run ends, but not after SIGKILL or a power cut: a 26B-A4B model's is tens of gigabytes).
    Returns what was removed. Call it before making a store there, not while another runs."""
    stale = [path for path in Path(parent).glob(f"{STORE_PREFIX}*") if path.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


@dataclasses.dataclass(frozen=True)
class _Stored:
    """A stored tensor: itself without its arrays, and each array's dtype, shape and packing."""

    template: QuantizedTensor
    arrays: dict[str, tuple[np.dtype, tuple[int, ...], int]]  # field -> (dtype, shape, packed bits or 8)


class QuantizedStore:
    """Quantized expert banks and matrices in a temporary directory under ``parent``."""

    def __init__(self, parent: str | Path | None = None):
        self.directory = Path(tempfile.mkdtemp(prefix=STORE_PREFIX, dir=parent))
        self._stored: dict[str, _Stored] = {}
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.directory, True)

    def __contains__(self, name: str) -> bool:
        return name in self._stored

    def put(self, name: str, tensor: QuantizedTensor) -> None:
        """Store a whole tensor (a matrix, or a bank with arrays shared by its experts)."""
        packed = _packed_fields(tensor)
        with self._writing():
            for field, array in _array_fields(tensor).items():
                self._path(name, field).write_bytes(_file_bytes(array, packed.get(field, 8)))
        self._record(name, tensor, {field: array.shape for field, array in _array_fields(tensor).items()}, packed)

    def write(self, bank: str, experts: Iterable[QuantizedTensor]) -> None:
        """Store ``experts`` (each ``[Cout, Cin]`` as quantized alone, in expert order)."""
        files, first, packed, count = {}, None, {}, 0
        try:
            for expert in experts:  # made as they are written: their own errors pass through
                one = QuantizedTensor.stack([expert])
                with self._writing():
                    if first is None:
                        first, packed = one, _packed_fields(one)
                        files = {field: open(self._path(bank, field), "wb") for field in _array_fields(one)}
                    for field, array in _array_fields(one).items():
                        files[field].write(_file_bytes(array, packed.get(field, 8)))
                count += 1
        finally:
            for handle in files.values():
                handle.close()
        if first is not None:
            shapes = {field: (count, *array.shape[1:]) for field, array in _array_fields(first).items()}
            self._record(bank, first, shapes, packed)

    def _record(self, name: str, tensor: QuantizedTensor, shapes: dict[str, tuple[int, ...]],
                packed: dict[str, int]) -> None:
        """Remember ``name``: ``tensor`` without its arrays, and each stored array's shape and packing."""
        arrays = {field: (array.dtype, shapes[field], packed.get(field, 8))
                  for field, array in _array_fields(tensor).items()}
        self._stored[name] = _Stored(dataclasses.replace(tensor, **dict.fromkeys(arrays)), arrays)

    def get(self, name: str) -> QuantizedTensor:
        """Tensor or bank ``name`` whole, in memory."""
        stored = self._stored[name]
        return dataclasses.replace(stored.template, **{
            field: self._read(name, field, dtype, math.prod(shape), 0, bits).reshape(shape)
            for field, (dtype, shape, bits) in stored.arrays.items()
        })

    def expert(self, bank: str, index: int) -> QuantizedTensor:
        """Expert ``index`` of ``bank`` as a one-expert bank ``[1, Cout, Cin]``: its block of each
        array, and each array the experts share (leading axis 1) whole."""
        stored = self._stored[bank]
        experts = max(shape[0] for _, shape, _ in stored.arrays.values())
        if not 0 <= index < experts:
            raise IndexError(f"expert {index} out of range for {bank!r} with {experts} experts")
        arrays = {}
        for field, (dtype, shape, bits) in stored.arrays.items():
            one = (1, *shape[1:])
            first = 0 if shape[0] == 1 else index * math.prod(one)
            arrays[field] = self._read(bank, field, dtype, math.prod(one), first, bits).reshape(one)
        return dataclasses.replace(stored.template, **arrays)

    def shapes_only(self, name: str) -> QuantizedTensor:
        """Tensor or bank ``name`` with arrays of the stored shapes that hold no memory (for its
        shape and bits per weight)."""
        stored = self._stored[name]
        return dataclasses.replace(stored.template, **{
            field: np.broadcast_to(np.zeros((), dtype), shape) for field, (dtype, shape, _) in stored.arrays.items()
        })

    def _read(self, name: str, field: str, dtype: np.dtype, count: int, first: int, bits: int) -> np.ndarray:
        """``count`` values of a field from value ``first`` on (``bits`` < 8: packed codes)."""
        path = self._path(name, field)
        if bits >= 8:
            return np.fromfile(path, dtype=dtype, count=count, offset=first * np.dtype(dtype).itemsize)
        packed = np.fromfile(path, dtype=np.uint8, count=count * bits // 8, offset=first * bits // 8)
        return _unpacked(packed, bits, count, dtype)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed write (a full disk: a 26B-A4B model's store is tens of gigabytes) as one line."""
        try:
            yield
        except OSError as error:
            raise AnepackError(self.directory, f"cannot store quantized weights here: {error.strerror or error} "
                                               "(a store is made in the output directory, or in TMPDIR "
                                               "for the validators)") from None

    def _path(self, name: str, field: str) -> Path:
        return self.directory / f"{name}.{field}"

    def close(self) -> None:
        """Delete the files now rather than when the store is collected."""
        self._cleanup()
