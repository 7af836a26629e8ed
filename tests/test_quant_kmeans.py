"""1-D k-means: the exact DP against a brute-force DP, the fast path against the exact optimum."""

from __future__ import annotations

import numpy as np
import pytest

from anepack.errors import AnepackError
from anepack.quant.kmeans import _sorted_with_order, kmeans_1d, kmeans_1d_exact, kmeans_1d_float16, nearest_labels

# kmeans_1d's stated tolerance on heavy-tailed groups of realistic size: the total squared
# error of all groups within 0.5% of the optimum (0.022 dB of SQNR), every group within 5%.
FAST_TOTAL_EXCESS = 0.005
FAST_GROUP_EXCESS = 0.05


def brute_force_optimum(values: np.ndarray, k: int, weights: np.ndarray | None = None) -> float:
    """Least weighted squared error of ``values`` in ``k`` clusters: the textbook O(k n^2) DP
    over sorted values, every cluster's error summed directly in float64 (no prefix sums)."""
    order = np.argsort(values, kind="stable")
    x = values[order].astype(np.float64)
    w = np.ones_like(x) if weights is None else np.asarray(weights, np.float64)[order]
    n = len(x)

    def run_error(start: int, stop: int) -> float:
        total = w[start:stop].sum()
        if total == 0:
            return 0.0
        mean = (w[start:stop] * x[start:stop]).sum() / total
        return float((w[start:stop] * (x[start:stop] - mean) ** 2).sum())

    error = np.full((n + 1, n + 1), np.inf)
    for start in range(n + 1):
        for stop in range(start, n + 1):
            error[start, stop] = run_error(start, stop)
    best = error[0].copy()  # one cluster over the first `stop` values
    for _ in range(k - 1):
        best = np.min(best[:, None] + error, axis=0)
    return float(best[n])


def clustering_error(values, centroids, labels, weights=None) -> np.ndarray:
    """Per-group weighted squared error of a result, in float64."""
    chosen = np.take_along_axis(centroids, labels.astype(np.int64), axis=1).astype(np.float64)
    squared = (values.astype(np.float64) - chosen) ** 2
    if weights is not None:
        squared = squared * np.broadcast_to(weights, values.shape)
    return squared.sum(axis=1)


def assert_valid(values, centroids, labels, k):
    assert centroids.dtype == np.float32 and centroids.shape == (values.shape[0], k)
    assert labels.dtype == np.uint8 and labels.shape == values.shape
    assert np.isfinite(centroids).all()
    assert (np.diff(centroids, axis=1) >= 0).all()
    distance = np.abs(values[:, :, None].astype(np.float64) - centroids[:, None, :])
    chosen = np.take_along_axis(distance, labels[:, :, None].astype(np.int64), axis=2)[:, :, 0]
    np.testing.assert_array_less(chosen, distance.min(axis=2) * (1 + 1e-6) + 1e-12)


def small_case(seed: int):
    """A few short groups of one of three kinds, k between 1 and 8, maybe weighted."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 30))
    k = int(rng.integers(1, 9))
    kind = seed % 3
    if kind == 0:
        values = rng.standard_t(2.0, size=(3, n))  # heavy tails
    elif kind == 1:
        values = rng.integers(0, 5, size=(3, n))  # many ties, often fewer values than k
    else:
        values = rng.standard_normal((3, n))
    weights = None
    if seed % 2:
        weights = rng.random((3, n))
        if seed % 4 == 1:
            weights[:, : n // 2] = 0.0
    return values.astype(np.float32), k, weights


@pytest.mark.parametrize("seed", range(40))
def test_exact_equals_brute_force_dp(seed):
    values, k, weights = small_case(seed)
    centroids, labels = kmeans_1d_exact(values, k, weights)
    assert_valid(values, centroids, labels, k)
    achieved = clustering_error(values, centroids, labels, weights)
    for group in range(values.shape[0]):
        group_weights = None if weights is None else weights[group]
        optimum = brute_force_optimum(values[group], k, group_weights)
        # Only the float32 rounding of the centroids separates the two.
        assert achieved[group] == pytest.approx(optimum, rel=1e-6, abs=1e-9)


def heavy_tailed_groups(seed: int, n_groups: int, n: int) -> np.ndarray:
    """Student-t(3) groups with per-group scales and rare 30x outliers, rounded to fp16."""
    rng = np.random.default_rng(seed)
    values = rng.standard_t(3.0, size=(n_groups, n)) * 0.02
    values *= np.exp(0.3 * rng.standard_normal((n_groups, 1)))
    values[rng.random((n_groups, n)) < 2e-4] *= 30.0
    return values.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize(
    "seed, n_groups, n, k, weighted",
    [
        (seed, n_groups, n, k, weighted)
        for seed in range(3)
        for n_groups, n, k, weighted in [
            (8, 2048, 16, False),
            (8, 2048, 16, True),
            (8, 2048, 4, False),
            (4, 4096, 64, False),
        ]
    ],
)
def test_fast_is_within_tolerance_of_exact(seed, n_groups, n, k, weighted):
    values = heavy_tailed_groups(seed, n_groups, n)
    weights = None
    if weighted:
        weights = np.exp(np.random.default_rng(seed + 100).standard_normal((1, n)))
    exact = clustering_error(values, *kmeans_1d_exact(values, k, weights), weights)
    centroids, labels = kmeans_1d(values, k, weights)
    assert_valid(values, centroids, labels, k)
    fast = clustering_error(values, centroids, labels, weights)
    assert fast.sum() <= exact.sum() * (1 + FAST_TOTAL_EXCESS)
    assert (fast <= exact * (1 + FAST_GROUP_EXCESS)).all()
    # The exact path is a lower bound (up to float32 centroids).
    assert (fast >= exact * (1 - 1e-6)).all()


def test_fast_is_exact_on_long_groups_with_few_distinct_values():
    """One LUT for a whole (already quantized) tensor: the exact DP is cheap and is used."""
    rng = np.random.default_rng(11)
    levels = np.sort(rng.standard_t(3.0, size=600)).astype(np.float32)
    values = levels[rng.integers(0, levels.size, size=(1, 60000))]
    optimum = clustering_error(values, *kmeans_1d_exact(values, 16))
    centroids, labels = kmeans_1d(values, 16)
    np.testing.assert_allclose(clustering_error(values, centroids, labels), optimum, rtol=1e-9)


def test_exact_agrees_with_coremltools_kmeans1d_on_a_large_group():
    """coremltools' bundled kmeans1d (an independent exact O(kn) C++ solver) on the unique
    fp16 values with counts as weights, exactly as palettize_weights calls it."""
    kmeans1d = pytest.importorskip("coremltools._deps.kmeans1d")
    values = heavy_tailed_groups(7, 2, 11264)
    centroids, labels = kmeans_1d_exact(values, 16)
    ours = clustering_error(values, centroids, labels)
    for group, row in enumerate(values):
        unique, counts = np.unique(row, return_counts=True)
        result = kmeans1d.cluster(unique.astype(np.float64), 16, weights=counts.astype(np.float64))
        theirs = np.asarray(result.centroids)[np.asarray(result.clusters)]
        reference = float((counts * (unique.astype(np.float64) - theirs) ** 2).sum())
        assert ours[group] == pytest.approx(reference, rel=1e-6)


def test_one_lut_over_a_huge_tensor_is_coremltools_clustering_of_its_float16_values():
    """A per-tensor LUT over more than LARGE_GROUP_ELEMENTS values goes through the float16
    histogram (kmeans_1d_float16): its squared error equals coremltools' kmeans1d on the unique
    fp16 values with counts as weights, as palettize_weights calls it; importance-weighted, it
    equals the exact DP over every element."""
    from anepack.quant.lut import LARGE_GROUP_ELEMENTS, quantize_lut
    from anepack.quant.formats import parse_format

    kmeans1d = pytest.importorskip("coremltools._deps.kmeans1d")
    rng = np.random.default_rng(3)
    rows, cols = 4096, LARGE_GROUP_ELEMENTS // 4096 + 64
    weight = (rng.standard_t(5, size=(rows, cols)) * 0.03).astype(np.float16).astype(np.float32)
    palettized = quantize_lut(weight, parse_format("lut4-tensor"))
    error = float(np.sum((weight.astype(np.float64) - palettized.dequantize().astype(np.float64)) ** 2))
    unique, counts = np.unique(weight, return_counts=True)
    result = kmeans1d.cluster(unique.astype(np.float64), 16, weights=counts.astype(np.float64))
    theirs = np.asarray(result.centroids)[np.asarray(result.clusters)].astype(np.float16).astype(np.float64)
    reference = float((counts * (unique.astype(np.float64) - theirs) ** 2).sum())
    assert error == pytest.approx(reference, rel=1e-6)

    small = weight[:96, :80]
    row_weights, column_weights = rng.gamma(1.0, size=96), rng.gamma(0.5, size=80)
    exact, _ = kmeans_1d_exact(small.reshape(1, -1), 16, (row_weights[:, None] * column_weights).reshape(1, -1))
    np.testing.assert_allclose(kmeans_1d_float16(small, 16, row_weights, column_weights), exact[0], rtol=1e-6)
    with pytest.raises(ValueError, match="float16's range"):
        kmeans_1d_float16(np.array([[1.0, 7e4]]), 2)


@pytest.mark.parametrize("solver", [kmeans_1d, kmeans_1d_exact])
def test_integer_weights_equal_repeated_values(solver):
    rng = np.random.default_rng(3)
    values = (rng.standard_t(3.0, size=(4, 300)) * 0.02).astype(np.float32)
    counts = rng.integers(0, 4, size=(1, 300))  # shared by the groups: a broadcast weight
    counts[0, 0] = 1  # no group without weight
    repeated = np.stack([np.repeat(row, counts[0]) for row in values])
    repeated_error = clustering_error(repeated, *solver(repeated, 16))
    weighted_error = clustering_error(values, *solver(values, 16, counts), counts)
    optimum = clustering_error(repeated, *kmeans_1d_exact(repeated, 16))
    if solver is kmeans_1d_exact:
        np.testing.assert_allclose(weighted_error, repeated_error, rtol=1e-6)
        weighted_centroids, _ = solver(values, 16, counts)
        np.testing.assert_allclose(weighted_centroids, solver(repeated, 16)[0], rtol=1e-5)
    else:
        for error in (weighted_error, repeated_error):
            assert (error <= optimum * (1 + FAST_GROUP_EXCESS)).all()


@pytest.mark.parametrize("solver", [kmeans_1d, kmeans_1d_exact])
def test_fewer_distinct_values_than_k_is_lossless(solver):
    values = np.array([[3, 1, 3, 2, 1, 1, 2, 3], [5, 5, 5, 5, 5, 5, 5, 5]], dtype=np.float32)
    centroids, labels = solver(values, 16)
    assert_valid(values, centroids, labels, 16)
    np.testing.assert_array_equal(np.take_along_axis(centroids, labels.astype(np.int64), 1), values)
    assert set(np.unique(centroids[0])) == {1.0, 2.0, 3.0}
    np.testing.assert_array_equal(centroids[1], np.full(16, 5.0, np.float32))


@pytest.mark.parametrize("solver", [kmeans_1d, kmeans_1d_exact])
def test_single_cluster_is_the_weighted_mean(solver):
    rng = np.random.default_rng(5)
    values = rng.standard_normal((3, 50)).astype(np.float32)
    weights = rng.random((3, 50))
    centroids, labels = solver(values, 1, weights)
    expected = (weights * values.astype(np.float64)).sum(axis=1) / weights.sum(axis=1)
    np.testing.assert_allclose(centroids[:, 0], expected, rtol=1e-6)
    assert (labels == 0).all()


@pytest.mark.parametrize("solver", [kmeans_1d, kmeans_1d_exact])
def test_all_zero_weights_cluster_the_group_unweighted(solver):
    rng = np.random.default_rng(6)
    values = (rng.standard_t(3.0, size=(2, 400)) * 0.02).astype(np.float32)
    weights = np.ones((2, 400))
    weights[1] = 0.0
    centroids, labels = solver(values, 8, weights)
    unweighted_centroids, unweighted_labels = solver(values[1:], 8)
    np.testing.assert_array_equal(centroids[1], unweighted_centroids[0])
    np.testing.assert_array_equal(labels[1], unweighted_labels[0])


def test_single_value_and_tiny_groups():
    for solver in (kmeans_1d, kmeans_1d_exact):
        centroids, labels = solver(np.array([[0.25]], np.float32), 4)
        np.testing.assert_array_equal(centroids, np.full((1, 4), 0.25, np.float32))
        assert labels[0, 0] == 0


def test_nearest_labels_picks_the_nearest_and_the_lower_on_ties():
    levels = np.array([[-1.0, 0.0, 0.5, 2.0]], np.float32)
    values = np.array([[-5, -1, -0.5, -0.25, 0.25, 0.3, 1.25, 1.3, 9]], np.float32)
    np.testing.assert_array_equal(nearest_labels(values, levels), [[0, 0, 0, 1, 1, 2, 2, 3, 3]])
    rng = np.random.default_rng(8)
    levels = np.sort(rng.standard_normal((5, 16)), axis=1).astype(np.float32)
    values = rng.standard_normal((5, 1000)).astype(np.float32)
    distance = np.abs(values[:, :, None].astype(np.float64) - levels[:, None, :])
    np.testing.assert_array_equal(nearest_labels(values, levels), np.argmin(distance, axis=2))


@pytest.mark.parametrize(
    "values, k, weights",
    [
        (np.zeros((2, 4), np.float32), 0, None),
        (np.zeros((2, 4), np.float32), 257, None),
        (np.zeros(4, np.float32), 2, None),
        (np.array([[0.0, np.nan]], np.float32), 2, None),
        (np.zeros((1, 2), np.float32), 2, np.array([[1.0, -1.0]])),
    ],
)
def test_invalid_input_is_rejected(values, k, weights):
    with pytest.raises(ValueError):
        kmeans_1d(values, k, weights)


def test_sorting_by_integer_keys_matches_numpys_stable_argsort():
    """The weighted path's sort: values as ``np.sort`` gives them and, for equal values, the
    columns in order, as a stable ``argsort``; over signs, ties, extremes and subnormals."""
    rng = np.random.default_rng(5)
    values = rng.standard_normal((6, 997)).astype(np.float32)
    values[1] = np.round(values[1], 1) + 0.0  # many ties (+ 0.0: no -0.0, which sorts before 0.0 here)
    values[2, :6] = [np.finfo(np.float32).max, np.finfo(np.float32).min, 1e-45, -1e-45, 0.0, 3.0]
    values[3] = -np.abs(values[3])
    sorted_values, order = _sorted_with_order(values)
    np.testing.assert_array_equal(sorted_values, np.sort(values, axis=1))
    np.testing.assert_array_equal(order, np.argsort(values, axis=1, kind="stable"))


@pytest.mark.parametrize("large_group", [False, True])
def test_row_importance_gives_a_heavy_row_its_own_levels(large_group, monkeypatch):
    """Closed form: two rows, four LUT entries. Row A (0, 1, 2, 3) weighs a million times row B
    (10..13): the optimum spends every entry on A's values, which then decode exactly; without
    row weights the entries split between the rows and A loses two of its values. The same on
    the float16 histogram path that one LUT over a huge tensor takes."""
    from anepack import quant
    from anepack.quant import lut

    if large_group:
        monkeypatch.setattr(lut, "LARGE_GROUP_ELEMENTS", 4)
    weight = np.array([[0, 1, 2, 3], [10, 11, 12, 13]], dtype=np.float32)
    weighted = quant.quantize(weight, "lut2-tensor", row_importance=np.array([1e6, 1.0])).dequantize()
    np.testing.assert_array_equal(weighted[0], weight[0])
    assert (weighted[1] == 3).all()  # B's values all go to the nearest of A's levels
    plain = quant.quantize(weight, "lut2-tensor").dequantize()
    assert np.sum(plain[0] != weight[0]) >= 2
    with pytest.raises(AnepackError, match="row importance"):
        quant.quantize(weight, "lut2-tensor", row_importance=np.ones(3))
