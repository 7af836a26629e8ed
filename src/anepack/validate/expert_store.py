"""Quantized expert banks kept on disk: made once, read back one expert at a time.

A Gemma 4 26B-A4B layer's experts are 761 M weights: 380 MB at 4 bits, gigabytes as the
quantizer's arrays (one byte per code), 23 GB for 30 layers. Quantizing them (k-means per
group) is the slowest step of a conversion, and the gate, the build and the checks through the
shards all need them. ``ExpertStore`` writes every stored array of a bank as one raw file
``[E, ...]``, one expert at a time as the quantizer makes them, and reads one expert back with a
single positioned read (no memory map: nothing stays resident after a read). The directory is
temporary and removed with the store.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import weakref
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from anepack.quant import QuantizedTensor


def _array_fields(tensor: QuantizedTensor) -> dict[str, np.ndarray]:
    return {
        field.name: array for field in dataclasses.fields(tensor)
        if isinstance(array := getattr(tensor, field.name), np.ndarray)
    }


class ExpertStore:
    """Quantized expert banks in a temporary directory under ``parent``."""

    def __init__(self, parent: str | Path | None = None):
        self.directory = Path(tempfile.mkdtemp(prefix=".experts-", dir=parent))
        # Per bank: expert 0 as a one-expert bank ``[1, Cout, Cin]``, the layout of every record.
        self._layouts: dict[str, QuantizedTensor] = {}
        self._counts: dict[str, int] = {}
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.directory, True)

    def __contains__(self, bank: str) -> bool:
        return bank in self._layouts

    def _path(self, bank: str, field: str) -> Path:
        return self.directory / f"{bank}.{field}"

    def write(self, bank: str, experts: Iterable[QuantizedTensor]) -> None:
        """Store ``experts`` (each ``[Cout, Cin]`` as quantized alone, in expert order)."""
        files, layout, count = {}, None, 0
        try:
            for expert in experts:
                one = QuantizedTensor.stack([expert])
                if layout is None:
                    layout = one
                    files = {field: open(self._path(bank, field), "wb") for field in _array_fields(one)}
                for field, array in _array_fields(one).items():
                    files[field].write(np.ascontiguousarray(array).tobytes())
                count += 1
        finally:
            for handle in files.values():
                handle.close()
        self._layouts[bank], self._counts[bank] = layout, count

    def expert(self, bank: str, index: int) -> QuantizedTensor:
        """Expert ``index`` of ``bank`` as a one-expert bank ``[1, Cout, Cin]``."""
        if not 0 <= index < self._counts[bank]:
            raise IndexError(f"expert {index} out of range for {bank!r} with {self._counts[bank]} experts")
        layout = self._layouts[bank]
        arrays = {
            field: np.fromfile(self._path(bank, field), dtype=array.dtype, count=array.size,
                               offset=index * array.nbytes).reshape(array.shape)
            for field, array in _array_fields(layout).items()
        }
        return dataclasses.replace(layout, **arrays)

    def bank(self, bank: str) -> QuantizedTensor:
        """The whole bank ``[E, Cout, Cin]`` in memory (every expert's arrays stacked)."""
        layout, count = self._layouts[bank], self._counts[bank]
        arrays = {
            field: np.fromfile(self._path(bank, field), dtype=array.dtype).reshape((count, *array.shape[1:]))
            for field, array in _array_fields(layout).items()
        }
        return dataclasses.replace(layout, **arrays)

    def close(self) -> None:
        """Delete the files now rather than when the store is collected."""
        self._cleanup()
