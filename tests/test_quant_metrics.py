"""Tensor metrics: closed-form cases and plain float64 formulas as the references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from anepack.quant import quantize
from anepack.quant import metrics as qmetrics


def test_two_point_distribution_has_closed_form_statistics():
    weight = np.where(np.arange(4096).reshape(64, 64) % 2 == 0, 1.0, -1.0).astype(np.float32)
    stats = qmetrics.outlier_stats(weight)
    assert stats["std"] == pytest.approx(1.0)
    assert stats["max_abs_over_std"] == pytest.approx(1.0)
    assert stats["excess_kurtosis"] == pytest.approx(-2.0)
    # +-1 sits exactly on the int8 grid (scale 1/127 rounds in fp16, 127 * scale -> 1.0).
    assert stats["int8_tensor_sqnr_db"] > 60


def test_outlier_stats_match_direct_formulas(monkeypatch):
    rng = np.random.default_rng(0)
    row_scales = rng.uniform(0.1, 2.0, size=(300, 1))
    weight = (rng.standard_t(4, size=(300, 50)) * row_scales).astype(np.float32)
    monkeypatch.setattr(qmetrics, "_CHUNK_ELEMENTS", 1000)  # many chunks, uneven last one
    stats = qmetrics.outlier_stats(weight)

    w = weight.astype(np.float64)
    centred = w - w.mean()
    variance = np.mean(centred**2)
    assert stats["std"] == pytest.approx(math.sqrt(variance), rel=1e-6)
    std = math.sqrt(variance)
    assert stats["max_abs_over_std"] == pytest.approx(np.abs(w).max() / std, rel=1e-6)
    kurtosis = np.mean(centred**4) / variance**2 - 3
    assert stats["excess_kurtosis"] == pytest.approx(kurtosis, rel=1e-5)

    def int8_sqnr(scale):
        scale = np.float16(scale) if np.ndim(scale) == 0 else scale.astype(np.float16)
        levels = (np.clip(np.rint(w / scale), -127, 127) * scale).astype(np.float16)
        return 10 * math.log10(np.sum(w**2) / np.sum((w - levels) ** 2))

    assert stats["int8_tensor_sqnr_db"] == pytest.approx(int8_sqnr(np.abs(w).max() / 127), abs=1e-3)
    assert stats["int8_channel_sqnr_db"] == pytest.approx(
        int8_sqnr(np.abs(w).max(axis=1, keepdims=True) / 127), abs=1e-3
    )


def test_weight_error_matches_plain_formulas(monkeypatch):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((70, 30)).astype(np.float32)
    approx = (weight + rng.normal(0, 0.1, size=weight.shape)).astype(np.float16)
    monkeypatch.setattr(qmetrics, "_CHUNK_ELEMENTS", 500)
    got = qmetrics.weight_error(weight, approx)
    a, b = weight.astype(np.float64).ravel(), approx.astype(np.float64).ravel()
    assert got["cosine"] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-12)
    sqnr = 10 * math.log10((a @ a) / ((a - b) @ (a - b)))
    assert got["sqnr_db"] == pytest.approx(sqnr, rel=1e-12)
    assert got["max_abs_error"] == pytest.approx(np.abs(a - b).max(), rel=1e-12)


def test_output_sqnr_and_quality_report():
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((32, 64)).astype(np.float32)
    activations = rng.standard_normal((5, 64)).astype(np.float32)
    q = quantize(weight, "int4-channel")
    report = qmetrics.quality(weight, q, activations)
    exact = activations.astype(np.float64) @ weight.T.astype(np.float64)
    approx = activations.astype(np.float64) @ q.dequantize().T.astype(np.float64)
    expected = 10 * math.log10(np.sum(exact**2) / np.sum((exact - approx) ** 2))
    assert report["output_sqnr_db"] == pytest.approx(expected, rel=1e-9)
    assert report["bits_per_weight"] == pytest.approx(4 + 16 / 64)
    expected_keys = {"bits_per_weight", "sqnr_db", "cosine", "max_abs_error", "output_sqnr_db"}
    assert set(report) == expected_keys


def test_exact_copy_has_infinite_sqnr():
    weight = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert qmetrics.weight_error(weight, weight)["sqnr_db"] == math.inf
