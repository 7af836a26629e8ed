"""Linear (integer + scale) quantization and Core ML's ``constexpr_blockwise_shift_scale``.

Per-tensor, per-output-channel and per-block formats are one computation over blocks of
the weight: a block is the whole matrix, one row, or B consecutive columns of one row.
Scales are computed in float32 and stored as float16 (what the ANE reads); codes are
rounded against the stored float16 scale, so dequantization reproduces the nearest levels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from anepack.errors import AnepackError
from anepack.quant.formats import FormatSpecError, LinearFormat
from anepack.quant.packing import QuantizedTensor

# With importance given, each block's range is shrunk by each of these factors and the
# importance-weighted squared error picks the best (llama.cpp's imatrix quantizers search a
# similar small grid of scales). Clipping a few outliers often buys finer levels for the rest.
SHRINK_FACTORS = tuple(np.linspace(1.0, 0.70, 16))
ROW_CHUNK_ELEMENTS = 1 << 22
# Elements of one chunk of the scale search: its buffers stay in a core's L2 cache.
CACHE_CHUNK_ELEMENTS = 1 << 16

_FP16_MAX = float(np.finfo(np.float16).max)
_FP16_SMALLEST = float(np.finfo(np.float16).smallest_subnormal)
# Byte-wide codes in rows at least this long are dequantized through a per-row table.
_TABLE_MIN_ROW = 2048
_TABLE_BLOCK_ROWS = 4096


def blockwise_shift_scale(
    data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None = None, dtype: type = np.float16
) -> np.ndarray:
    """Core ML's ``out = scale[blk] * (data - offset[blk])`` with float16 scale and output.

    ``scale`` (and ``offset``) have the rank of ``data``; each data dim is a multiple of the
    scale dim, the block size along that axis. ``data - offset`` is an exact small integer
    (or an fp16 value) and the product of two fp16 values is exact in float32, so the one
    rounding to float16 at the end is exactly fp16 arithmetic. ``dtype`` float32 returns the
    same float16 values widened, for callers that compute in float32.
    """
    if scale.ndim != data.ndim:
        raise ValueError(f"scale rank {scale.ndim} differs from data rank {data.ndim}")
    if _one_scale_per_row(data, scale, offset):
        return _shift_scale_by_table(data, scale, offset, dtype)
    if dtype != np.float16:
        return blockwise_shift_scale(data, scale, offset).astype(dtype)
    # Leading-axis chunks aligned to the scale's blocks keep the float32 temporaries small.
    rows_per_block = data.shape[0] // scale.shape[0] if scale.shape[0] > 1 else 1
    row_size = data.size // max(1, data.shape[0])
    step = max(rows_per_block, ROW_CHUNK_ELEMENTS // max(1, row_size) // rows_per_block * rows_per_block)
    if data.shape[0] <= step:
        return _shift_scale(data, scale, offset)
    out = np.empty(data.shape, dtype=np.float16)
    for start in range(0, data.shape[0], step):
        blocks = slice(start // rows_per_block, (start + step) // rows_per_block) if scale.shape[0] > 1 else slice(None)
        out[start : start + step] = _shift_scale(
            data[start : start + step], scale[blocks], None if offset is None else offset[blocks]
        )
    return out


def _shift_scale(data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
    blocked = [n for count, size in zip(scale.shape, data.shape) for n in (count, size // count)]
    broadcast = [n for count in scale.shape for n in (count, 1)]
    values = data.reshape(blocked).astype(np.float32)
    if offset is not None:
        values -= offset.reshape(broadcast).astype(np.float32)
    values *= scale.reshape(broadcast).astype(np.float32)
    return values.astype(np.float16).reshape(data.shape)


def _one_scale_per_row(data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> bool:
    """True for byte-wide codes whose scale (and offset) is one per row or per tensor, with rows
    long enough that a row's table of 256 outputs is small next to the row (measured: twice as
    fast as the float32 path on 2816-long rows, slower on 1024-long ones)."""
    return (
        data.dtype in (np.int8, np.uint8) and data.ndim >= 1 and data.shape[-1] >= _TABLE_MIN_ROW
        and scale.shape[-1] == 1 and all(count in (1, size) for count, size in zip(scale.shape, data.shape))
        and (offset is None or offset.shape == scale.shape)
    )


def _shift_scale_by_table(
    data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None, dtype: type
) -> np.ndarray:
    """``blockwise_shift_scale`` for ``_one_scale_per_row`` codes: each row's output for every
    possible byte is computed once, with the same float32 arithmetic and the one rounding to
    float16, then looked up. Converting every element to float16 costs several times more than
    the lookup (numpy converts without the CPU's conversion instructions). Tables are made for
    a block of rows at a time, so an LM head's stay a few megabytes."""
    rows = data.reshape(-1, data.shape[-1]).view(np.uint8)
    row_shape = data.shape[:-1] + (1,)
    row_scale = np.broadcast_to(scale, row_shape).reshape(-1, 1).astype(np.float32)
    row_offset = None if offset is None else np.broadcast_to(offset, row_shape).reshape(-1, 1).astype(np.float32)
    codes = np.arange(256, dtype=np.uint8).view(data.dtype).astype(np.float32)  # by the code's byte
    out = np.empty(rows.shape, dtype)
    for start in range(0, len(rows), _TABLE_BLOCK_ROWS):
        block = slice(start, start + _TABLE_BLOCK_ROWS)
        table = codes if row_offset is None else codes - row_offset[block]
        table = (table * row_scale[block]).astype(np.float16).astype(dtype)
        for row, (codes_of_row, table_of_row) in enumerate(zip(rows[block], table), start):
            np.take(table_of_row, codes_of_row, out=out[row])
    return out.reshape(data.shape)


def float16_scale(scale: np.ndarray) -> np.ndarray:
    """Scales as stored: float16, never zero (a block of zeros keeps scale 1 and code 0)."""
    if not np.all(np.isfinite(scale)) or np.max(scale, initial=0.0) > _FP16_MAX:
        raise AnepackError(None, "weight magnitudes exceed what a float16 scale can represent")
    rounded = np.where(scale > 0, scale, 1.0).astype(np.float16)
    return np.where(rounded > 0, rounded, np.float16(_FP16_SMALLEST))


def symmetric_codes(weight: np.ndarray, scale: np.ndarray, code_max: int) -> np.ndarray:
    """Nearest signed codes in [-code_max, code_max] for ``weight / scale`` (float32)."""
    return np.clip(np.rint(weight / scale.astype(np.float32)), -code_max, code_max)


@dataclass(frozen=True)
class LinearTensor(QuantizedTensor):
    """Inputs of ``constexpr_blockwise_shift_scale``: integer ``data`` (int8 or uint8 numpy
    arrays holding 8- or 4-bit codes), float16 ``scale`` and ``offset`` (None when the
    format is signed symmetric, whose offset is zero), all of the weight's rank."""

    data: np.ndarray
    scale: np.ndarray
    offset: np.ndarray | None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    def storage_bits(self) -> dict[str, tuple[np.ndarray, int]]:
        nbits = self.format.nbits
        stored = {"data": (self.data, nbits), "scale": (self.scale, 16)}
        if self.offset is not None:
            stored["offset"] = (self.offset, nbits)
        return stored

    def dequantize(self) -> np.ndarray:
        return blockwise_shift_scale(self.data, self.scale, self.offset)


def _block_shape(fmt: LinearFormat, rows: int, cols: int) -> tuple[int, int]:
    if fmt.block_size:
        if cols % fmt.block_size:
            raise FormatSpecError(
                None, f"{fmt.spec} needs Cin divisible by {fmt.block_size}, got {cols} columns"
            )
        return 1, fmt.block_size
    return (1, cols) if fmt.per_channel else (rows, cols)


def _scale_and_offset(
    fmt: LinearFormat, low: np.ndarray, high: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Float16 scale and integer offset per block for the range [low, high] (low <= 0 <= high)."""
    code_min, code_max = fmt.code_range
    if not fmt.affine:
        half_levels = 2 ** (fmt.nbits - 1) - 1
        offset = 0 if fmt.signed else half_levels
        return float16_scale(high / half_levels), np.full(high.shape, offset, np.float32)
    span = high - low
    with np.errstate(invalid="ignore", divide="ignore"):
        zero_point = np.where(span > 0, (code_min * high - code_max * low) / span, 0.0)
    offset = np.clip(np.rint(zero_point), code_min, code_max).astype(np.float32)
    return float16_scale(span / (code_max - code_min)), offset


def quantize_linear(
    weight: np.ndarray, fmt: LinearFormat, importance: np.ndarray | None = None
) -> LinearTensor:
    """Quantize a float32 ``[Cout, Cin]`` matrix; ``importance`` is ``[Cin]`` or None.

    Per-channel and per-block scales never look across rows, so large matrices go through in
    row chunks: the scale search's temporaries then stay near one chunk (a 262144-row LM head
    would otherwise need several float32 copies of itself).
    """
    rows, cols = weight.shape
    step = max(1, ROW_CHUNK_ELEMENTS // cols)
    if (fmt.per_channel or fmt.block_size) and rows > step:
        parts = [_quantize_rows(weight[start : start + step], fmt, importance) for start in range(0, rows, step)]
        return LinearTensor(
            format=fmt,
            data=np.concatenate([part.data for part in parts]),
            scale=np.concatenate([part.scale for part in parts]),
            offset=None if parts[0].offset is None else np.concatenate([part.offset for part in parts]),
        )
    return _quantize_rows(weight, fmt, importance)


def _search_levels(
    fmt: LinearFormat, blocks: np.ndarray, scales: np.ndarray, offsets: np.ndarray, importance: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per block, the index of the candidate scale and offset (``scales[i]``, ``offsets[i]``)
    with the least importance-weighted squared error (the first of equals; without importance,
    the only candidate), and the codes under it.

    The search is most of a large matrix's quantization time and is bound by memory traffic,
    so every candidate is tried on a cache-sized chunk of block rows before the next chunk is
    read, in two reused buffers (fresh temporaries per candidate cost more than the arithmetic).
    A block larger than a chunk (one scale over a whole tensor or expert bank) is read in
    slices of its rows, its candidates' errors summed over the slices: the buffers stay
    chunk-sized instead of two float32 copies of the tensor (4 GB for a 26B-A4B gate/up bank).
    """
    grid_rows, _, grid_cols, _ = blocks.shape
    chosen = np.zeros((grid_rows, 1, grid_cols, 1), dtype=np.intp)
    if importance is not None:
        totals = np.zeros((len(scales), *chosen.shape), dtype=np.float64)
        _add_candidate_errors(fmt, blocks, scales, offsets, importance, totals)
        chosen = np.argmin(totals, axis=0)  # the first of equals
    return chosen, _codes(fmt, blocks, scales, offsets, chosen)


def _passes(shape: tuple[int, ...]) -> tuple[list[tuple[slice, slice]], tuple[int, ...]]:
    """Cache-sized pieces of blocks ``[grid_rows, block_rows, grid_cols, block_cols]`` (whole
    blocks, or row slices of one block larger than a chunk), and the buffer shape they need."""
    grid_rows, block_rows, grid_cols, block_cols = shape
    row_elements = grid_cols * block_cols
    slice_rows = max(1, CACHE_CHUNK_ELEMENTS // row_elements)  # rows of one block per pass
    if block_rows <= slice_rows:
        step = max(1, CACHE_CHUNK_ELEMENTS // (block_rows * row_elements))  # whole blocks per pass
        passes = [(slice(g, g + step), slice(None)) for g in range(0, grid_rows, step)]
    else:
        step = 1
        passes = [(slice(g, g + 1), slice(r, r + slice_rows)) for g in range(grid_rows)
                  for r in range(0, block_rows, slice_rows)]
    return passes, (min(step, grid_rows), min(block_rows, slice_rows), grid_cols, block_cols)


def _add_candidate_errors(
    fmt: LinearFormat, blocks: np.ndarray, scales: np.ndarray, offsets: np.ndarray, importance: np.ndarray,
    totals: np.ndarray,
) -> None:
    """Add each candidate's weighted squared error per block into ``totals`` (float64
    ``[candidates, grid_rows, 1, grid_cols, 1]``), cache-sized piece by piece, in order."""
    grid_rows, _, grid_cols, block_cols = blocks.shape
    scales = scales.astype(np.float32)
    # A zero offset (signed symmetric formats) adds and removes nothing: those passes are skipped.
    shifted = bool(np.any(offsets))
    weights = np.asarray(importance, np.float32).reshape(1, 1, grid_cols, block_cols)
    passes, buffer_shape = _passes(blocks.shape)
    error, product = np.empty(buffer_shape, np.float32), np.empty(buffer_shape, np.float32)
    for rows, within in passes:
        chunk = blocks[rows, within]
        totals[:, rows] += _candidate_errors(
            fmt, chunk, scales[:, rows], offsets[:, rows] if shifted else None, weights,
            error[: chunk.shape[0], : chunk.shape[1]], product[: chunk.shape[0], : chunk.shape[1]])


def _codes(fmt: LinearFormat, blocks: np.ndarray, scales: np.ndarray, offsets: np.ndarray,
           chosen: np.ndarray) -> np.ndarray:
    """The codes of ``blocks`` under each block's chosen candidate, piece by piece."""
    code_min, code_max = fmt.code_range
    scales = scales.astype(np.float32)
    codes = np.empty(blocks.shape, dtype=np.int8 if fmt.signed else np.uint8)
    passes, buffer_shape = _passes(blocks.shape)
    buffer = np.empty(buffer_shape, np.float32)
    for rows, within in passes:
        chunk = blocks[rows, within]
        out = buffer[: chunk.shape[0], : chunk.shape[1]]
        best = chosen[rows][None]
        scale = np.take_along_axis(scales[:, rows], best, axis=0)[0]
        _round_to_codes(chunk, scale, np.take_along_axis(offsets[:, rows], best, axis=0)[0], code_min, code_max, out)
        codes[rows, within] = out
    return codes


def _candidate_errors(
    fmt: LinearFormat, chunk: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None, weights: np.ndarray,
    error: np.ndarray, product: np.ndarray,
) -> np.ndarray:
    """Each candidate's weighted squared error per block of ``chunk`` (summed over the block's
    rows and columns in ``chunk``), ``[candidates, ...]``; ``error`` and ``product`` are
    buffers of the chunk's shape."""
    errors = []
    for index, scale in enumerate(scales):
        _dequantized_levels(chunk, scale, None if offsets is None else offsets[index], *fmt.code_range, out=error)
        np.subtract(chunk, error, out=error)
        np.multiply(weights, error, out=product)
        product *= error
        errors.append(np.sum(product, axis=(1, 3), keepdims=True))
    return np.stack(errors)


def _dequantized_levels(
    chunk: np.ndarray, scale: np.ndarray, offset: np.ndarray | None, code_min: int, code_max: int, out: np.ndarray
) -> None:
    """Into ``out``, the values ``chunk`` dequantizes to: nearest code, clipped to the range."""
    _round_to_codes(chunk, scale, offset, code_min, code_max, out)
    if offset is not None:
        out -= offset
    out *= scale


def _round_to_codes(
    chunk: np.ndarray, scale: np.ndarray, offset: np.ndarray | None, code_min: int, code_max: int, out: np.ndarray
) -> None:
    """Into ``out``, each value's nearest code under ``scale`` and ``offset``, clipped to the range."""
    np.divide(chunk, scale, out=out)
    np.rint(out, out=out)
    if offset is not None:
        out += offset
    np.clip(out, code_min, code_max, out=out)


def _quantize_rows(weight: np.ndarray, fmt: LinearFormat, importance: np.ndarray | None) -> LinearTensor:
    rows, cols = weight.shape
    block_rows, block_cols = _block_shape(fmt, rows, cols)
    grid = (rows // block_rows, block_rows, cols // block_cols, block_cols)
    blocks = weight.reshape(grid)
    scales, offsets = _candidates(fmt, blocks.min(axis=(1, 3), keepdims=True),
                                  blocks.max(axis=(1, 3), keepdims=True), importance)
    chosen, codes = _search_levels(fmt, blocks, scales, offsets, importance)
    return _linear_tensor(fmt, codes.reshape(rows, cols), scales, offsets, chosen, (grid[0], grid[2]))


def _candidates(fmt: LinearFormat, low: np.ndarray, high: np.ndarray,
                importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Candidate scales and offsets ``[candidates, ...]`` for blocks spanning ``[low, high]``."""
    if fmt.affine:
        low, high = np.minimum(low, 0.0), np.maximum(high, 0.0)
    else:
        high = np.maximum(-low, high)
        low = -high
    factors = (1.0,) if importance is None else SHRINK_FACTORS
    candidates = [_scale_and_offset(fmt, low * factor, high * factor) for factor in factors]
    return np.stack([scale for scale, _ in candidates]), np.stack([offset for _, offset in candidates])


def _linear_tensor(fmt: LinearFormat, codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray,
                   chosen: np.ndarray, scale_shape: tuple[int, int]) -> LinearTensor:
    scale = np.take_along_axis(scales, chosen[None], axis=0)[0]
    offset = np.take_along_axis(offsets, chosen[None], axis=0)[0]
    stored_offset = None
    if fmt.affine or not fmt.signed:
        stored_offset = offset.reshape(scale_shape).astype(codes.dtype)
    return LinearTensor(format=fmt, data=codes, scale=scale.reshape(scale_shape), offset=stored_offset)


def quantize_linear_streamed(
    read_rows: Callable[[int, int], np.ndarray], rows: int, cols: int, fmt: LinearFormat,
    importance: np.ndarray | None = None,
) -> LinearTensor:
    """``quantize_linear`` of a ``[rows, cols]`` matrix in a format with one scale over it,
    the matrix read by ``read_rows(start, stop)`` in parts instead of held: an expert bank seen
    as ``[E * Cout, Cin]``, 2 GB in float32 for 26B-A4B's gate/up. One pass finds the range,
    one sums the candidates' errors, one makes the codes; memory holds the codes and one part.
    The same result as ``quantize_linear`` on the whole matrix (the same sums in the same order)."""
    if fmt.per_channel or fmt.block_size:
        raise ValueError(f"{fmt.spec} has more than one scale: quantize it with quantize_linear")
    slice_rows = max(1, CACHE_CHUNK_ELEMENTS // cols)
    part_rows = max(1, ROW_CHUNK_ELEMENTS // cols // slice_rows) * slice_rows  # whole slices per part
    bounds = [(start, min(start + part_rows, rows)) for start in range(0, rows, part_rows)]

    def part(start: int, stop: int) -> np.ndarray:
        values = np.asarray(read_rows(start, stop), dtype=np.float32)
        if values.shape != (stop - start, cols):
            raise ValueError(f"read_rows({start}, {stop}) gave {values.shape}, not {(stop - start, cols)}")
        return values.reshape(1, stop - start, 1, cols)

    low, high = np.full((1, 1, 1, 1), np.inf, np.float32), np.full((1, 1, 1, 1), -np.inf, np.float32)
    for start, stop in bounds:
        values = part(start, stop)
        if not np.isfinite(values).all():
            raise AnepackError(None, "weight contains NaN or infinity")
        low, high = np.minimum(low, values.min()), np.maximum(high, values.max())
    scales, offsets = _candidates(fmt, low, high, importance)
    chosen = np.zeros((1, 1, 1, 1), dtype=np.intp)
    if importance is not None:
        totals = np.zeros((len(scales), 1, 1, 1, 1), dtype=np.float64)
        for start, stop in bounds:
            _add_candidate_errors(fmt, part(start, stop), scales, offsets, importance, totals)
        chosen = np.argmin(totals, axis=0)
    codes = np.empty((rows, cols), dtype=np.int8 if fmt.signed else np.uint8)
    for start, stop in bounds:
        codes[start:stop] = _codes(fmt, part(start, stop), scales, offsets, chosen).reshape(stop - start, cols)
    return _linear_tensor(fmt, codes, scales, offsets, chosen, (1, 1))
