"""A quantized weight as MIL ops: the constexpr op(s) that reproduce ``QuantizedTensor.dequantize()``.

The stored arrays go into the graph exactly as the quantization engine made them (indices,
LUTs, integer data, scales, offsets); nothing is re-quantized. Each array is a named ``const``
whose ``weight_id`` is its name, so the prefill and decode functions of one package share
a single copy in weight.bin. The emitted form per family (docs/coreml-shards.md):

    fp16            const
    linear          constexpr_blockwise_shift_scale(data, scale, offset?)
    lut             constexpr_lut_to_dense(indices, lut, vector_axis?)
    lut ... -int8lut  constexpr_lut_to_dense(indices, constexpr_blockwise_shift_scale(int8 lut, lut scale))
    lut ... -pcs    constexpr_blockwise_shift_scale(constexpr_lut_to_dense(...), channel scale)

Call ``emit_weight`` inside a ``mb.function`` under construction.
"""

from __future__ import annotations


import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Var, types

from anepack.quant import DenseTensor, LinearTensor, PalettizedTensor, QuantizedTensor


def _mil_integers(array: np.ndarray, nbits: int) -> np.ndarray:
    """Integer codes in the MIL dtype of their width (uint4, int4, uint6, ...), keeping signedness.

    The MIL dtype is numpy's 8-bit integer tagged with the sub-byte type, so byte-wide codes
    become a view, not a copy: the prefill and decode functions of a package share one array
    (an expert package's codes are hundreds of megabytes)."""
    kind = "int" if np.issubdtype(array.dtype, np.signedinteger) else "uint"
    mil_dtype = np.dtype(types.nptype_from_builtin(types.string_to_builtin(f"{kind}{nbits}")))
    return array.astype(np.dtype(mil_dtype.str), copy=False).view(mil_dtype)


def _stored(value: np.ndarray, name: str) -> Var:
    const = mb.const(val=value, name=name)
    # Same name in both functions -> same weight_id -> one blob in weight.bin.
    const.op.weight_id = name
    return const


def _emit_dense(q: DenseTensor, name: str) -> Var:
    return _stored(q.values.astype(np.float16, copy=False), name)


def _emit_linear(q: LinearTensor, name: str) -> Var:
    nbits = q.format.nbits
    arguments = {
        "data": _stored(_mil_integers(q.data, nbits), f"{name}_data"),
        "scale": _stored(q.scale.astype(np.float16), f"{name}_scale"),
    }
    if q.offset is not None:
        arguments["offset"] = _stored(_mil_integers(q.offset, nbits), f"{name}_offset")
    return mb.constexpr_blockwise_shift_scale(**arguments, name=name)


def _emit_palettized(q: PalettizedTensor, name: str) -> Var:
    lut = _stored(q.lut, f"{name}_lut")
    if q.lut_scale is not None:
        lut = mb.constexpr_blockwise_shift_scale(
            data=lut, scale=_stored(q.lut_scale.astype(np.float16), f"{name}_lut_scale"),
            name=f"{name}_lut_fp16",
        )
    arguments = {"indices": _stored(_mil_integers(q.indices, q.format.nbits), f"{name}_indices"), "lut": lut}
    if q.vector_axis is not None:
        arguments["vector_axis"] = np.int32(q.vector_axis)
    if q.channel_scale is None:
        return mb.constexpr_lut_to_dense(**arguments, name=name)
    dense = mb.constexpr_lut_to_dense(**arguments, name=f"{name}_palette")
    return mb.constexpr_blockwise_shift_scale(
        data=dense, scale=_stored(q.channel_scale.astype(np.float16), f"{name}_channel_scale"), name=name
    )


EMITTERS = {
    DenseTensor: _emit_dense,
    LinearTensor: _emit_linear,
    PalettizedTensor: _emit_palettized,
}


def emit_weight(q: QuantizedTensor, name: str) -> Var:
    """The float16 weight ``q.dequantize()`` as MIL ops; the last op's output is named ``name``."""
    return EMITTERS[type(q)](q, name)
