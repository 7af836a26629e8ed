"""How much a quantized tensor differs from its source, and how hard a tensor is to quantize.

Everything streams over row chunks with float64 accumulators, so a 262144 x 640 embedding
or a 31M-parameter expert bank is measured in seconds without float64 copies of it.
"""

from __future__ import annotations

import math

import numpy as np

from anepack.quant.linear import float16_scale, symmetric_codes
from anepack.quant.packing import QuantizedTensor

_CHUNK_ELEMENTS = 1 << 22
INT8_CODE_MAX = 127


def _row_chunks(matrix: np.ndarray):
    step = max(1, _CHUNK_ELEMENTS // max(1, matrix.shape[1]))
    for start in range(0, matrix.shape[0], step):
        yield slice(start, start + step)


def _as_rows(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    return array.reshape(1, -1) if array.ndim < 2 else array.reshape(-1, array.shape[-1])


def _sqnr(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def weight_error(reference: np.ndarray, approximation: np.ndarray) -> dict[str, float]:
    """Weight-space SQNR (dB), cosine and max absolute error of ``approximation``."""
    ref_rows, approx_rows = _as_rows(reference), _as_rows(approximation)
    if ref_rows.shape != approx_rows.shape:
        raise ValueError(f"shapes differ: {np.shape(reference)} vs {np.shape(approximation)}")
    ref_energy = approx_energy = cross = noise = max_error = 0.0
    for rows in _row_chunks(ref_rows):
        ref = ref_rows[rows].astype(np.float64)
        approx = approx_rows[rows].astype(np.float64)
        error = ref - approx
        ref_energy += float(np.vdot(ref, ref))
        approx_energy += float(np.vdot(approx, approx))
        cross += float(np.vdot(ref, approx))
        noise += float(np.vdot(error, error))
        max_error = max(max_error, float(np.abs(error).max(initial=0.0)))
    norms = math.sqrt(ref_energy * approx_energy)
    cosine = cross / norms if norms > 0 else float(noise == 0.0)
    return {"sqnr_db": _sqnr(ref_energy, noise), "cosine": cosine, "max_abs_error": max_error}


def output_sqnr_db(
    weight: np.ndarray, approximation: np.ndarray, activations: np.ndarray | list[np.ndarray]
) -> float:
    """SQNR (dB) of ``X @ Wq.T`` against ``X @ W.T`` for calibration activations ``X [T, Cin]``.

    For an expert bank ``[E, Cout, Cin]``, ``activations`` is one ``X_e`` per expert (the rows
    routed to it, possibly none) and the energies are summed over the experts.
    """
    if np.ndim(weight) == 3:
        if len(activations) != len(weight):
            raise ValueError(f"{len(activations)} experts' activations for a bank of {len(weight)}")
        pairs = [(weight[e], approximation[e], x) for e, x in enumerate(activations)]
    else:
        pairs = [(weight, approximation, activations)]
    signal = noise = 0.0
    for matrix, approx, x in pairs:
        x = np.asarray(x, dtype=np.float64)
        for rows in _row_chunks(matrix):
            exact = x @ np.asarray(matrix[rows], dtype=np.float64).T
            error = exact - x @ np.asarray(approx[rows], dtype=np.float64).T
            signal += float(np.vdot(exact, exact))
            noise += float(np.vdot(error, error))
    return _sqnr(signal, noise)


def quality(
    weight: np.ndarray, quantized: QuantizedTensor, activations: np.ndarray | list[np.ndarray] | None = None
) -> dict[str, float]:
    """Every per-tensor number a report shows for one quantized weight (a bank's activations:
    one array per expert, see ``output_sqnr_db``)."""
    dequantized = quantized.dequantize()
    report = {"bits_per_weight": quantized.bits_per_weight, **weight_error(weight, dequantized)}
    if activations is not None:
        # A bank keeps its expert axis; any other weight is seen as rows of its last axis.
        shape = np.shape(weight) if np.ndim(weight) == 3 else (-1, np.shape(weight)[-1])
        weight = np.asarray(weight).reshape(shape)
        report["output_sqnr_db"] = output_sqnr_db(weight, dequantized.reshape(weight.shape), activations)
    return report


def _sum_squares(values: np.ndarray) -> float:
    """Sum of squares of a float32 array via BLAS (many partial sums: ~1e-7 relative error)."""
    flat = values.reshape(-1)
    return float(np.dot(flat, flat))


def _int8_noise(values: np.ndarray, scale: np.ndarray) -> float:
    """Squared error of symmetric int8 codes at ``scale``, dequantized to float16."""
    codes = symmetric_codes(values, scale, INT8_CODE_MAX)
    levels = (codes * scale.astype(np.float32)).astype(np.float16)
    return _sum_squares(values - levels)


def outlier_stats(weight: np.ndarray) -> dict[str, float]:
    """Outlier statistics of a tensor (rows = output channels; a vector is one row).

    ``max_abs_over_std`` and ``excess_kurtosis`` (0 for a Gaussian) say how heavy the tails
    are; ``int8_tensor_sqnr_db`` and ``int8_channel_sqnr_db`` are the weight SQNR that
    ``int8-tensor`` and ``int8-channel`` would give (same rounding, fp16 scales and output).
    """
    rows = _as_rows(weight)
    count = rows.size
    total = 0.0
    row_max = np.empty(rows.shape[0], dtype=np.float32)
    for chunk in _row_chunks(rows):
        values = rows[chunk].astype(np.float32, copy=False)
        total += float(values.sum(axis=1).sum(dtype=np.float64))
        row_max[chunk] = np.abs(values).max(axis=1)
    mean = total / count
    max_abs = float(row_max.max())
    tensor_scale = float16_scale(np.float32(max_abs / INT8_CODE_MAX))
    channel_scale = float16_scale(row_max / INT8_CODE_MAX)

    second = fourth = energy = tensor_noise = channel_noise = 0.0
    for chunk in _row_chunks(rows):
        values = rows[chunk].astype(np.float32, copy=False)
        centred_sq = np.square(values - np.float32(mean))
        second += float(centred_sq.sum(axis=1).sum(dtype=np.float64))
        fourth += _sum_squares(centred_sq)
        energy += _sum_squares(values)
        tensor_noise += _int8_noise(values, tensor_scale)
        channel_noise += _int8_noise(values, channel_scale[chunk, None])
    variance = second / count
    std = math.sqrt(variance)
    return {
        "numel": count,
        "mean": mean,
        "std": std,
        "max_abs": max_abs,
        "max_abs_over_std": max_abs / std if std > 0 else math.inf,
        "excess_kurtosis": (fourth / count) / variance**2 - 3.0 if variance > 0 else 0.0,
        "int8_tensor_sqnr_db": _sqnr(energy, tensor_noise),
        "int8_channel_sqnr_db": _sqnr(energy, channel_noise),
    }
