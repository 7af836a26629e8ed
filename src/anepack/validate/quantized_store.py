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
4-bit codes are stored two per byte. The directory is temporary and removed with the store.
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


def _nibble_fields(tensor: QuantizedTensor) -> frozenset[str]:
    """Fields of 4-bit codes held one per byte (LUT indices, int4 data and offsets), an even
    number per block of the leading axis (an expert): stored two per byte, so a 4-bit bank's
    store is halved and an expert still starts on a byte."""
    return frozenset(field for field, (array, bits) in tensor.storage_bits().items()
                     if bits == 4 and array.dtype.itemsize == 1 and math.prod(array.shape[1:]) % 2 == 0)


def _file_bytes(array: np.ndarray, packed: bool) -> bytes:
    codes = np.ascontiguousarray(array)
    if not packed:
        return codes.tobytes()
    codes = codes.reshape(-1).view(np.uint8)
    return ((codes[0::2] & 0x0F) | (codes[1::2] << 4)).tobytes()


def _unpacked_nibbles(packed: np.ndarray, dtype: np.dtype) -> np.ndarray:
    codes = np.empty(2 * packed.size, np.uint8)
    codes[0::2] = packed & 0x0F
    codes[1::2] = packed >> 4
    if np.dtype(dtype) == np.int8:  # two's complement nibbles: 8..15 are -8..-1
        codes = codes.view(np.int8)
        codes[codes > 7] -= 16
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
    arrays: dict[str, tuple[np.dtype, tuple[int, ...], bool]]  # field -> (dtype, shape, two codes per byte)


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
        nibbles = _nibble_fields(tensor)
        with self._writing():
            for field, array in _array_fields(tensor).items():
                self._path(name, field).write_bytes(_file_bytes(array, field in nibbles))
        self._record(name, tensor, {field: array.shape for field, array in _array_fields(tensor).items()}, nibbles)

    def write(self, bank: str, experts: Iterable[QuantizedTensor]) -> None:
        """Store ``experts`` (each ``[Cout, Cin]`` as quantized alone, in expert order)."""
        files, first, nibbles, count = {}, None, frozenset(), 0
        try:
            for expert in experts:  # made as they are written: their own errors pass through
                one = QuantizedTensor.stack([expert])
                with self._writing():
                    if first is None:
                        first, nibbles = one, _nibble_fields(one)
                        files = {field: open(self._path(bank, field), "wb") for field in _array_fields(one)}
                    for field, array in _array_fields(one).items():
                        files[field].write(_file_bytes(array, field in nibbles))
                count += 1
        finally:
            for handle in files.values():
                handle.close()
        if first is not None:
            shapes = {field: (count, *array.shape[1:]) for field, array in _array_fields(first).items()}
            self._record(bank, first, shapes, nibbles)

    def _record(self, name: str, tensor: QuantizedTensor, shapes: dict[str, tuple[int, ...]],
                nibbles: frozenset[str]) -> None:
        """Remember ``name``: ``tensor`` without its arrays, and each stored array's shape."""
        arrays = {field: (array.dtype, shapes[field], field in nibbles) for field, array in _array_fields(tensor).items()}
        self._stored[name] = _Stored(dataclasses.replace(tensor, **dict.fromkeys(arrays)), arrays)

    def get(self, name: str) -> QuantizedTensor:
        """Tensor or bank ``name`` whole, in memory."""
        stored = self._stored[name]
        return dataclasses.replace(stored.template, **{
            field: self._read(name, field, dtype, math.prod(shape), 0, packed).reshape(shape)
            for field, (dtype, shape, packed) in stored.arrays.items()
        })

    def expert(self, bank: str, index: int) -> QuantizedTensor:
        """Expert ``index`` of ``bank`` as a one-expert bank ``[1, Cout, Cin]``: its block of each
        array, and each array the experts share (leading axis 1) whole."""
        stored = self._stored[bank]
        experts = max(shape[0] for _, shape, _ in stored.arrays.values())
        if not 0 <= index < experts:
            raise IndexError(f"expert {index} out of range for {bank!r} with {experts} experts")
        arrays = {}
        for field, (dtype, shape, packed) in stored.arrays.items():
            one = (1, *shape[1:])
            first = 0 if shape[0] == 1 else index * math.prod(one)
            arrays[field] = self._read(bank, field, dtype, math.prod(one), first, packed).reshape(one)
        return dataclasses.replace(stored.template, **arrays)

    def shapes_only(self, name: str) -> QuantizedTensor:
        """Tensor or bank ``name`` with arrays of the stored shapes that hold no memory (for its
        shape and bits per weight)."""
        stored = self._stored[name]
        return dataclasses.replace(stored.template, **{
            field: np.broadcast_to(np.zeros((), dtype), shape) for field, (dtype, shape, _) in stored.arrays.items()
        })

    def _read(self, name: str, field: str, dtype: np.dtype, count: int, first: int, packed: bool) -> np.ndarray:
        """``count`` values of a field from value ``first`` on."""
        path = self._path(name, field)
        if not packed:
            return np.fromfile(path, dtype=dtype, count=count, offset=first * np.dtype(dtype).itemsize)
        return _unpacked_nibbles(np.fromfile(path, dtype=np.uint8, count=count // 2, offset=first // 2), dtype)

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
