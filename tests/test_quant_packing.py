"""Sub-byte packing: anepack's bytes are coremltools' bytes, and the bytes in weight.bin."""

from __future__ import annotations

import struct

import numpy as np
import pytest

pytest.importorskip("coremltools")
from coremltools.libmilstoragepython import _BlobStorageWriter  # noqa: E402
from coremltools.optimize._utils import (  # noqa: E402
    pack_elements_into_bits,
    restore_elements_from_packed_bits,
)

from anepack.quant import quantize  # noqa: E402
from anepack.quant.packing import pack_bits, packed_nbytes, unpack_bits  # noqa: E402

NBITS = (1, 2, 3, 4, 6, 8)
# Counts that end mid-byte for every width, plus one that fills bytes exactly.
COUNTS = (1, 7, 1001, 4096)


def _values(nbits: int, count: int, signed: bool = False) -> np.ndarray:
    rng = np.random.default_rng(nbits * 10007 + count)
    if signed:
        return rng.integers(-(2 ** (nbits - 1)), 2 ** (nbits - 1), size=count).astype(np.int8)
    values = rng.integers(0, 2**nbits, size=count).astype(np.uint8)
    values[0] = 2**nbits - 1  # the all-ones code is always exercised
    return values


@pytest.mark.parametrize("nbits", NBITS)
@pytest.mark.parametrize("count", COUNTS)
def test_packing_matches_coremltools(nbits, count):
    values = _values(nbits, count)
    packed = pack_bits(values, nbits)
    assert packed.dtype == np.uint8 and packed.size == packed_nbytes(count, nbits)
    assert np.array_equal(packed, pack_elements_into_bits(values, nbits))
    assert np.array_equal(restore_elements_from_packed_bits(packed, nbits, count), values)
    assert np.array_equal(unpack_bits(pack_elements_into_bits(values, nbits), nbits, count), values)


@pytest.mark.parametrize("nbits", (4, 8))
def test_signed_packing_matches_coremltools(nbits):
    values = _values(nbits, 999, signed=True)
    packed = pack_bits(values, nbits)
    assert np.array_equal(packed, pack_elements_into_bits(values, nbits))
    restored = restore_elements_from_packed_bits(
        packed, nbits, values.size, are_packed_values_signed=True
    )
    assert np.array_equal(restored, values)
    assert np.array_equal(unpack_bits(packed, nbits, values.size, signed=True), values)


def _blob_payload(path, metadata_offset: int) -> bytes:
    """The data bytes of one weight.bin blob, located through its 64-byte metadata record."""
    raw = open(path, "rb").read()
    sentinel, _dtype, size, data_offset = struct.unpack_from("<IIQQ", raw, metadata_offset)
    assert sentinel == 0xDEADBEEF
    return raw[data_offset : data_offset + size]


@pytest.mark.parametrize("nbits", NBITS)
def test_packing_is_what_coreml_writes_to_weight_bin(tmp_path, nbits):
    values = _values(nbits, 1001)
    writer = _BlobStorageWriter(str(tmp_path / "weight.bin"), truncate_file=True)
    offset = getattr(writer, f"write_uint{nbits}_data")(values)
    del writer  # flushes and closes the file
    assert _blob_payload(tmp_path / "weight.bin", offset) == pack_bits(values, nbits).tobytes()


def test_signed_int4_is_what_coreml_writes_to_weight_bin(tmp_path):
    values = _values(4, 777, signed=True)
    writer = _BlobStorageWriter(str(tmp_path / "weight.bin"), truncate_file=True)
    offset = writer.write_int4_data(values)
    del writer
    assert _blob_payload(tmp_path / "weight.bin", offset) == pack_bits(values, 4).tobytes()


def test_quantized_indices_round_trip_through_packing():
    weight = np.random.default_rng(1).standard_normal((48, 40)).astype(np.float32)
    for spec in ("lut3-g16", "lut6-tensor", "int4-block8", "uint4-channel-affine", "vlut2x8"):
        q = quantize(weight, spec)
        codes = q.indices if hasattr(q, "indices") else q.data
        signed = np.issubdtype(codes.dtype, np.signedinteger)
        packed = pack_bits(codes, q.format.nbits)
        restored = unpack_bits(packed, q.format.nbits, codes.size, signed=signed)
        assert np.array_equal(restored.reshape(codes.shape), codes), spec


def test_out_of_range_values_are_rejected():
    with pytest.raises(ValueError):
        pack_bits(np.array([8], np.uint8), 3)
    with pytest.raises(ValueError):
        pack_bits(np.array([-9], np.int8), 4)
    with pytest.raises(ValueError):
        pack_bits(np.array([1], np.uint8), 5)
