"""Fidelity metrics shared by every stage: cosine, SQNR, KL divergence, top-1 agreement,
and the agreement of two MoE routers' expert choices.

All functions take float arrays and compute in float64 so that the metric itself adds no
error to what it measures.
"""

from __future__ import annotations

import numpy as np

_COSINE_BLOCK_ELEMENTS = 1 << 22  # float64 elements per block: 32 MB


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays, flattened."""
    a64 = np.asarray(a, dtype=np.float64).ravel()
    b64 = np.asarray(b, dtype=np.float64).ravel()
    denom = np.linalg.norm(a64) * np.linalg.norm(b64)
    if denom == 0.0:
        return 1.0 if np.array_equal(a64, b64) else 0.0
    return float(a64 @ b64 / denom)


def rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows (last axis), e.g. per position of ``[T, D]``.

    Computed in float64 a block of rows at a time: over whole logits (500 positions of a
    262k vocabulary) the float64 copies and their product would be 3 GB.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    rows_a, rows_b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    out = np.empty(len(rows_a), dtype=np.float64)
    step = max(1, _COSINE_BLOCK_ELEMENTS // max(1, a.shape[-1]))
    for start in range(0, len(rows_a), step):
        a64 = rows_a[start:start + step].astype(np.float64)
        b64 = rows_b[start:start + step].astype(np.float64)
        dots = np.sum(a64 * b64, axis=-1)
        norms = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:start + step] = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 1.0)
    return out.reshape(a.shape[:-1])


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - approx|^2)."""
    ref = np.asarray(reference, dtype=np.float64).ravel()
    err = ref - np.asarray(approximation, dtype=np.float64).ravel()
    noise = float(err @ err)
    if noise == 0.0:
        return float("inf")
    return float(10.0 * np.log10(float(ref @ ref) / noise))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl_divergence(reference_logits: np.ndarray, test_logits: np.ndarray) -> np.ndarray:
    """KL(P_ref || P_test) per row (position), as llama-perplexity --kl-divergence reports."""
    log_p = log_softmax(reference_logits)
    log_q = log_softmax(test_logits)
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def top1_agreement(reference_logits: np.ndarray, test_logits: np.ndarray) -> np.ndarray:
    """Per row: True where the test's most likely token is a most likely token of the reference.

    A tie counts: golden logits are stored in float16, whose step near a logit of 10 is 0.008,
    so two of llama.cpp's top tokens can round to one value, and argmax would then name the
    first of them whichever the test picked.
    """
    reference = np.asarray(reference_logits)
    picked = np.take_along_axis(reference, np.argmax(test_logits, axis=-1)[..., None], axis=-1)[..., 0]
    return picked == reference.max(axis=-1)


def routing_agreement(reference_experts: np.ndarray, test_experts: np.ndarray) -> tuple[float, float]:
    """Of two routers' choices ``[T, k]`` (expert indices, any order within a row): the fraction
    of positions routed to the same set of experts, and the mean fraction of its k experts a
    position keeps."""
    reference = np.sort(np.asarray(reference_experts), axis=-1)
    test = np.sort(np.asarray(test_experts), axis=-1)
    if reference.shape != test.shape:
        raise ValueError(f"routing shapes differ: {reference.shape} vs {test.shape}")
    same_set = np.all(reference == test, axis=-1)
    kept = (reference[:, :, None] == test[:, None, :]).any(axis=-1).mean(axis=-1)
    return float(same_set.mean()), float(kept.mean())
