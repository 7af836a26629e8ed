"""Palettization (look-up-table weights) and Core ML's ``constexpr_lut_to_dense``.

Scalar LUTs cluster each group of ``G`` output rows with weighted 1-D k-means
(``anepack.quant.kmeans``); vector LUTs cluster ``V``-long column segments along Cout with
weighted Lloyd k-means. Either way the LUT is rounded to what Core ML stores (float16, or
int8 codes times a float16 scale) and every index is then re-chosen as the nearest stored
entry, so the indices are optimal for the LUT the ANE actually reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from anepack.quant.formats import FormatSpecError, LutFormat, VectorLutFormat
from anepack.quant.kmeans import kmeans_1d_centroids, kmeans_1d_float16, nearest_labels
from anepack.quant.linear import blockwise_shift_scale, float16_scale, symmetric_codes
from anepack.quant.packing import QuantizedTensor

INT8_LUT_CODE_MAX = 127  # coremltools' symmetric int8 range

# One LUT over more elements than this (a per-tensor LUT on an LM head) is clustered over the
# distinct float16 values (kmeans_1d_float16): the sorted path would hold ~50 bytes per element.
LARGE_GROUP_ELEMENTS = 1 << 23
# Vector k-means: Lloyd stops when a step lowers the weighted error by less than this
# fraction (the long tail of tiny moves changes nothing that matters) or after the step cap;
# distances of this many vectors to all centroids are held in memory at once.
_VECTOR_SETTLED_FRACTION = 1e-4
_VECTOR_LLOYD_STEPS = 40
_VECTOR_CHUNK = 1 << 18
_DECODE_BLOCK_ELEMENTS = 1 << 22
_WEIGHTS_BLOCK_ELEMENTS = 1 << 22


def lut_to_dense(
    indices: np.ndarray, lut: np.ndarray, vector_axis: int | None = None
) -> np.ndarray:
    """Core ML's ``constexpr_lut_to_dense``: ``lut`` has rank ``indices.ndim + 2``,
    ``[groups per axis..., 2^nbits, vector_size]``; each indices dim is a multiple of the
    LUT's group count there. Vectors are laid out along ``vector_axis`` (``out[..., i*V + j,
    ...] = lut[group, index[..., i, ...], j]``)."""
    rank = indices.ndim
    if lut.ndim != rank + 2:
        raise ValueError(f"lut rank {lut.ndim} must be indices rank {rank} + 2")
    # Decoded in blocks of whole LUT groups along the first axis: a flat LUT number per element
    # (int64) over a whole 262k-row head would be 1.3 GB beside a 335 MB result.
    rows, row_elements = indices.shape[0], max(indices[0].size, 1)
    rows_per_group = rows // lut.shape[0] if lut.shape[0] > 1 else 1  # one LUT: any rows
    block = rows_per_group * max(1, _DECODE_BLOCK_ELEMENTS // (rows_per_group * row_elements))
    if block >= rows:
        return _lut_block_to_dense(indices, lut, vector_axis)
    out = None
    for start in range(0, rows, block):
        group_slice = slice(start // rows_per_group, (start + block) // rows_per_group) if lut.shape[0] > 1 else slice(None)
        part = _lut_block_to_dense(indices[start:start + block], lut[group_slice], vector_axis)
        if out is None:
            scale = part.shape[0] // block  # a vector LUT along the first axis writes V rows per index row
            out = np.empty((rows * scale, *part.shape[1:]), dtype=part.dtype)
        out[start * scale:start * scale + part.shape[0]] = part
    return out


def _lut_block_to_dense(indices: np.ndarray, lut: np.ndarray, vector_axis: int | None) -> np.ndarray:
    rank = indices.ndim
    groups = lut.shape[:rank]
    entries, vector_size = lut.shape[rank:]
    blocked = [n for count, size in zip(groups, indices.shape) for n in (count, size // count)]
    # Flat number of each element's LUT, built per block so no full-size LUT copy is made.
    group_number = np.zeros([n for count in groups for n in (count, 1)], dtype=np.int64)
    stride = 1
    for axis in reversed(range(rank)):
        along = [1] * (2 * rank)
        along[2 * axis] = groups[axis]
        group_number = group_number + np.arange(groups[axis]).reshape(along) * stride
        stride *= groups[axis]
    flat_index = (group_number * entries + indices.reshape(blocked)).reshape(indices.shape)
    vectors = lut.reshape(-1, vector_size)[flat_index]
    if vector_size == 1:
        return vectors[..., 0]
    out_shape = list(indices.shape)
    out_shape[vector_axis] *= vector_size
    return np.moveaxis(vectors, -1, vector_axis + 1).reshape(out_shape)


@dataclass(frozen=True)
class PalettizedTensor(QuantizedTensor):
    """Inputs of ``constexpr_lut_to_dense`` and the optional scale ops around it.

    ``indices`` (uint8 numpy holding nbits codes), ``lut`` (float16, or int8 with
    ``lut_scale`` float16 shaped like the LUT with its last two dims 1: the
    ``constexpr_blockwise_shift_scale`` before ``lut_to_dense``), ``channel_scale`` (float16,
    the weight's rank with 1 along Cin: the ``constexpr_blockwise_shift_scale`` after it),
    ``vector_axis`` (the Cout axis for vector LUTs, else None).
    """

    indices: np.ndarray
    lut: np.ndarray
    lut_scale: np.ndarray | None
    channel_scale: np.ndarray | None
    vector_axis: int | None

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.indices.shape)
        if self.vector_axis is not None:
            shape[self.vector_axis] *= self.lut.shape[-1]
        return tuple(shape)

    def storage_bits(self) -> dict[str, tuple[np.ndarray, int]]:
        stored = {
            "indices": (self.indices, self.format.nbits),
            "lut": (self.lut, 8 if self.lut_scale is not None else 16),
        }
        if self.lut_scale is not None:
            stored["lut_scale"] = (self.lut_scale, 16)
        if self.channel_scale is not None:
            stored["channel_scale"] = (self.channel_scale, 16)
        return stored

    def dense_lut(self) -> np.ndarray:
        """The float16 LUT ``lut_to_dense`` reads (int8 LUTs dequantized first)."""
        if self.lut_scale is None:
            return self.lut
        return blockwise_shift_scale(self.lut, self.lut_scale)

    def dequantize(self) -> np.ndarray:
        dense = lut_to_dense(self.indices, self.dense_lut(), self.vector_axis)
        if self.channel_scale is None:
            return dense
        return blockwise_shift_scale(dense, self.channel_scale)

    def _with_leading_axis(self, arrays: dict[str, np.ndarray]) -> "PalettizedTensor":
        vector_axis = None if self.vector_axis is None else self.vector_axis + 1
        return dataclasses.replace(self, vector_axis=vector_axis, **arrays)


def _stored_lut(centroids: np.ndarray, int8_lut: bool):
    """(LUT as stored, its scale or None, the float16 values it decodes to) per group."""
    if not int8_lut:
        lut = centroids.astype(np.float16)
        return lut, None, lut
    scale = float16_scale(np.abs(centroids).max(axis=-1, keepdims=True) / INT8_LUT_CODE_MAX)
    codes = symmetric_codes(centroids, scale, INT8_LUT_CODE_MAX).astype(np.int8)
    decoded = (codes.astype(np.float32) * scale.astype(np.float32)).astype(np.float16)
    return codes, scale, decoded


def _error_weights(rows, cols, group, row_weights, column_weights) -> np.ndarray | None:
    """Per-element k-means error weights, ``[groups, group * cols]``, or one group-long row
    when every group shares them (importance per column, no per-channel scale)."""
    if row_weights is None:
        return None if column_weights is None else np.tile(column_weights, group)[None, :]
    per_element = np.broadcast_to(row_weights[:, None], (rows, cols))
    if column_weights is not None:
        per_element = per_element * column_weights
    return per_element.reshape(rows // group, group * cols)


def quantize_lut(
    weight: np.ndarray, fmt: LutFormat, importance: np.ndarray | None = None,
    row_importance: np.ndarray | None = None,
) -> PalettizedTensor:
    """Palettize a float32 ``[Cout, Cin]`` matrix; ``importance`` is ``[Cin]`` or None,
    ``row_importance`` ``[Cout]`` or None (each element's error weighs both)."""
    rows, cols = weight.shape
    group = fmt.group_size or rows
    if rows % group:
        raise FormatSpecError(None, f"{fmt.spec} needs Cout divisible by {group}, got {rows} rows")
    channel_scale = None
    values = weight
    column_weights = None if importance is None else np.asarray(importance, np.float32)
    # With a per-channel scale, an error e in the normalized row is an error e * scale in
    # the weight, so each row weighs scale^2 more.
    row_weights = None if row_importance is None else np.asarray(row_importance, np.float32)
    if fmt.per_channel_scale:
        channel_scale = float16_scale(np.abs(weight).max(axis=1, keepdims=True))
        row_scale = channel_scale.astype(np.float32)
        values = weight / row_scale
        scale_weights = (row_scale * row_scale)[:, 0]
        row_weights = scale_weights if row_weights is None else row_weights * scale_weights
    grouped = values.reshape(rows // group, group * cols)
    if group * cols > LARGE_GROUP_ELEMENTS:
        centroids = np.stack([
            kmeans_1d_float16(values[start : start + group], fmt.entries,
                              None if row_weights is None else row_weights[start : start + group], column_weights)
            for start in range(0, rows, group)
        ])
    else:
        # Groups are clustered independently; a block of them at a time keeps the per-element
        # error weights small (a whole LM head's would be 671 MB).
        per_block = max(1, _WEIGHTS_BLOCK_ELEMENTS // (group * cols))
        parts = []
        for first in range(0, rows // group, per_block):
            block = grouped[first:first + per_block]
            block_rows = slice(first * group, (first + len(block)) * group)
            block_row_weights = None if row_weights is None else row_weights[block_rows]
            weights = _error_weights(len(block) * group, cols, group, block_row_weights, column_weights)
            parts.append(kmeans_1d_centroids(block, fmt.entries, weights))
        centroids = np.concatenate(parts)
    lut, lut_scale, decoded = _stored_lut(centroids, fmt.int8_lut)
    indices = nearest_labels(grouped, decoded).reshape(rows, cols)
    lut_shape = (rows // group, 1, fmt.entries, 1)
    return PalettizedTensor(
        format=fmt,
        indices=indices,
        lut=lut.reshape(lut_shape),
        lut_scale=None if lut_scale is None else lut_scale.reshape(rows // group, 1, 1, 1),
        channel_scale=channel_scale,
        vector_axis=None,
    )


def _nearest_vectors(points: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (``[k, V]``) of each column of ``points`` (``[V, N]``, one vector per
    column, the layout in which these products are fast), and the squared distance to it."""
    labels = np.empty(points.shape[1], dtype=np.int64)
    distances = np.empty(points.shape[1], dtype=np.float32)
    centroid_norms = np.einsum("kd,kd->k", centroids, centroids)
    for start in range(0, points.shape[1], _VECTOR_CHUNK):
        chunk = points[:, start : start + _VECTOR_CHUNK]
        products = centroids @ chunk
        # |x - c|^2 without the |x|^2 term, which is the same for every centroid; a running
        # minimum over the k rows is several times faster than argmin across them.
        closest = centroid_norms[0] - 2.0 * products[0]
        nearest = np.zeros(chunk.shape[1], dtype=np.int64)
        for centroid in range(1, len(centroids)):
            candidate = centroid_norms[centroid] - 2.0 * products[centroid]
            closer = candidate < closest
            nearest[closer] = centroid
            np.minimum(closest, candidate, out=closest)
        columns = slice(start, start + chunk.shape[1])
        labels[columns] = nearest
        distances[columns] = np.maximum(closest + np.einsum("dn,dn->n", chunk, chunk), 0.0)
    return labels, distances


def _plus_plus_start(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeds (``[k, V]``) drawn from a random sample of the vectors."""
    count = points.shape[1]
    sample = points[:, rng.choice(count, size=min(count, 64 * k), replace=False)].T
    centroids = [sample[rng.integers(len(sample))]]
    distance = np.sum((sample - centroids[0]) ** 2, axis=1, dtype=np.float64)
    for _ in range(k - 1):
        total = distance.sum()
        if total > 0:
            pick = rng.choice(len(sample), p=distance / total)
        else:
            pick = rng.integers(len(sample))
        centroids.append(sample[pick])
        to_pick = np.sum((sample - sample[pick]) ** 2, axis=1, dtype=np.float64)
        distance = np.minimum(distance, to_pick)
    return np.array(centroids, dtype=np.float32)


def weighted_vector_kmeans(
    points: np.ndarray, k: int, weights: np.ndarray | None = None, seed: int = 0
) -> np.ndarray:
    """Weighted Lloyd k-means of the columns of ``points`` (``[V, N]``) into ``[k, V]``.

    ``weights`` ``[N]`` weighs each vector's squared error. An emptied cluster is re-seeded
    at the vector with the largest weighted error, so every centroid stays in use.
    """
    rng = np.random.default_rng(seed)
    if weights is None:
        weights = np.ones(points.shape[1], np.float32)
    weighted_points = points * weights
    centroids = _plus_plus_start(points, k, rng)
    previous_error = np.inf
    for _ in range(_VECTOR_LLOYD_STEPS):
        labels, distances = _nearest_vectors(points, centroids)
        weighted_distances = weights * distances
        error = float(weighted_distances.sum(dtype=np.float64))
        if previous_error - error <= _VECTOR_SETTLED_FRACTION * error:
            break
        previous_error = error
        mass = np.bincount(labels, weights=weights, minlength=k)
        filled = mass > 0
        for dim, row in enumerate(weighted_points):
            total = np.bincount(labels, weights=row, minlength=k)
            centroids[filled, dim] = total[filled] / mass[filled]
        for empty in np.flatnonzero(~filled):
            worst = np.argmax(weighted_distances)
            centroids[empty] = points[:, worst]
            weighted_distances[worst] = 0.0
    return centroids


def quantize_vector_lut(
    weight: np.ndarray, fmt: VectorLutFormat, importance: np.ndarray | None = None
) -> PalettizedTensor:
    """Vector-palettize a float32 ``[Cout, Cin]`` matrix along Cout; ``importance`` ``[Cin]``."""
    rows, cols = weight.shape
    size = fmt.vector_size
    if rows % size:
        raise FormatSpecError(None, f"{fmt.spec} needs Cout divisible by {size}, got {rows} rows")
    # Vector (i, c) is rows i*V .. i*V+V-1 of column c; index (i, c) selects it. Points are
    # held dimension-major, [V, N] with N = (Cout / V) * Cin in index order.
    points = np.ascontiguousarray(weight.reshape(rows // size, size, cols).transpose(1, 0, 2))
    points = points.reshape(size, -1)
    vector_weights = None
    if importance is not None:
        vector_weights = np.tile(np.asarray(importance, np.float32), rows // size)
    centroids = weighted_vector_kmeans(points, fmt.entries, vector_weights)
    lut = centroids.astype(np.float16)
    labels, _ = _nearest_vectors(points, lut.astype(np.float32))
    return PalettizedTensor(
        format=fmt,
        indices=labels.astype(np.uint8).reshape(rows // size, cols),
        lut=lut.reshape(1, 1, fmt.entries, size),
        lut_scale=None,
        channel_scale=None,
        vector_axis=0,
    )
