"""The quantization API: any float32 weight or expert bank, into any Core ML weight format.

    from anepack.quant import quantize
    q = quantize(weight, "lut4-g16", importance=imatrix_column)   # weight [Cout, Cin]
    q.bits_per_weight            # every stored byte (indices, LUTs, scales, offsets) counted
    w16 = q.dequantize()         # float16, as the ANE sees the weight

Formats are values parsed from spec strings (``anepack.quant.formats``); the quantizer of
each family is looked up in ``QUANTIZERS``. An expert bank ``[E, Cout, Cin]`` is quantized
expert by expert (each its own scales/LUTs) unless ``whole_bank=True`` treats it as one
``[E * Cout, Cin]`` tensor, the granularity that breaks big per-tensor banks (brief s. 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from anepack.errors import AnepackError
from anepack.quant.formats import (
    Float16Format,
    Format,
    FormatSpecError,
    LinearFormat,
    LutFormat,
    VectorLutFormat,
    formats,
    parse_format,
)
from anepack.quant.linear import LinearTensor, blockwise_shift_scale, quantize_linear, quantize_linear_streamed
from anepack.quant.lut import PalettizedTensor, lut_to_dense, quantize_lut, quantize_vector_lut
from anepack.quant.packing import QuantizedTensor, pack_bits, unpack_bits


@dataclass(frozen=True)
class DenseTensor(QuantizedTensor):
    """An uncompressed weight: float16 values, 16 bits per weight."""

    values: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def storage_bits(self) -> dict[str, tuple[np.ndarray, int]]:
        return {"values": (self.values, 16)}

    def dequantize(self) -> np.ndarray:
        return self.values


def _keep_float16(weight: np.ndarray, fmt: Float16Format, importance=None) -> DenseTensor:
    if np.abs(weight).max(initial=0.0) > np.finfo(np.float16).max:
        raise AnepackError(None, "weight magnitudes exceed the float16 range")
    return DenseTensor(format=fmt, values=weight.astype(np.float16))


QUANTIZERS = {
    Float16Format: _keep_float16,
    LinearFormat: quantize_linear,
    LutFormat: quantize_lut,
    VectorLutFormat: quantize_vector_lut,
}


def quantize(
    weight: np.ndarray,
    fmt: "str | Format",
    importance: np.ndarray | None = None,
    *,
    row_importance: np.ndarray | None = None,
    whole_bank: bool = False,
) -> QuantizedTensor:
    """Compress ``weight`` (float ``[Cout, Cin]`` or expert bank ``[E, Cout, Cin]``) into ``fmt``.

    ``importance`` weighs each input column's squared error (llama.cpp's imatrix: mean
    squared activation per column): ``[Cin]``, or ``[E, Cin]`` for a bank. ``row_importance``
    ``[Cout]`` (a matrix only) also weighs each output row's: scalar LUT formats cluster with
    it; per-channel and per-block linear scales are chosen row by row, where a row's weight
    cannot change the choice; per-tensor linear and vector LUTs do not use it. The result holds
    exactly the arrays Core ML stores, at the weight's rank.
    """
    fmt = parse_format(fmt)
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim not in (2, 3) or weight.size == 0:
        raise FormatSpecError(
            None, f"{fmt.spec} needs a [Cout, Cin] or [E, Cout, Cin] weight, got {weight.shape}"
        )
    if not np.isfinite(weight).all():
        raise AnepackError(None, "weight contains NaN or infinity")
    importance = _checked_importance(importance, weight.shape)
    quantizer = QUANTIZERS[type(fmt)]
    if row_importance is not None:
        row_importance = _checked_row_importance(row_importance, weight.shape)
        if isinstance(fmt, LutFormat):
            return quantize_lut(weight, fmt, importance, row_importance)
    if weight.ndim == 2:
        return quantizer(weight, fmt, importance)
    experts, rows, cols = weight.shape
    if whole_bank:
        shared = None if importance is None else importance.mean(axis=0)
        return quantizer(weight.reshape(experts * rows, cols), fmt, shared).split_leading(experts)
    return QuantizedTensor.stack([
        quantizer(weight[e], fmt, None if importance is None else importance[e])
        for e in range(experts)
    ])


def quantize_bank_streamed(
    read_rows: Callable[[int, int], np.ndarray], shape: tuple[int, int, int], fmt: "str | Format",
    importance: np.ndarray | None = None,
) -> QuantizedTensor | None:
    """``quantize(bank, fmt, importance, whole_bank=True)`` for a bank ``[E, Cout, Cin]`` read by
    ``read_rows(start, stop)`` as rows of ``[E * Cout, Cin]`` instead of held in float32, when
    ``fmt`` is a linear format with one scale (int8-tensor: the brief's failure); None for any
    other format, which needs the whole bank. The same tensor as ``quantize`` gives."""
    fmt = parse_format(fmt)
    if not isinstance(fmt, LinearFormat) or fmt.per_channel or fmt.block_size:
        return None
    experts, rows, cols = shape
    importance = _checked_importance(importance, shape)
    shared = None if importance is None else importance.mean(axis=0)
    return quantize_linear_streamed(read_rows, experts * rows, cols, fmt, shared).split_leading(experts)


def _checked_row_importance(row_importance, shape):
    row_importance = np.asarray(row_importance, dtype=np.float32)
    if len(shape) != 2 or row_importance.shape != (shape[0],):
        expected = (shape[0],) if len(shape) == 2 else "a matrix"
        raise AnepackError(None, f"row importance has shape {row_importance.shape}; a weight {shape} needs {expected}")
    if not np.isfinite(row_importance).all() or (row_importance < 0).any():
        raise AnepackError(None, "row importance must be finite and >= 0")
    return row_importance


def _checked_importance(importance, shape):
    if importance is None:
        return None
    importance = np.asarray(importance, dtype=np.float32)
    columns = shape[-1]
    if len(shape) == 3 and importance.shape == (columns,):
        importance = np.broadcast_to(importance, (shape[0], columns))
    expected = (columns,) if len(shape) == 2 else (shape[0], columns)
    if importance.shape != expected:
        raise AnepackError(
            None, f"importance has shape {importance.shape}; a weight {shape} needs {expected}"
        )
    if not np.isfinite(importance).all() or (importance < 0).any():
        raise AnepackError(None, "importance must be finite and >= 0")
    return importance


__all__ = [
    "DenseTensor",
    "Float16Format",
    "Format",
    "FormatSpecError",
    "LinearFormat",
    "LinearTensor",
    "LutFormat",
    "PalettizedTensor",
    "QUANTIZERS",
    "QuantizedTensor",
    "VectorLutFormat",
    "blockwise_shift_scale",
    "formats",
    "lut_to_dense",
    "pack_bits",
    "parse_format",
    "quantize",
    "quantize_bank_streamed",
    "unpack_bits",
]
