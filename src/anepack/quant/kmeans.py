"""Weighted 1-D k-means over many independent groups at once: the clustering behind every LUT.

A palettized weight stores, per group, ``k`` scalar centroids and one index per element, so
the best LUT is the exact solution of weighted 1-D k-means on that group's values. Two
entry points share the same arrays and conventions:

- ``kmeans_1d_exact``: the optimum, by dynamic programming over sorted values (Wu 1991;
  Gronlund et al. 2017). Each of the ``k`` layers is a row-minimum search in a totally
  monotone matrix, solved by divide and conquer, vectorized over every group and every
  subproblem of one recursion level at once.
- ``kmeans_1d``: the production path. Lloyd's algorithm where each step costs
  ``O(k log n)`` per group (binary search of the centroid midpoints in the sorted values,
  cluster sums read from prefix sums), started from several initializations, best kept.

Both sort each group once. Only positions where the sorted value changes can be cluster
boundaries (equal values always share the nearest centroid), which is how coremltools'
"cluster the unique fp16 values with counts as weights" happens here without ragged arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Groups are processed in chunks of about this many elements: big enough that numpy's
# per-call overhead is amortized over thousands of groups, small enough that the float64
# prefix sums and the exact search's temporaries stay in the low hundreds of megabytes.
_CHUNK_ELEMENTS = 1 << 23
_EXACT_CHUNK_ELEMENTS = 1 << 20
_LABEL_BLOCK_ELEMENTS = 1 << 18

# Lloyd iterations are cheap (O(k log n) per group), so every start runs to convergence;
# this cap only bounds pathological slow creeps, which then keep their best-so-far result.
_MAX_LLOYD_STEPS = 300

# Start and search parameters of the production path, chosen by measurement against the
# exact optimum on synthetic heavy-tailed banks (docs/quantization.md, Clustering).
_DENSITY_BINS = 256
_COMPANDING_EXPONENT = 0.4
_WINDOW_STEPS = 16


def kmeans_1d(
    values: np.ndarray, k: int, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Near-optimal weighted k-means of each row of ``values`` (``[G, n]``) into ``k`` clusters.

    ``weights`` (>= 0, broadcastable to ``[G, n]``; None means all ones) weighs each
    element's squared error; a group whose weights are all zero is clustered unweighted.
    Returns ``centroids`` float32 ``[G, k]`` ascending and ``labels`` uint8 ``[G, n]``,
    the index of each element's nearest centroid. Clusters that cannot be filled (fewer
    distinct values than ``k``) repeat a neighbouring value, so every LUT entry is finite.
    """
    return _cluster_groups(values, k, weights, _refined_boundaries, _CHUNK_ELEMENTS)


def kmeans_1d_exact(
    values: np.ndarray, k: int, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exactly optimal weighted k-means of each row; same arguments and results as ``kmeans_1d``."""
    return _cluster_groups(values, k, weights, _exact_boundaries, _EXACT_CHUNK_ELEMENTS)


def _cluster_groups(values, k, weights, find_boundaries, chunk_elements):
    values, weights = _validated(values, k, weights)
    n_groups, n = values.shape
    centroids = np.empty((n_groups, k), dtype=np.float32)
    labels = np.empty((n_groups, n), dtype=np.uint8)
    step = max(1, chunk_elements // n)
    for start in range(0, n_groups, step):
        rows = slice(start, start + step)
        groups = _SortedGroups.build(values[rows], None if weights is None else weights[rows])
        boundaries = find_boundaries(groups, k)
        centroids[rows] = groups.centroids(boundaries)
        labels[rows] = _nearest_labels(values[rows], centroids[rows])
    return centroids, labels


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
    unweighted_groups = ~(weights > 0).any(axis=1)
    if unweighted_groups.any():
        weights = weights.copy()
        weights[unweighted_groups] = 1.0
    return values, weights


@dataclass(frozen=True)
class _SortedGroups:
    """Groups sorted ascending, with prefix sums that give any run's weight, mean and error.

    Prefix arrays have ``n + 1`` columns: entry ``i`` sums the first ``i`` sorted elements.
    Values are shifted by each group's median before summing so that differences of large
    prefix sums keep float64 precision. A run's squared error is its second moment minus
    ``W mean^2``; second moments telescope to a per-group constant over any partition, so
    comparing partitions needs only ``sum W mean^2`` and no second-moment sums are kept.
    """

    sorted_values: np.ndarray  # float32 [G, n]
    shift: np.ndarray  # float64 [G, 1]
    weight_sum: np.ndarray | None  # float64 [G, n + 1]; None when every weight is 1
    first_moment: np.ndarray  # float64 [G, n + 1]

    @classmethod
    def build(cls, values: np.ndarray, weights: np.ndarray | None) -> _SortedGroups:
        n = values.shape[1]
        if weights is None:
            sorted_values = np.sort(values, axis=1)
            sorted_weights = 1.0
            weight_sum = None
        else:
            order = np.argsort(values, axis=1)
            sorted_values = np.take_along_axis(values, order, axis=1)
            sorted_weights = np.take_along_axis(weights, order, axis=1)
            weight_sum = _prefix_sum(sorted_weights)
        shift = sorted_values[:, n // 2 : n // 2 + 1].astype(np.float64)
        return cls(
            sorted_values=sorted_values,
            shift=shift,
            weight_sum=weight_sum,
            first_moment=_prefix_sum((sorted_values - shift) * sorted_weights),
        )

    @property
    def n(self) -> int:
        return self.sorted_values.shape[1]

    def weight_before(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Total weight of the first ``positions`` sorted elements of each row in ``rows``."""
        if self.weight_sum is None:
            return positions.astype(np.float64)
        return _gather(self.weight_sum, rows, positions)

    def moment_before(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return _gather(self.first_moment, rows, positions)

    def splits(self) -> np.ndarray:
        """Candidate boundaries per group: 0, each index where the value changes, n (padded).

        Equal values always share their nearest centroid, so restricting boundaries to
        these positions loses nothing; it is coremltools' "unique values with counts as
        weights" without ragged arrays. Rows are padded with ``n`` (zero-weight runs).
        """
        n_groups, n = self.sorted_values.shape
        changes = np.zeros((n_groups, n + 1), dtype=bool)
        changes[:, 0] = changes[:, n] = True
        changes[:, 1:n] = self.sorted_values[:, 1:] != self.sorted_values[:, :-1]
        counts = changes.sum(axis=1)
        width = int(counts.max())
        # A stable argsort of "not a split" lists the split positions first, in order.
        positions = np.argsort(~changes, axis=1, kind="stable")[:, :width]
        positions[np.arange(width) >= counts[:, None]] = n
        return positions

    def centroids(self, boundaries: np.ndarray) -> np.ndarray:
        """Cluster means as float32 ``[G, k]``; an empty cluster takes the value at its boundary."""
        rows = np.arange(boundaries.shape[0])
        weight = np.diff(self.weight_before(rows, boundaries), axis=1)
        moment = np.diff(self.moment_before(rows, boundaries), axis=1)
        at_boundary = np.take_along_axis(
            self.sorted_values, np.minimum(boundaries[:, :-1], self.n - 1), axis=1
        ).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = self.shift + moment / weight
        centroids = np.where(weight > 0, means, at_boundary).astype(np.float32)
        # Rounding to float32 can break ties between adjacent clusters' order by one ulp.
        return np.maximum.accumulate(centroids, axis=1)


def _prefix_sum(rows: np.ndarray) -> np.ndarray:
    out = np.zeros((rows.shape[0], rows.shape[1] + 1), dtype=np.float64)
    np.cumsum(rows, axis=1, dtype=np.float64, out=out[:, 1:])
    return out


def _gather(table: np.ndarray, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """``table[rows[:, None], columns]`` through a flat index (no per-row copies)."""
    return table.reshape(-1)[rows[:, None] * table.shape[1] + columns]


def _nearest_labels(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (the lower one on a tie) for every element, per group.

    The label is the count of midpoints strictly below the value. Each float64 midpoint is
    rounded down to float32, which keeps that comparison exact for float32 values, and the
    groups go in small blocks so the k - 1 comparison passes read from cache.
    """
    midpoints = (centroids[:, :-1].astype(np.float64) + centroids[:, 1:]) / 2.0
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


def _searchsorted_rows(table: np.ndarray, rows: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Row-wise ``np.searchsorted(table[r], queries[i], side="left")`` for ``r = rows[i]``.

    A branch-free binary search in which each step is one gather over all groups, so a
    whole Lloyd step for thousands of groups is a few dozen numpy calls.
    """
    width = table.shape[1]
    flat = table.reshape(-1)
    row_start = rows[:, None] * width
    low = np.zeros(queries.shape, dtype=np.int64)
    high = np.full(queries.shape, width, dtype=np.int64)
    for _ in range(int(width).bit_length()):
        middle = (low + high) >> 1
        go_right = flat[row_start + np.minimum(middle, width - 1)] < queries
        go_right &= middle < high
        low = np.where(go_right, middle + 1, low)
        high = np.where(go_right, high, middle)
    return low


# ---------------------------------------------------------------------------------------
# Production path: companding start, Lloyd, then a joint boundary search by windowed DP.


def _refined_boundaries(groups: _SortedGroups, k: int) -> np.ndarray:
    """Boundaries ``[G, k + 1]`` of a near-optimal clustering of every group.

    Lloyd alone stalls in heavy-tailed groups with one cluster too many in one tail and one
    too few in the other: fixing that shifts every cluster in between at once. The windowed
    DP considers exactly such joint moves (each boundary may slide anywhere between its
    neighbours), and a final Lloyd pass settles the result on a fixed point.
    """
    boundaries = _lloyd(groups, _companding_start(groups, k))
    if k >= 2:
        boundaries = _lloyd(groups, _windowed_search(groups, boundaries))
    return boundaries


def _companding_start(groups: _SortedGroups, k: int) -> np.ndarray:
    """Boundaries at equal steps of the integral of density^_COMPANDING_EXPONENT.

    High-resolution theory (Panter-Dite) puts optimal boundaries at equal steps of
    density^(1/3); heavy-tailed weight groups are better served by a slightly flatter
    spread, measured on synthetic banks (see docs/quantization.md, Clustering). The
    density is read off ``_DENSITY_BINS`` equal-count bins of the sorted values.
    """
    rows = np.arange(groups.sorted_values.shape[0])
    n = groups.n
    ranks = np.linspace(0, n - 1, _DENSITY_BINS + 1).round().astype(np.int64)
    edges = groups.sorted_values[:, ranks].astype(np.float64)
    widths = np.diff(edges, axis=1)
    masses = np.diff(groups.weight_before(rows, np.broadcast_to(ranks, edges.shape)), axis=1)
    spread = np.zeros_like(widths)
    occupied = (widths > 0) & (masses > 0)
    spread[occupied] = (
        widths[occupied] ** (1.0 - _COMPANDING_EXPONENT) * masses[occupied] ** _COMPANDING_EXPONENT
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


def _lloyd(groups: _SortedGroups, boundaries: np.ndarray) -> np.ndarray:
    """Alternate means and nearest-centroid boundaries until no group's boundaries move."""
    boundaries = boundaries.copy()
    active = np.arange(boundaries.shape[0])
    for _ in range(_MAX_LLOYD_STEPS):
        means = _reseeded_means(groups, active, boundaries[active])
        midpoints = (means[:, :-1] + means[:, 1:]) / 2.0 + groups.shift[active]
        inner = _searchsorted_rows(groups.sorted_values, active, midpoints.astype(np.float32))
        moved = (inner != boundaries[active, 1:-1]).any(axis=1)
        boundaries[active, 1:-1] = inner
        active = active[moved]
        if active.size == 0:
            break
    return boundaries


def _reseeded_means(groups: _SortedGroups, rows: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
    """Shifted cluster means, ascending; each empty cluster is re-seeded on a data point.

    The seeds are the cluster end points farthest (weighted) from their own means, one per
    empty cluster, so the next assignment gives every re-seeded centroid a member.
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
    twice_means = np.concatenate([means, means], axis=1)
    twice_filled = np.concatenate([filled, filled], axis=1)
    distance = np.where(twice_filled, (end_points - twice_means) ** 2, -1.0)
    farthest_first = np.argsort(-distance, axis=1)
    empty_rank = np.maximum(np.cumsum(~filled, axis=1) - 1, 0)
    seeds = np.take_along_axis(end_points, np.take_along_axis(farthest_first, empty_rank, axis=1), 1)
    return np.sort(np.where(filled, means, seeds), axis=1)


def _windowed_search(groups: _SortedGroups, boundaries: np.ndarray) -> np.ndarray:
    """Best boundaries when each inner boundary may move to any of ``2 * _WINDOW_STEPS + 1``
    positions spread (in rank) between its two neighbours, all chosen jointly by DP.

    ``score`` (sum over clusters of W mean^2, shifted) is the error's only varying part, so
    maximizing it needs no second moments. Cost: ``O(k R^2)`` per group for ``R`` positions.
    """
    n_groups, width = boundaries.shape
    rows = np.arange(n_groups)
    fractions = np.arange(_WINDOW_STEPS) / _WINDOW_STEPS
    below, current, above = boundaries[:, :-2, None], boundaries[:, 1:-1, None], boundaries[:, 2:, None]
    candidates = np.concatenate(
        [
            below + np.round((current - below) * fractions).astype(np.int64),
            current + np.round((above - current) * fractions).astype(np.int64),
            above,
        ],
        axis=2,
    )
    n_inner, n_candidates = candidates.shape[1:]
    flat = candidates.reshape(n_groups, -1)
    weight = groups.weight_before(rows, flat).reshape(candidates.shape)
    moment = groups.moment_before(rows, flat).reshape(candidates.shape)
    end = np.full((n_groups, 1), groups.n)
    total_weight = groups.weight_before(rows, end)
    total_moment = groups.moment_before(rows, end)

    best = _run_score(weight[:, 0], moment[:, 0])
    came_from = np.empty((n_groups, n_inner, n_candidates), dtype=np.int64)
    for inner in range(1, n_inner):
        # [group, this boundary's candidate, previous boundary's candidate]
        run_weight = weight[:, inner, :, None] - weight[:, inner - 1, None, :]
        run_moment = moment[:, inner, :, None] - moment[:, inner - 1, None, :]
        total = best[:, None, :] + _run_score(run_weight, run_moment)
        ordered = candidates[:, inner, :, None] >= candidates[:, inner - 1, None, :]
        total = np.where(ordered, total, -np.inf)
        came_from[:, inner] = np.argmax(total, axis=2)
        best = np.take_along_axis(total, came_from[:, inner, :, None], axis=2)[:, :, 0]
    best += _run_score(total_weight - weight[:, -1], total_moment - moment[:, -1])

    choice = np.argmax(best, axis=1)
    refined = boundaries.copy()
    for inner in range(n_inner - 1, -1, -1):
        refined[:, inner + 1] = candidates[rows, inner, choice]
        choice = came_from[rows, inner, choice]
    return refined


def _run_score(weight: np.ndarray, moment: np.ndarray) -> np.ndarray:
    """W * mean^2 of runs (0 for empty runs): larger means less squared error."""
    return np.divide(moment * moment, weight, out=np.zeros_like(moment), where=weight > 0)


# ---------------------------------------------------------------------------------------
# Exact path: dynamic programming with divide-and-conquer row minima.


def _exact_boundaries(groups: _SortedGroups, k: int) -> np.ndarray:
    """Boundaries ``[G, k + 1]`` of an optimal clustering of every group.

    ``best[m][i]``, the largest ``sum W mean^2`` (least error) of the first ``i`` candidate
    runs in ``m`` clusters, is a row maximum over ``j <= i`` of ``best[m-1][j] +
    score(j, i)``; empty clusters are allowed, so ``k`` beyond the number of distinct values
    is fine. The error matrix is Monge, so the leftmost best ``j`` is non-decreasing in
    ``i``, which lets each layer be solved by divide and conquer in ``O(n log n)``.
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

    best = _flat_run_score(prefix, row_start, row_start + columns).reshape(n_groups, width)
    choices = []
    for _ in range(k - 2):
        best, choice = _monotone_layer(best, prefix)
        choices.append(choice)

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
    """``W mean^2`` (shifted) of the runs ``[start, stop)``, given flat prefix-sum indices."""
    weight, moment = prefix
    return _run_score(weight[stop] - weight[start], moment[stop] - moment[start])


def _monotone_layer(previous: np.ndarray, prefix) -> tuple[np.ndarray, np.ndarray]:
    """One DP layer: ``max_j previous[j] + score(j, i)`` and its leftmost argmax, for all i.

    Every group and every open subproblem of a recursion level is one segment of a flat
    candidate array; a segment's row maximum is found by ``reduceat``, then the segment
    splits in two with the argmax bounding both halves' candidates. The three per-candidate
    inputs sit side by side in one table so that each level gathers once.
    """
    n_groups, width = previous.shape
    table = np.stack([previous.ravel(), *prefix], axis=1)
    best = np.empty(n_groups * width, dtype=np.float64)
    choice = np.empty(n_groups * width, dtype=np.int64)

    row_start = np.arange(n_groups, dtype=np.int64) * width
    low = np.zeros(n_groups, dtype=np.int64)  # range of i in this segment (inclusive)
    high = np.full(n_groups, width - 1, dtype=np.int64)
    first_candidate = np.zeros(n_groups, dtype=np.int64)
    last_candidate = np.full(n_groups, width - 1, dtype=np.int64)
    while row_start.size:
        middle = (low + high) >> 1
        counts = np.minimum(last_candidate, middle) - first_candidate + 1
        offsets = np.cumsum(counts) - counts
        segment = np.repeat(np.arange(counts.size), counts)
        candidate = np.arange(offsets[-1] + counts[-1], dtype=np.int64)
        candidate += (row_start + first_candidate - offsets)[segment]
        # np.take along axis 0 copies whole rows; plain fancy indexing of a 2-D table is
        # several times slower.
        start_rows = np.take(table, candidate, axis=0)
        end_rows = np.take(np.take(table, row_start + middle, axis=0), segment, axis=0)
        total = start_rows[:, 0] + _run_score(
            end_rows[:, 1] - start_rows[:, 1], end_rows[:, 2] - start_rows[:, 2]
        )

        maximum = np.maximum.reduceat(total, offsets)
        hits = np.flatnonzero(total == maximum[segment])
        argmax = candidate[hits[np.searchsorted(hits, offsets)]] - row_start
        best[row_start + middle] = maximum
        choice[row_start + middle] = argmax

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
