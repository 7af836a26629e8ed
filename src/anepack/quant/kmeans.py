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
    prefix sums keep float64 precision.
    """

    sorted_values: np.ndarray  # float32 [G, n]
    shift: np.ndarray  # float64 [G, 1]
    weight_sum: np.ndarray | None  # float64 [G, n + 1]; None when every weight is 1
    first_moment: np.ndarray  # float64 [G, n + 1]
    second_moment: np.ndarray  # float64 [G, n + 1]

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
        centred = sorted_values - shift
        weighted = centred * sorted_weights
        return cls(
            sorted_values=sorted_values,
            shift=shift,
            weight_sum=weight_sum,
            first_moment=_prefix_sum(weighted),
            second_moment=_prefix_sum(weighted * centred),
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
    """Index of the nearest centroid (the lower one on a tie) for every element, per group."""
    midpoints = (centroids[:, :-1].astype(np.float64) + centroids[:, 1:]) / 2.0
    labels = np.empty(values.shape, dtype=np.uint8)
    for group, (row, row_midpoints) in enumerate(zip(values, midpoints)):
        labels[group] = np.searchsorted(row_midpoints, row, side="left")
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
    if k > 2:
        boundaries = _lloyd(groups, _windowed_search(groups, boundaries))
    return boundaries


def _companding_start(groups: _SortedGroups, k: int) -> np.ndarray:
    """Boundaries at equal steps of the integral of density^(1 - _COMPANDING_EXPONENT).

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
    first = np.take_along_axis(groups.sorted_values, np.minimum(boundaries[:, :-1], n - 1), axis=1)
    last = np.take_along_axis(groups.sorted_values, np.maximum(boundaries[:, 1:] - 1, 0), axis=1)
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

    ``cost[m][i]`` is the least error of the first ``split i`` elements in ``m`` clusters
    (empty clusters allowed, so ``k`` beyond the number of distinct values is fine); the
    best previous split is non-decreasing in ``i`` because the cluster error matrix is
    Monge, which is what lets each layer be solved by divide and conquer.
    """
    splits = groups.splits()
    rows = np.arange(splits.shape[0])
    weight = groups.weight_before(rows, splits)
    first = groups.moment_before(rows, splits)
    second = np.take_along_axis(groups.second_moment, splits, axis=1)
    n_groups, width = splits.shape
    prefix = (weight.ravel(), first.ravel(), second.ravel())
    row_start = (np.arange(n_groups, dtype=np.int64) * width)[:, None]

    cost = _run_error(prefix, row_start + 0, row_start + np.arange(width)).reshape(n_groups, width)
    choices = []
    for _ in range(k - 2):
        cost, choice = _monotone_layer(cost, prefix)
        choices.append(choice)

    boundaries = np.empty((n_groups, k + 1), dtype=np.int64)
    boundaries[:, 0] = 0
    boundaries[:, k] = width - 1
    if k >= 2:
        # The last layer needs only the full-length entry: one dense row minimum per group.
        candidates = row_start + np.arange(width)
        last = cost + _run_error(prefix, candidates, row_start + (width - 1)).reshape(cost.shape)
        boundaries[:, k - 1] = np.argmin(last, axis=1)
    for layer in range(k - 2, 0, -1):
        boundaries[:, layer] = np.take_along_axis(
            choices[layer - 1], boundaries[:, layer + 1 : layer + 2], axis=1
        )[:, 0]
    return np.take_along_axis(splits, boundaries, axis=1)


def _run_error(prefix, start, stop):
    """Weighted squared error of the runs ``[start, stop)`` given flat prefix-sum indices."""
    weight, first, second = prefix
    run_weight = weight[stop] - weight[start]
    run_first = first[stop] - first[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        spread = run_first * run_first / run_weight
    error = (second[stop] - second[start]) - np.where(run_weight > 0, spread, 0.0)
    # Cancellation can leave a tiny negative error for a run of equal values.
    return np.maximum(error, 0.0)


def _monotone_layer(previous: np.ndarray, prefix) -> tuple[np.ndarray, np.ndarray]:
    """One DP layer: ``min_j previous[j] + error(j, i)`` and its leftmost argmin, for all i.

    Every group and every open subproblem of a recursion level is one segment of a flat
    candidate array; a segment's row minimum is found by ``reduceat``, then the segment
    splits in two with the argmin bounding both halves' candidates.
    """
    n_groups, width = previous.shape
    flat_previous = previous.ravel()
    best = np.empty(n_groups * width, dtype=np.float64)
    choice = np.empty(n_groups * width, dtype=np.int32 if width < 2**31 else np.int64)

    row_start = np.arange(n_groups, dtype=np.int64) * width
    low = np.zeros(n_groups, dtype=np.int64)  # range of i in this segment (inclusive)
    high = np.full(n_groups, width - 1, dtype=np.int64)
    first_candidate = np.zeros(n_groups, dtype=np.int64)
    last_candidate = np.full(n_groups, width - 1, dtype=np.int64)
    while row_start.size:
        middle = (low + high) >> 1
        top = np.minimum(last_candidate, middle)
        counts = top - first_candidate + 1
        offsets = np.cumsum(counts) - counts
        segment = np.repeat(np.arange(counts.size), counts)
        candidate = np.arange(int(counts.sum()), dtype=np.int64)
        candidate += (row_start + first_candidate - offsets)[segment]
        end = (row_start + middle)[segment]
        total = flat_previous[candidate] + _run_error(prefix, candidate, end)

        minimum = np.minimum.reduceat(total, offsets)
        is_min = total == minimum[segment]
        argmin = np.minimum.reduceat(np.where(is_min, candidate, np.iinfo(np.int64).max), offsets)
        best[row_start + middle] = minimum
        argmin -= row_start
        choice[row_start + middle] = argmin

        left = low < middle
        right = middle < high
        row_start = np.concatenate([row_start[left], row_start[right]])
        low, high = (
            np.concatenate([low[left], middle[right] + 1]),
            np.concatenate([middle[left] - 1, high[right]]),
        )
        first_candidate, last_candidate = (
            np.concatenate([first_candidate[left], argmin[right]]),
            np.concatenate([argmin[left], last_candidate[right]]),
        )
    return best.reshape(n_groups, width), choice.reshape(n_groups, width)
