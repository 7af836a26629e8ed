"""How Core ML stores a compressed weight: sub-byte packing and the payload it costs.

weight.bin holds each array flattened in C order; values narrower than a byte are packed
contiguously, least significant bit first, across byte boundaries (coremltools'
``pack_elements_into_bits``; the last byte is zero-padded). ``QuantizedTensor`` is the base
of every compressed tensor: its arrays are exactly the constexpr op inputs, and its
payload counts every byte of them.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from math import gcd

import numpy as np

PACKABLE_NBITS = (1, 2, 3, 4, 6, 8)


def _chunk_shape(nbits: int) -> tuple[int, int]:
    """Smallest run of values that fills whole bytes: (values, bytes); at most 24 bits."""
    values = 8 // gcd(nbits, 8)
    return values, values * nbits // 8


def packed_nbytes(count: int, nbits: int) -> int:
    """Bytes that ``count`` values of ``nbits`` each occupy in weight.bin."""
    return math.ceil(count * nbits / 8)


def pack_bits(values: np.ndarray, nbits: int) -> np.ndarray:
    """Pack integers (unsigned, or signed two's complement) into ``nbits`` each, LSB first.

    Returns ``packed_nbytes(values.size, nbits)`` bytes as uint8.
    """
    if nbits not in PACKABLE_NBITS:
        raise ValueError(f"Core ML packs 1, 2, 3, 4, 6 or 8-bit values, not {nbits}")
    flat = np.asarray(values).ravel()
    low = -(2 ** (nbits - 1)) if np.issubdtype(flat.dtype, np.signedinteger) else 0
    high = 2 ** (nbits - 1) - 1 if low else 2**nbits - 1
    if flat.size and (flat.min() < low or flat.max() > high):
        raise ValueError(f"values outside [{low}, {high}] do not fit {nbits} bits")
    per_chunk, chunk_bytes = _chunk_shape(nbits)
    padded = np.zeros(math.ceil(flat.size / per_chunk) * per_chunk, dtype=np.uint32)
    padded[: flat.size] = flat.astype(np.int64) & (2**nbits - 1)
    shifts = np.arange(per_chunk, dtype=np.uint32) * nbits
    words = np.bitwise_or.reduce(padded.reshape(-1, per_chunk) << shifts, axis=1)
    byte_shifts = np.arange(chunk_bytes, dtype=np.uint32) * 8
    packed = ((words[:, None] >> byte_shifts) & 0xFF).astype(np.uint8).ravel()
    return packed[: packed_nbytes(flat.size, nbits)]


def unpack_bits(packed: np.ndarray, nbits: int, count: int, signed: bool = False) -> np.ndarray:
    """Inverse of ``pack_bits``: ``count`` values as uint8, or int8 when ``signed``."""
    if nbits not in PACKABLE_NBITS:
        raise ValueError(f"Core ML packs 1, 2, 3, 4, 6 or 8-bit values, not {nbits}")
    packed = np.asarray(packed, dtype=np.uint8).ravel()
    if packed.size < packed_nbytes(count, nbits):
        raise ValueError(f"{packed.size} bytes cannot hold {count} values of {nbits} bits")
    per_chunk, chunk_bytes = _chunk_shape(nbits)
    chunks = math.ceil(count / per_chunk)
    padded = np.zeros(chunks * chunk_bytes, dtype=np.uint32)
    used = min(packed.size, padded.size)
    padded[:used] = packed[:used]
    byte_shifts = np.arange(chunk_bytes, dtype=np.uint32) * 8
    words = np.bitwise_or.reduce(padded.reshape(-1, chunk_bytes) << byte_shifts, axis=1)
    shifts = np.arange(per_chunk, dtype=np.uint32) * nbits
    values = ((words[:, None] >> shifts) & (2**nbits - 1)).ravel()[:count]
    if not signed:
        return values.astype(np.uint8)
    values = values.astype(np.int16)
    return np.where(values >= 2 ** (nbits - 1), values - 2**nbits, values).astype(np.int8)


@dataclasses.dataclass(frozen=True)
class QuantizedTensor(abc.ABC):
    """A weight as Core ML stores it. Subclasses hold the constexpr op inputs as arrays.

    ``storage_bits()`` names each stored array and the bits one element takes in weight.bin;
    the payload is the sum of their packed sizes (blob headers and 64-byte alignment, a
    fixed cost per array, are not weight payload and are left out).
    """

    format: object

    @abc.abstractmethod
    def storage_bits(self) -> dict[str, tuple[np.ndarray, int]]:
        """Each stored array by name, with the bits one of its elements occupies."""

    @abc.abstractmethod
    def dequantize(self) -> np.ndarray:
        """The weight as the ANE sees it: Core ML's decompression formula, in float16."""

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, ...]:
        """Shape of the dequantized weight."""

    @property
    def payload_bytes(self) -> int:
        """Bytes of every stored array (indices or data, LUTs, scales, offsets), packed."""
        return sum(packed_nbytes(array.size, bits) for array, bits in self.storage_bits().values())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.payload_bytes / math.prod(self.shape)

    def _array_fields(self) -> list[str]:
        return [
            field.name for field in dataclasses.fields(self)
            if isinstance(getattr(self, field.name), np.ndarray)
        ]

    @classmethod
    def stack(cls, parts: list["QuantizedTensor"]) -> "QuantizedTensor":
        """One tensor from per-expert tensors: every array gains a leading expert axis, so
        each expert keeps its own scales/LUTs (block size 1 along the expert axis)."""
        first = parts[0]
        arrays = {
            name: np.stack([getattr(part, name) for part in parts])
            for name in first._array_fields()
        }
        return first._with_leading_axis(arrays)

    def split_leading(self, experts: int) -> "QuantizedTensor":
        """The same tensor with its first axis split into ``[experts, rest]``: a tensor
        quantized as one ``[E * Cout, Cin]`` matrix, seen as the ``[E, Cout, Cin]`` bank.

        An array with one block along the first axis (a per-tensor scale or LUT) gets
        ``[1, 1]`` there; otherwise the block count divides evenly among experts.
        """
        arrays = {}
        for name in self._array_fields():
            array = getattr(self, name)
            lead = (1, 1) if array.shape[0] == 1 else (experts, array.shape[0] // experts)
            arrays[name] = array.reshape(lead + array.shape[1:])
        return self._with_leading_axis(arrays)

    def _with_leading_axis(self, arrays: dict[str, np.ndarray]) -> "QuantizedTensor":
        return dataclasses.replace(self, **arrays)


def weight_rows(q: QuantizedTensor, start: int, stop: int) -> QuantizedTensor:
    """Output rows ``start:stop`` of a ``[Cout, Cin]`` weight, still in its stored form.

    Every stored array is laid out along Cout in blocks (one row, a LUT group, a vector, or
    the whole tensor); a block shared by all rows (per-tensor scale or LUT) is kept whole,
    the others are sliced, so ``weight_rows(q, a, b).dequantize() == q.dequantize()[a:b]``.
    """
    rows = q.shape[0]
    sliced = {}
    for field in dataclasses.fields(q):
        array = getattr(q, field.name)
        if not isinstance(array, np.ndarray) or array.shape[0] == 1:
            continue
        block = rows // array.shape[0]
        if start % block or stop % block:
            raise ValueError(f"rows {start}:{stop} cut through blocks of {block} rows of {field.name}")
        sliced[field.name] = array[start // block: stop // block]
    return dataclasses.replace(q, **sliced)
