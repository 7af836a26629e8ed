"""Weighted 1-D k-means over many independent groups at once: the clustering behind every LUT.

A palettized weight stores, per group, ``k`` scalar centroids and one index per element, so
the best LUT is the exact solution of weighted 1-D k-means on that group's values.

- ``kmeans_1d_exact``: the optimum, by dynamic programming over sorted values (Wu 1991;
  Gronlund et al. 2017). Each of the ``k`` layers is a row-maximum search in a totally
  monotone matrix, solved by divide and conquer, vectorized over every group and every
  subproblem of one recursion level at once. ``O(k n log n)`` per group.
- ``kmeans_1d``: the production path, within about 0.01 dB of the optimum on heavy-tailed
  and real weights (docs/quantization.md, Clustering). A companding start and Lloyd steps,
  then joint searches of all boundaries (a DP over a few candidate positions per
  boundary: first wide, then local), each followed by Lloyd steps. A Lloyd step costs
  ``O(k log n)`` per group: a binary search of the centroid midpoints in the sorted
  values, with cluster sums read from prefix sums. Where the exact DP is cheap (few
  distinct values for the group length, e.g. one LUT per tensor) it is used instead.

Both sort each group once and work in float64 prefix sums. Only positions where the sorted
value changes can be cluster boundaries (equal values always share the nearest centroid),
which is coremltools' "cluster the unique fp16 values with counts as weights" without
ragged arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Groups are processed in chunks of about this many elements: big enough that numpy's
# per-call overhead is shared by hundreds of groups, small enough that the float64 prefix
# sums (and the exact path's per-layer choices) stay within a few hundred megabytes.
_CHUNK_ELEMENTS = 1 << 23
_EXACT_CHUNK_ELEMENTS = 1 << 20
# Labels are computed over blocks of groups this big so that their k - 1 passes hit cache.
_LABEL_BLOCK_ELEMENTS = 1 << 18

# Production-path parameters, each measured against the exact optimum on the synthetic
# expert bank, on heavy-tailed groups with k = 4, 16, 64 and on Gemma 3 270M tensors
# (docs/quantization.md, Clustering): a density^0.4 companding start read off 256
# equal-count bins; Lloyd steps before and after each search (more change nothing
# measurable: the searches make the large moves); in the wide search, per boundary, 6
# evenly spaced candidates on each side plus fixed offsets from each neighbour, for at
# most 5 rounds (large k needs several: a round shifts clusters by at most one slot); in
# the local search, offsets of 1 to 128 positions.
_DENSITY_BINS = 256
_COMPANDING_EXPONENT = 0.4
_START_LLOYD_STEPS = 10
_FINAL_LLOYD_STEPS = 20
_WIDE_STEPS = 6
_NEIGHBOUR_OFFSETS = np.array([1, 3, 9, 27])
_WIDE_ROUNDS = 5
_LOCAL_OFFSETS = 2 ** np.arange(8)
# Lloyd's binary searches look this far around last step's boundaries first.
_NEAR_RADIUS = 16
# kmeans_1d runs the exact DP when its work, about distinct * log2(distinct) * (k - 1)
# per group, is at most this many times the group's length: there it costs at most a few
# times the refined search (measured: 0.07 s against 0.03 s for one LUT over a Gemma 3
# 270M attention matrix), and on large tensors less.
_EXACT_WORK_PER_VALUE = 4


def kmeans_1d(
    values: np.ndarray, k: int, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Near-optimal weighted k-means of each row of ``values`` (``[G, n]``) into ``k`` clusters.

    ``weights`` (>= 0, broadcastable to ``[G, n]``; None means all ones) weighs each
    element's squared error; a group whose weights are all zero is clustered unweighted.
    Returns ``centroids`` float32 ``[G, k]`` ascending and ``labels`` uint8 ``[G, n]``,
    the index of each element's nearest centroid. With fewer distinct values than ``k``
    the spare centroids repeat data values, so every LUT entry is finite.
    """
    centroids = kmeans_1d_centroids(values, k, weights)
    return centroids, nearest_labels(values, centroids)


def kmeans_1d_centroids(values: np.ndarray, k: int, weights: np.ndarray | None = None) -> np.ndarray:
    """``kmeans_1d``'s centroids alone, for callers that label against a rounded LUT anyway."""
    return _cluster_groups(values, k, weights, _near_optimal_boundaries, _CHUNK_ELEMENTS)


def kmeans_1d_exact(
    values: np.ndarray, k: int, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Optimal weighted k-means of each row; same arguments and results as ``kmeans_1d``.

    Optimal up to float64 rounding of the prefix sums; the float32 centroids are the
    optimal clusters' means rounded once.
    """
    centroids = _cluster_groups(values, k, weights, _exact_boundaries, _EXACT_CHUNK_ELEMENTS)
    return centroids, nearest_labels(values, centroids)


def kmeans_1d_float16(
    values: np.ndarray, k: int, row_weights: np.ndarray | None = None, column_weights: np.ndarray | None = None
) -> np.ndarray:
    """Optimal ``k`` centroids (float32, ascending) of one group, the whole ``[rows, cols]``
    ``values``, clustered as their float16 values: each distinct float16 value is one point
    weighted by the summed weights (``row_weights[r] * column_weights[c]``, or counts) of the
    elements that round to it, coremltools' method for large groups. Memory stays near one
    chunk of rows and 65536 bins, where the sorted path needs about 50 bytes per element (9 GB
    for a 262144 x 640 LM head). Values beyond float16's range raise ValueError.
    """
    values = np.asarray(values, dtype=np.float32)
    low, high = float(values.min()), float(values.max())  # NaN propagates; no full-size temporaries
    if not (np.isfinite(low) and np.isfinite(high)) or max(-low, high) > float(np.finfo(np.float16).max):
        raise ValueError("values must be finite and within float16's range")
    n_rows, n_cols = values.shape
    weighted = row_weights is not None or column_weights is not None
    rows = np.ones(n_rows) if row_weights is None else np.asarray(row_weights, np.float64)
    columns = np.ones(n_cols) if column_weights is None else np.asarray(column_weights, np.float64)
    totals = np.zeros(1 << 16, dtype=np.float64)
    step = max(1, _CHUNK_ELEMENTS // n_cols)
    for start in range(0, n_rows, step):
        bits = values[start : start + step].astype(np.float16).view(np.uint16)
        weights = (rows[start : start + step, None] * columns[None, :]).ravel() if weighted else None
        totals += np.bincount(bits.ravel(), weights=weights, minlength=1 << 16)
    present = np.flatnonzero(totals > 0)
    if present.size == 0:  # every weight zero: cluster the values unweighted
        return kmeans_1d_float16(values, k)
    points = present.astype(np.uint16).view(np.float16).astype(np.float32)
    order = np.argsort(points, kind="stable")
    centroids = _cluster_groups(points[order][None, :], k, totals[present][order][None, :], _exact_boundaries,
                                _EXACT_CHUNK_ELEMENTS)
    return centroids[0]


def nearest_labels(values: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Per group, the index of the nearest of ``levels`` (``[G, k]``, ascending) for each of
    ``values`` (``[G, n]``, compared as float32), the lower index on a tie; uint8 ``[G, n]``.

    A label is the count of midpoints strictly below the value. Each float64 midpoint is
    rounded down to float32, which keeps that comparison exact for float32 values.
    """
    values = np.asarray(values, dtype=np.float32)
    levels = np.asarray(levels, dtype=np.float64)
    midpoints = (levels[:, :-1] + levels[:, 1:]) / 2.0
    thresholds = midpoints.astype(np.float32)
    rounded_up = thresholds > midpoints
    thresholds[rounded_up] = np.nextafter(thresholds[rounded_up], np.float32(-np.inf))
    labels = np.zeros(values.shape, dtype=np.uint8)
    block = max(1, _LABEL_BLOCK_ELEMENTS // values.shape[1])
    for start in range(0, values.shape[0], block):
        rows = slice(start, start + block)
        for column in range(thresholds.shape[1]):
            labels[rows] += values[rows] > thresholds[rows, column : column + 1]
    return labels


def _cluster_groups(values, k, weights, find_boundaries, chunk_elements) -> np.ndarray:
    """Centroids ``[G, k]`` of each row of ``values``, chunk by chunk of groups."""
    values, weights = _validated(values, k, weights)
    n_groups, n = values.shape
    centroids = np.empty((n_groups, k), dtype=np.float32)
    step = max(1, chunk_elements // n)
    for start in range(0, n_groups, step):
        rows = slice(start, start + step)
        groups = _SortedGroups.build(values[rows], None if weights is None else weights[rows])
        centroids[rows] = groups.centroids(find_boundaries(groups, k))
    return centroids


def _validated(values, k, weights):
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[1] == 0:
        raise ValueError(f"values must be a non-empty [groups, n] array, got shape {values.shape}")
    if not 1 <= k <= 256:
        raise ValueError(f"k must be in 1..256 so that labels fit uint8, got {k}")
    values = values.astype(np.float32, copy=False)
    if not np.isfinite(values).all():
        raise ValueError("values contain NaN or infinity")
    if weights is None:
        return values, None
    weights = np.broadcast_to(np.asarray(weights, dtype=np.float64), values.shape)
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("weights must be finite and >= 0")
    weightless_groups = ~(weights > 0).any(axis=1)
    if weightless_groups.any():
        weights = weights.copy()
        weights[weightless_groups] = 1.0
    return values, weights


@dataclass(frozen=True)
class _SortedGroups:
    """Groups sorted ascending, with prefix sums that give any run's weight and mean.

    Prefix arrays have ``n + 1`` columns: entry ``i`` sums the first ``i`` sorted elements.
    Values are shifted by each group's median before summing so that differences of large
    prefix sums keep float64 precision. A run's squared error is its second moment minus
    ``W mean^2``, and second moments add up to the same constant over any partition, so
    comparing partitions only needs ``score = sum W mean^2``: no second-moment sums.
    """

    sorted_values: np.ndarray  # float32 [G, n]
    shift: np.ndarray  # float64 [G, 1]
    weight_sum: np.ndarray | None  # float64 [G, n + 1]; None when every weight is 1
    first_moment: np.ndarray  # float64 [G, n + 1], of the shifted values

    @classmethod
    def build(cls, values: np.ndarray, weights: np.ndarray | None) -> _SortedGroups:
        n = values.shape[1]
        if weights is None:
            sorted_values = np.sort(values, axis=1)
            weight_sum = None
        else:
            sorted_values, order = _sorted_with_order(values)
            if weights.strides[0] == 0:  # one row for every group (per-column importance): a 1-D gather
                sorted_weights = np.take(weights[0], order)
            else:
                sorted_weights = np.take_along_axis(weights, order, axis=1)
            weight_sum = _prefix_sum(sorted_weights)
        shift = sorted_values[:, n // 2 : n // 2 + 1].astype(np.float64)
        # Built in place: the difference of two float32 values is exact in float64.
        first_moment = np.zeros((values.shape[0], n + 1), dtype=np.float64)
        np.subtract(sorted_values, shift, out=first_moment[:, 1:])
        if weights is not None:
            first_moment[:, 1:] *= sorted_weights
        np.cumsum(first_moment[:, 1:], axis=1, out=first_moment[:, 1:])
        return cls(
            sorted_values=sorted_values,
            shift=shift,
            weight_sum=weight_sum,
            first_moment=first_moment,
        )

    @property
    def n(self) -> int:
        return self.sorted_values.shape[1]

    def weight_before(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Total weight of the first ``positions`` sorted elements of each row in ``rows``."""
        if self.weight_sum is None:
            return np.broadcast_to(positions, (rows.size, positions.shape[-1])).astype(np.float64)
        return _gather(self.weight_sum, rows, positions)

    def moment_before(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Sum of weight * shifted value over the first ``positions`` sorted elements."""
        return _gather(self.first_moment, rows, positions)

    def distinct_counts(self) -> np.ndarray:
        """Number of distinct values per group."""
        return 1 + np.count_nonzero(self.sorted_values[:, 1:] != self.sorted_values[:, :-1], axis=1)

    def splits(self) -> np.ndarray:
        """Candidate boundaries ``[G, width]``: 0, each index where the value changes, n.

        Rows with fewer distinct values are padded with ``n`` (empty runs).
        """
        n_groups, n = self.sorted_values.shape
        changes = np.zeros((n_groups, n + 1), dtype=bool)
        changes[:, 0] = changes[:, n] = True
        changes[:, 1:n] = self.sorted_values[:, 1:] != self.sorted_values[:, :-1]
        counts = changes.sum(axis=1)
        row, position = np.nonzero(changes)
        column = np.arange(row.size) - np.repeat(np.cumsum(counts) - counts, counts)
        splits = np.full((n_groups, int(counts.max())), n, dtype=np.int64)
        splits[row, column] = position
        return splits

    def centroids(self, boundaries: np.ndarray) -> np.ndarray:
        """Cluster means, float32 ``[G, k]``; an empty cluster takes the value at its start."""
        rows = np.arange(boundaries.shape[0])
        weight = np.diff(self.weight_before(rows, boundaries), axis=1)
        moment = np.diff(self.moment_before(rows, boundaries), axis=1)
        at_start = np.take_along_axis(
            self.sorted_values, np.minimum(boundaries[:, :-1], self.n - 1), axis=1
        ).astype(np.float64)
        means = self.shift + np.divide(moment, weight, out=np.zeros_like(moment), where=weight > 0)
        centroids = np.where(weight > 0, means, at_start).astype(np.float32)
        # Rounding to float32 can swap two nearly equal neighbours by an ulp.
        return np.maximum.accumulate(centroids, axis=1)


def _sorted_with_order(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row of float32 ``values`` sorted, and the column each sorted value came from
    (equal values in column order; -0.0 sorts before 0.0).

    One sort of 64-bit keys (the value's bits made order-preserving above the column) instead
    of ``argsort`` and a gather: numpy sorts integers with SIMD but not ``argsort`` of
    float32, and this is most of the time of clustering an expert bank.
    """
    n_groups, n = values.shape
    bits = values.view(np.uint32)
    # Order-preserving as unsigned integers: negatives have every bit flipped, positives the sign.
    flip = (bits.view(np.int32) >> 31).view(np.uint32) | np.uint32(0x80000000)
    halves = np.empty((n_groups, n, 2), np.uint32)  # little-endian uint64: [column, key]
    np.bitwise_xor(bits, flip, out=halves[..., 1])
    halves[..., 0] = np.arange(n, dtype=np.uint32)
    halves.view(np.uint64).sort(axis=1)
    keys, order = halves[..., 1], halves[..., 0]
    # Keys of positives have the top bit set: flip it back; flip every bit of the others.
    unflip = ~(keys.view(np.int32) >> 31).view(np.uint32) | np.uint32(0x80000000)
    return np.bitwise_xor(keys, unflip).view(np.float32), order.astype(np.intp)


def _prefix_sum(rows: np.ndarray) -> np.ndarray:
    out = np.zeros((rows.shape[0], rows.shape[1] + 1), dtype=np.float64)
    np.cumsum(rows, axis=1, dtype=np.float64, out=out[:, 1:])
    return out


def _gather(table: np.ndarray, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """``table[rows[:, None], columns]`` through a flat index (no per-row copies)."""
    return table.reshape(-1)[rows[:, None] * table.shape[1] + columns]


def _searchsorted_rows(
    table: np.ndarray, rows: np.ndarray, queries: np.ndarray, near: np.ndarray | None = None
) -> np.ndarray:
    """Row-wise ``np.searchsorted(table[r], queries[i], side="left")`` for ``r = rows[i]``.

    A branch-free binary search in which each step is one gather over all groups, so a
    whole Lloyd step for thousands of groups is a few dozen numpy calls. With ``near`` (a
    guess per query, e.g. last step's boundaries) it first searches only ``_NEAR_RADIUS``
    positions around the guess, then redoes the few queries whose answer lies outside.
    """
    width = table.shape[1]
    flat = table.reshape(-1)
    row_start = rows[:, None] * width
    if near is None:
        everywhere = np.zeros(queries.shape, np.int64), np.full(queries.shape, width, np.int64)
        return _bisect(flat, row_start, queries, *everywhere, width)
    low = np.clip(near - _NEAR_RADIUS, 0, width)
    high = np.clip(near + _NEAR_RADIUS, 0, width)
    found = _bisect(flat, row_start, queries, low, high, width, steps=2 * _NEAR_RADIUS)
    below = (found == low) & (low > 0)
    below[below] = flat[(row_start + low - 1)[below]] >= queries[below]
    above = (found == high) & (high < width)
    above[above] = flat[(row_start + np.minimum(high, width - 1))[above]] < queries[above]
    outside = below | above
    if outside.any():
        group = np.nonzero(outside)[0]
        everywhere = np.zeros(group.size, np.int64), np.full(group.size, width, np.int64)
        found[outside] = _bisect(flat, row_start[group, 0], queries[outside], *everywhere, width)
    return found


def _bisect(flat, row_start, queries, low, high, width, steps=None):
    """First index in ``[low, high)`` of each row whose value is >= the query (else high);
    ``steps`` bounds ``high - low``, ``width`` is the row length."""
    for _ in range(int(width if steps is None else steps).bit_length()):
        middle = (low + high) >> 1
        go_right = flat[row_start + np.minimum(middle, width - 1)] < queries
        go_right &= middle < high
        low = np.where(go_right, middle + 1, low)
        high = np.where(go_right, high, middle)
    return low


def _run_score(weight: np.ndarray, moment: np.ndarray) -> np.ndarray:
    """``W mean^2`` of runs, 0 for empty runs: a larger total means less squared error."""
    return np.divide(moment * moment, weight, out=np.zeros_like(moment), where=weight > 0)


# ---------------------------------------------------------------------------------------
# Production path.


def _near_optimal_boundaries(groups: _SortedGroups, k: int) -> np.ndarray:
    """The exact DP where it is cheap (few distinct values for the group length, e.g. one
    LUT for a whole tensor), the refined search otherwise."""
    distinct = int(groups.distinct_counts().max())
    if distinct * np.log2(distinct + 1) * (k - 1) <= _EXACT_WORK_PER_VALUE * groups.n:
        return _exact_boundaries(groups, k)
    return _refined_boundaries(groups, k)


def _refined_boundaries(groups: _SortedGroups, k: int) -> np.ndarray:
    """Boundaries ``[G, k + 1]`` (positions in sorted order) of a near-optimal clustering.

    Lloyd alone stalls in heavy-tailed groups with one cluster too many in one tail and one
    too few in the other (0.08 dB from the optimum on the synthetic bank): fixing that moves
    every boundary in between at once, which one wide search does. Rounds of wide search
    and Lloyd repeat for the groups that still change, then one local search (each
    boundary near where it is) and Lloyd settle the fine positions. No step can raise the
    error.
    """
    rows = np.arange(groups.sorted_values.shape[0])
    boundaries = _lloyd(groups, rows, _companding_start(groups, k), _START_LLOYD_STEPS)
    if k == 1:
        return boundaries
    active = rows
    for _ in range(_WIDE_ROUNDS):
        searched = _dp_over_candidates(groups, active, _wide_candidates(boundaries[active]))
        settled = _lloyd(groups, active, searched, _FINAL_LLOYD_STEPS)
        changed = (settled != boundaries[active]).any(axis=1)
        boundaries[active] = settled
        active = active[changed]
        if active.size == 0:
            break
    searched = _dp_over_candidates(groups, rows, _local_candidates(boundaries))
    return _lloyd(groups, rows, searched, _FINAL_LLOYD_STEPS)


def _companding_start(groups: _SortedGroups, k: int) -> np.ndarray:
    """Boundaries at equal steps of the integral of density^_COMPANDING_EXPONENT.

    High-resolution theory (Panter-Dite) spaces optimal boundaries at equal steps of
    density^(1/3); with few clusters and heavy tails a flatter spread starts closer. The
    density is read off ``_DENSITY_BINS`` equal-count bins of the sorted values.
    """
    rows = np.arange(groups.sorted_values.shape[0])
    n = groups.n
    ranks = np.linspace(0, n - 1, _DENSITY_BINS + 1).round().astype(np.int64)
    edges = groups.sorted_values[:, ranks].astype(np.float64)
    widths = np.diff(edges, axis=1)
    masses = np.diff(groups.weight_before(rows, ranks), axis=1)
    occupied = (widths > 0) & (masses > 0)
    spread = np.zeros_like(widths)
    spread[occupied] = widths[occupied] * (masses[occupied] / widths[occupied]) ** (
        _COMPANDING_EXPONENT
    )
    cumulative = _prefix_sum(spread)
    targets = cumulative[:, -1:] * np.linspace(0.0, 1.0, k + 1)[None, :]
    bin_index = np.clip(_searchsorted_rows(cumulative, rows, targets) - 1, 0, _DENSITY_BINS - 1)
    below = np.take_along_axis(cumulative, bin_index, axis=1)
    within = np.take_along_axis(spread, bin_index, axis=1)
    fraction = np.divide(targets - below, within, out=np.zeros_like(targets), where=within > 0)
    cut_values = np.take_along_axis(edges, bin_index, axis=1) + fraction * np.take_along_axis(
        widths, bin_index, axis=1
    )
    boundaries = _searchsorted_rows(groups.sorted_values, rows, cut_values.astype(np.float32))
    boundaries[:, 0] = 0
    boundaries[:, -1] = n
    return np.maximum.accumulate(boundaries, axis=1)


def _lloyd(
    groups: _SortedGroups, rows: np.ndarray, boundaries: np.ndarray, max_steps: int
) -> np.ndarray:
    """Lloyd steps on groups ``rows`` (``boundaries`` ``[len(rows), k + 1]``) until no
    boundary moves or ``max_steps``; groups drop out of the work as soon as they are still."""
    boundaries = boundaries.copy()
    active = np.arange(rows.size)
    for _ in range(max_steps):
        means = _reseeded_means(groups, rows[active], boundaries[active])
        midpoints = (means[:, :-1] + means[:, 1:]) / 2.0 + groups.shift[rows[active]]
        inner = _searchsorted_rows(
            groups.sorted_values, rows[active], midpoints.astype(np.float32),
            near=boundaries[active, 1:-1],
        )
        moved = (inner != boundaries[active, 1:-1]).any(axis=1)
        boundaries[active, 1:-1] = inner
        active = active[moved]
        if active.size == 0:
            break
    return boundaries


def _reseeded_means(groups: _SortedGroups, rows: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
    """Shifted cluster means, ascending; each empty cluster is re-seeded on a data point.

    The seeds are the cluster end points farthest from their own means, one per empty
    cluster, so the next assignment gives every re-seeded centroid a member.
    """
    weight = np.diff(groups.weight_before(rows, boundaries), axis=1)
    moment = np.diff(groups.moment_before(rows, boundaries), axis=1)
    filled = weight > 0
    means = np.divide(moment, weight, out=np.zeros_like(moment), where=filled)
    if filled.all():
        return means
    n = groups.n
    first = _gather(groups.sorted_values, rows, np.minimum(boundaries[:, :-1], n - 1))
    last = _gather(groups.sorted_values, rows, np.maximum(boundaries[:, 1:] - 1, 0))
    end_points = np.concatenate([first, last], axis=1) - groups.shift[rows]
    distance = np.where(
        np.tile(filled, 2), (end_points - np.tile(means, 2)) ** 2, -1.0
    )
    farthest_first = np.argsort(-distance, axis=1)
    empty_rank = np.maximum(np.cumsum(~filled, axis=1) - 1, 0)
    seeds = np.take_along_axis(end_points, np.take_along_axis(farthest_first, empty_rank, 1), 1)
    return np.sort(np.where(filled, means, seeds), axis=1)


def _wide_candidates(boundaries: np.ndarray) -> np.ndarray:
    """Per inner boundary (``[G, k - 1, R]``, ascending): evenly spaced ranks on both sides
    of its current position up to its neighbours (large moves in the bulk) and small fixed
    offsets from each neighbour (one- or two-point clusters in the tails), or every
    position when the neighbours are that close."""
    fractions = np.arange(_WIDE_STEPS) / _WIDE_STEPS
    left, current, right = _neighbourhood(boundaries)
    sampled = np.sort(
        np.concatenate(
            [
                left + np.round((current - left) * fractions).astype(np.int64),
                current + np.round((right - current) * fractions).astype(np.int64),
                right,
                np.minimum(left + _NEIGHBOUR_OFFSETS, right),
                np.maximum(right - _NEIGHBOUR_OFFSETS, left),
            ],
            axis=2,
        ),
        axis=2,
    )
    n_candidates = sampled.shape[2]
    every = np.minimum(left + np.arange(n_candidates), right)
    return np.where(right - left < n_candidates, every, sampled)


def _local_candidates(boundaries: np.ndarray) -> np.ndarray:
    """Per inner boundary: its position and +- each of ``_LOCAL_OFFSETS``, within its
    neighbours."""
    left, current, right = _neighbourhood(boundaries)
    return np.concatenate(
        [
            np.clip(current - _LOCAL_OFFSETS[::-1], left, right),
            current,
            np.clip(current + _LOCAL_OFFSETS, left, right),
        ],
        axis=2,
    )


def _neighbourhood(boundaries: np.ndarray):
    """Each inner boundary's left neighbour, itself and right neighbour, ``[G, k - 1, 1]``."""
    return boundaries[:, :-2, None], boundaries[:, 1:-1, None], boundaries[:, 2:, None]


def _dp_over_candidates(
    groups: _SortedGroups, rows: np.ndarray, candidates: np.ndarray
) -> np.ndarray:
    """Boundaries ``[len(rows), k + 1]`` maximizing the score when inner boundary ``j`` of
    group ``rows[i]`` takes one of ``candidates[i, j]`` (ascending), all chosen jointly.

    A DP over the boundaries in order: ``best[c]`` is the largest score of the clusters
    left of the current boundary at candidate ``c``. ``O(k R^2)`` per group for ``R``
    candidates. The current boundaries are among the candidates, so the score never drops.
    """
    n_groups, n_inner, n_candidates = candidates.shape
    flat = candidates.reshape(n_groups, -1)
    weight = groups.weight_before(rows, flat).reshape(candidates.shape)
    moment = groups.moment_before(rows, flat).reshape(candidates.shape)
    end = np.full((n_groups, 1), groups.n)

    best = _run_score(weight[:, 0], moment[:, 0])
    came_from = np.empty((n_groups, n_inner, n_candidates), dtype=np.int64)
    for inner in range(1, n_inner):
        # Axes: [group, this boundary's candidate, previous boundary's candidate].
        total = best[:, None, :] + _run_score(
            weight[:, inner, :, None] - weight[:, inner - 1, None, :],
            moment[:, inner, :, None] - moment[:, inner - 1, None, :],
        )
        in_order = candidates[:, inner, :, None] >= candidates[:, inner - 1, None, :]
        total = np.where(in_order, total, -np.inf)
        came_from[:, inner] = np.argmax(total, axis=2)
        best = np.take_along_axis(total, came_from[:, inner, :, None], axis=2)[:, :, 0]
    best += _run_score(
        groups.weight_before(rows, end) - weight[:, -1],
        groups.moment_before(rows, end) - moment[:, -1],
    )

    choice = np.argmax(best, axis=1)
    searched = np.empty((n_groups, n_inner + 2), dtype=np.int64)
    searched[:, 0] = 0
    searched[:, -1] = groups.n
    local = np.arange(n_groups)
    for inner in range(n_inner - 1, -1, -1):
        searched[:, inner + 1] = candidates[local, inner, choice]
        choice = came_from[local, inner, choice]
    return searched


# ---------------------------------------------------------------------------------------
# Exact path.


def _exact_boundaries(groups: _SortedGroups, k: int) -> np.ndarray:
    """Boundaries ``[G, k + 1]`` (positions in sorted order) of an optimal clustering.

    ``best[m][i]``, the largest score of the first ``i`` candidate runs in ``m`` clusters,
    is a row maximum over ``j <= i`` of ``best[m-1][j] + score(j, i)``. Empty clusters are
    allowed, so ``k`` beyond the number of distinct values is fine. The error matrix is
    Monge, so the leftmost best ``j`` is non-decreasing in ``i``, which lets each layer be
    solved by divide and conquer.
    """
    splits = groups.splits()
    n_groups, width = splits.shape
    rows = np.arange(n_groups)
    prefix = (
        groups.weight_before(rows, splits).ravel(),
        groups.moment_before(rows, splits).ravel(),
    )
    row_start = (np.arange(n_groups, dtype=np.int64) * width)[:, None]
    columns = np.arange(width)

    best = _flat_run_score(prefix, row_start, row_start + columns)
    choices = []
    for _ in range(k - 2):
        best, choice = _monotone_layer(best, prefix)
        choices.append(choice.astype(np.int32))

    boundaries = np.empty((n_groups, k + 1), dtype=np.int64)
    boundaries[:, 0] = 0
    boundaries[:, k] = width - 1
    if k >= 2:
        # The last layer needs only the full-length entry: one dense row maximum per group.
        last = best + _flat_run_score(prefix, row_start + columns, row_start + width - 1)
        boundaries[:, k - 1] = np.argmax(last, axis=1)
    for layer in range(k - 2, 0, -1):
        boundaries[:, layer] = np.take_along_axis(
            choices[layer - 1], boundaries[:, layer + 1 : layer + 2], axis=1
        )[:, 0]
    return np.take_along_axis(splits, boundaries, axis=1)


def _flat_run_score(prefix, start, stop):
    """Score of the runs ``[start, stop)``, given flat indices into the prefix sums."""
    weight, moment = prefix
    return _run_score(weight[stop] - weight[start], moment[stop] - moment[start])


def _monotone_layer(previous: np.ndarray, prefix) -> tuple[np.ndarray, np.ndarray]:
    """One DP layer: ``max_j previous[j] + score(j, i)`` and its leftmost argmax, for all i.

    Every group and every open subproblem of a recursion level is one segment of a flat
    candidate array; a segment's maximum is found by ``reduceat``, then the segment splits
    in two with the argmax bounding both halves' candidates. Per-segment values are spread
    with ``np.repeat`` and gathered with ``np.take`` (both much cheaper than fancy
    indexing), and the score is computed in place: this loop is the exact path's cost.
    """
    n_groups, width = previous.shape
    weight, moment = prefix
    flat_previous = previous.ravel()
    best = np.empty(n_groups * width, dtype=np.float64)
    choice = np.empty(n_groups * width, dtype=np.int64)

    row_start = np.arange(n_groups, dtype=np.int64) * width
    low = np.zeros(n_groups, dtype=np.int64)  # range of i in this segment (inclusive)
    high = np.full(n_groups, width - 1, dtype=np.int64)
    first_candidate = np.zeros(n_groups, dtype=np.int64)
    last_candidate = np.full(n_groups, width - 1, dtype=np.int64)
    while row_start.size:
        middle = (low + high) >> 1
        end = row_start + middle
        counts = np.minimum(last_candidate, middle) - first_candidate + 1
        offsets = np.cumsum(counts) - counts
        candidate = np.arange(offsets[-1] + counts[-1], dtype=np.int64)
        candidate += np.repeat(row_start + first_candidate - offsets, counts)

        run_weight = np.repeat(np.take(weight, end), counts)
        run_weight -= np.take(weight, candidate)
        total = np.repeat(np.take(moment, end), counts)
        total -= np.take(moment, candidate)
        total *= total
        np.divide(total, run_weight, out=total, where=run_weight > 0)
        total[run_weight <= 0] = 0.0
        total += np.take(flat_previous, candidate)

        maximum = np.maximum.reduceat(total, offsets)
        hits = np.flatnonzero(total == np.repeat(maximum, counts))
        argmax = candidate[hits[np.searchsorted(hits, offsets)]] - row_start
        best[end] = maximum
        choice[end] = argmax

        left = low < middle
        right = middle < high
        row_start = np.concatenate([row_start[left], row_start[right]])
        low, high = (
            np.concatenate([low[left], middle[right] + 1]),
            np.concatenate([middle[left] - 1, high[right]]),
        )
        first_candidate, last_candidate = (
            np.concatenate([first_candidate[left], argmax[right]]),
            np.concatenate([argmax[left], last_candidate[right]]),
        )
    return best.reshape(n_groups, width), choice.reshape(n_groups, width)
