"""A conversion's quantized weights kept on disk: made once, read back when needed.

A Gemma 4 26B-A4B layer's experts are 761 M weights: 380 MB at 4 bits, gigabytes as the
quantizer's arrays (one byte per code), 23 GB for 30 layers. Quantizing them (k-means per
group) is the slowest step of a conversion, and the gate, the build and the checks through the
shards all need them. ``QuantizedStore`` writes every stored array of a bank as one raw file
``[E, ...]``, one expert at a time as the quantizer makes them, and reads one expert back with a
single positioned read (no memory map: nothing stays resident after a read); 4-bit codes are
stored two per byte (380 MB per 26B-A4B layer at 4 bits). The trunk's
matrices (53 MB per 26B-A4B layer in int8, 1.6 GB over 30 layers) are kept the same way, whole:
the gate quantizes them and the build reads them back instead of quantizing them again. The
directory is temporary and removed with the store.
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
    number of them: stored two per byte, which halves a 4-bit bank's store."""
    return frozenset(field for field, (array, bits) in tensor.storage_bits().items()
                     if bits == 4 and array.dtype.itemsize == 1 and array.size % 2 == 0)


def _packed_nibbles(array: np.ndarray) -> bytes:
    codes = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
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


class QuantizedStore:
    """Quantized expert banks and matrices in a temporary directory under ``parent``."""

    def __init__(self, parent: str | Path | None = None):
        self.directory = Path(tempfile.mkdtemp(prefix=STORE_PREFIX, dir=parent))
        # Per bank: expert 0 as a one-expert bank ``[1, Cout, Cin]``, the layout of every record.
        self._layouts: dict[str, QuantizedTensor] = {}
        self._counts: dict[str, int] = {}
        self._nibbles: dict[str, frozenset[str]] = {}  # per bank, its fields stored two codes per byte
        # Per matrix: the tensor without its arrays, and each array's dtype and shape.
        self._matrices: dict[str, tuple[QuantizedTensor, dict[str, tuple[np.dtype, tuple[int, ...]]]]] = {}
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.directory, True)

    def __contains__(self, name: str) -> bool:
        return name in self._layouts or name in self._matrices

    def put(self, name: str, tensor: QuantizedTensor) -> None:
        """Store a whole tensor (a matrix in its stored form); ``get`` reads it back."""
        arrays = _array_fields(tensor)
        with self._writing():
            for field, array in arrays.items():
                np.ascontiguousarray(array).tofile(self._path(name, field))
        shapes = {field: (array.dtype, array.shape) for field, array in arrays.items()}
        self._matrices[name] = (dataclasses.replace(tensor, **dict.fromkeys(arrays)), shapes)

    def get(self, name: str) -> QuantizedTensor:
        """Tensor ``name`` as ``put`` stored it, read into memory."""
        template, shapes = self._matrices[name]
        return dataclasses.replace(template, **{
            field: np.fromfile(self._path(name, field), dtype=dtype).reshape(shape)
            for field, (dtype, shape) in shapes.items()
        })

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed write (a full disk: a 26B-A4B model's store is tens of gigabytes) as one line."""
        try:
            yield
        except OSError as error:
            raise AnepackError(self.directory, f"cannot store quantized weights here: {error.strerror or error} "
                                               "(a store is made in the output directory, or in TMPDIR "
                                               "for the validators)") from None

    def _path(self, bank: str, field: str) -> Path:
        return self.directory / f"{bank}.{field}"

    def write(self, bank: str, experts: Iterable[QuantizedTensor]) -> None:
        """Store ``experts`` (each ``[Cout, Cin]`` as quantized alone, in expert order)."""
        files, layout, count = {}, None, 0
        try:
            for expert in experts:  # made as they are written: their own errors pass through
                one = QuantizedTensor.stack([expert])
                with self._writing():
                    if layout is None:
                        layout, nibbles = one, _nibble_fields(one)
                        files = {field: open(self._path(bank, field), "wb") for field in _array_fields(one)}
                    for field, array in _array_fields(one).items():
                        files[field].write(_packed_nibbles(array) if field in nibbles
                                           else np.ascontiguousarray(array).tobytes())
                count += 1
        finally:
            for handle in files.values():
                handle.close()
        self._layouts[bank], self._counts[bank] = layout, count
        self._nibbles[bank] = frozenset() if layout is None else nibbles

    def expert(self, bank: str, index: int) -> QuantizedTensor:
        """Expert ``index`` of ``bank`` as a one-expert bank ``[1, Cout, Cin]``. A bank ``put``
        whole (one scale or LUT for all experts) gives its slice of each per-expert array and
        the shared arrays (leading axis 1) whole."""
        if bank in self._matrices:
            return self._expert_of_whole(bank, index)
        if not 0 <= index < self._counts[bank]:
            raise IndexError(f"expert {index} out of range for {bank!r} with {self._counts[bank]} experts")
        layout = self._layouts[bank]
        arrays = {field: self._read(bank, field, array.dtype, array.size, index).reshape(array.shape)
                  for field, array in _array_fields(layout).items()}
        return dataclasses.replace(layout, **arrays)

    def _read(self, bank: str, field: str, dtype: np.dtype, size: int, index: int = 0, count: int = 1) -> np.ndarray:
        """``count`` experts' worth (``size`` values each) of a written bank's field, from expert ``index``."""
        if field not in self._nibbles[bank]:
            return np.fromfile(self._path(bank, field), dtype=dtype, count=count * size,
                               offset=index * size * np.dtype(dtype).itemsize)
        packed = np.fromfile(self._path(bank, field), dtype=np.uint8, count=count * size // 2, offset=index * size // 2)
        return _unpacked_nibbles(packed, dtype)

    def _expert_of_whole(self, bank: str, index: int) -> QuantizedTensor:
        template, shapes = self._matrices[bank]
        experts = max(shape[0] for _, shape in shapes.values())
        if not 0 <= index < experts:
            raise IndexError(f"expert {index} out of range for {bank!r} with {experts} experts")
        arrays = {}
        for field, (dtype, shape) in shapes.items():
            one = (1, *shape[1:])
            size = math.prod(one)
            start = 0 if shape[0] == 1 else index * size * np.dtype(dtype).itemsize
            arrays[field] = np.fromfile(self._path(bank, field), dtype=dtype, count=size, offset=start).reshape(one)
        return dataclasses.replace(template, **arrays)

    def shapes_only(self, name: str) -> QuantizedTensor:
        """Tensor or bank ``name`` with arrays of the stored shapes that hold no memory (for its
        shape and bits per weight)."""
        if name in self._matrices:
            template, shapes = self._matrices[name]
            sized = {field: (dtype, shape) for field, (dtype, shape) in shapes.items()}
        else:
            template, count = self._layouts[name], self._counts[name]
            sized = {field: (array.dtype, (count, *array.shape[1:])) for field, array in _array_fields(template).items()}
        return dataclasses.replace(template, **{
            field: np.broadcast_to(np.zeros((), dtype), shape) for field, (dtype, shape) in sized.items()
        })

    def bank(self, bank: str) -> QuantizedTensor:
        """The whole bank ``[E, Cout, Cin]`` in memory (every expert's arrays stacked)."""
        if bank in self._matrices:
            return self.get(bank)
        layout, count = self._layouts[bank], self._counts[bank]
        arrays = {field: self._read(bank, field, array.dtype, array.size, count=count).reshape((count, *array.shape[1:]))
                  for field, array in _array_fields(layout).items()}
        return dataclasses.replace(layout, **arrays)

    def close(self) -> None:
        """Delete the files now rather than when the store is collected."""
        self._cleanup()
