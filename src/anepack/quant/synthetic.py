"""Seeded synthetic weights with the statistics that break per-tensor quantization.

``expert_bank`` imitates a large MoE expert bank stored as one matrix (the brief's 31M
parameter case): heavy-tailed values (Student-t), a different scale for each expert slice,
and a few thousand large outliers. Tests and benchmarks share it so that both measure the
same tensor.
"""

from __future__ import annotations

import numpy as np

BANK_ROWS = 45056
BANK_COLS = 704


def expert_bank(
    seed: int = 0,
    rows: int = BANK_ROWS,
    cols: int = BANK_COLS,
    slices: int = 64,
    outliers: int = 2000,
    outlier_gain: float = 40.0,
    degrees_of_freedom: float = 6.0,
) -> np.ndarray:
    """A float32 ``[rows, cols]`` bank: Student-t values, ``slices`` equal row slices
    (experts) each scaled by a log-normal factor (spread of about 4x between the largest and
    smallest), and ``outliers`` random weights multiplied by ``outlier_gain``.

    The default seed reproduces the brief's measurements (INT8 per-tensor cosine ~0.88,
    per-channel ~0.9998, LUT4 g16 ~0.992). Per-tensor results hinge on the single largest
    weight, so they move a lot between seeds; finer granularities barely move.
    """
    rng = np.random.default_rng(seed)
    bank = rng.standard_t(degrees_of_freedom, size=(rows, cols)).astype(np.float32)
    bank *= np.float32(0.02)
    slice_scales = np.exp(rng.normal(0.0, 0.35, size=slices)).astype(np.float32)
    bank *= np.repeat(slice_scales, -(-rows // slices))[:rows, None]
    flat = bank.reshape(-1)
    flat[rng.choice(flat.size, size=outliers, replace=False)] *= np.float32(outlier_gain)
    return bank
