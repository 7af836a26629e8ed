"""Building blocks shared by the numpy reference models, each matching llama.cpp's CPU graph.

Every block takes and returns float32 arrays laid out ``[tokens, ...]``. ``Precision`` is the
one switch between exact float32 compute and the Neural Engine's float16: models pass every
intermediate through it, and in float16 mode it rounds and records the first overflow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
_SQRT_2_OVER_PI = np.float32(np.sqrt(2.0 / np.pi))


def rms_norm(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    """llama.cpp's ``ggml_rms_norm`` (eps inside the square root) times ``weight``, over the last axis.

    The mean of squares is accumulated in float64, as ggml does, so that Gemma's large residual
    values lose nothing before the division.
    """
    mean_square = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True)
    normed = x * (1.0 / np.sqrt(mean_square + eps)).astype(np.float32)
    return normed if weight is None else normed * weight


def rope(
    x: np.ndarray,
    positions: np.ndarray,
    base: float,
    *,
    neox: bool,
    n_rot: int | None = None,
    freq_scale: float = 1.0,
    freq_factors: np.ndarray | None = None,
) -> np.ndarray:
    """Rotary position embedding of ``x[T, heads, head_dim]`` as ``ggml_rope_ext`` computes it.

    Pair ``i`` (of ``n_rot / 2``) turns by ``position * freq_scale * base**(-2i / n_rot)``,
    divided by ``freq_factors[i]`` when given (llama.cpp's ``rope_freqs`` tensor; Gemma 4 sets
    1e30 on the pairs that proportional RoPE leaves unrotated).
    NORM mode (llama) rotates adjacent elements ``(2i, 2i+1)``; NEOX mode (gemma) rotates
    ``(i, i + n_rot/2)``. Dimensions past ``n_rot`` pass through unchanged.
    """
    head_dim = x.shape[-1]
    n_rot = head_dim if n_rot is None else n_rot
    inv_freq = base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    if freq_factors is not None:
        inv_freq = inv_freq / np.asarray(freq_factors, dtype=np.float64)
    angles = (np.asarray(positions, dtype=np.float64) * freq_scale)[:, None] * inv_freq[None, :]
    cos = np.cos(angles).astype(np.float32)[:, None, :]  # [T, 1, n_rot/2], broadcast over heads
    sin = np.sin(angles).astype(np.float32)[:, None, :]
    out = x.copy()
    if neox:
        half = n_rot // 2
        x0, x1 = x[..., :half], x[..., half:n_rot]
        out[..., :half] = x0 * cos - x1 * sin
        out[..., half:n_rot] = x0 * sin + x1 * cos
    else:
        x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2] = x0 * cos - x1 * sin
        out[..., 1:n_rot:2] = x0 * sin + x1 * cos
    return out


def attention_mask(
    query_positions: np.ndarray, key_positions: np.ndarray, window: int | None = None
) -> np.ndarray:
    """Boolean ``[Tq, Tk]``: True where the query may attend to the key.

    Causal: a key at a later position is hidden. With a sliding window, llama.cpp
    (``llama_hparams::is_masked_swa``, standard type) also hides a key whose distance to the
    query is ``>= window``, so a query sees itself and the ``window - 1`` keys before it.
    """
    distance = np.asarray(query_positions)[:, None] - np.asarray(key_positions)[None, :]
    visible = distance >= 0
    if window is not None:
        visible &= distance < window
    return visible


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    mask: np.ndarray,
    scale: float,
    precision: Precision,
    layer: int,
) -> np.ndarray:
    """Grouped-query attention: ``q[T, H, d]``, ``k, v[T, Hkv, d]`` -> ``[T, H * d]``.

    Query head ``h`` reads key/value head ``h // (H / Hkv)``, which is how ggml broadcasts
    ``ggml_mul_mat`` over heads. The scale multiplies the scores inside the softmax, as
    ``ggml_soft_max_ext`` does.
    """
    n_tokens, n_head, head_dim = q.shape
    group = n_head // k.shape[1]
    keys = np.repeat(k.transpose(1, 0, 2), group, axis=0)  # [H, T, d]
    values = np.repeat(v.transpose(1, 0, 2), group, axis=0)
    scores = np.matmul(q.transpose(1, 0, 2), keys.transpose(0, 2, 1))  # [H, Tq, Tk]
    scores = precision.round(scores, layer, "attn_scores", token_axis=1)
    scores = np.where(mask[None, :, :], scores * np.float32(scale), -np.inf)
    weights = precision.round(softmax(scores), layer, "attn_weights", token_axis=1)
    mixed = precision.round(np.matmul(weights, values), layer, "attn_mixed", token_axis=1)  # [H, T, d]
    return mixed.transpose(1, 0, 2).reshape(n_tokens, n_head * head_dim)


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis; rows must keep at least one finite entry (a query sees itself)."""
    shifted = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return shifted / np.sum(shifted, axis=-1, keepdims=True)


def softcap(x: np.ndarray, cap: float) -> np.ndarray:
    """``cap * tanh(x / cap)``: Gemma's final logit soft-capping (scale, tanh, scale in ggml)."""
    return np.tanh(x * np.float32(1.0 / cap)) * np.float32(cap)


# ggml's clamp on the sum of the selected routing weights: the smallest normal float16.
MIN_ROUTING_WEIGHT_SUM = 6.103515625e-5


def route_top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax routing as llama.cpp's ``build_moe_ffn`` (softmax gating, ``norm_w``) does it.

    ``logits[T, E]`` -> (``experts[T, k]``, ``weights[T, k]``): a softmax over all ``E``
    experts, the ``k`` most probable per token (most probable first), and their probabilities
    renormalized to sum to one (the sum clamped below at ggml's smallest normal float16). All
    in float32: routing is a choice, not a matmul, and it stays off the float16 path.
    """
    probs = softmax(logits.astype(np.float32))
    experts = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    weights = np.take_along_axis(probs, experts, axis=-1)
    total = np.maximum(weights.sum(axis=-1, keepdims=True), np.float32(MIN_ROUTING_WEIGHT_SUM))
    return experts, weights / total


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (Gemma's ``gelu_pytorch_tanh``; ggml's ``ggml_gelu``)."""
    return 0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * x * (1.0 + np.float32(0.044715) * x * x)))


def silu(x: np.ndarray) -> np.ndarray:
    """SiLU: ``x * sigmoid(x)``, written with ``exp(-|x|)`` so large inputs do not overflow."""
    e = np.exp(-np.abs(x))
    sigmoid = np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return x * sigmoid.astype(x.dtype, copy=False)


@dataclass(frozen=True)
class Overflow:
    """The first intermediate whose magnitude exceeded float16's range.

    ``layer`` is None outside the layer stack (embedding, output norm, logits); ``position`` is
    the token position of the largest offending value; ``where`` names the intermediate.
    """

    layer: int | None
    position: int
    value: float
    where: str


class Precision:
    """Float32 pass-through, or float16 rounding of every intermediate with overflow tracking.

    Float16 mode models the Neural Engine: each op's output is stored as float16. Norms,
    softmax and activations count as single fused ops (only their outputs are rounded), as the
    ANE runs them. ``positions`` maps the token axis of the current tensors to token positions
    (None: index i is position i).
    """

    def __init__(self, fp16: bool):
        self.fp16 = fp16
        self.overflow: Overflow | None = None
        self.positions: np.ndarray | None = None

    def weight(self, w: np.ndarray) -> np.ndarray:
        """A weight as the model stores it: float32, or its float16 value in float16 mode."""
        if not self.fp16:
            return w
        return w.astype(np.float16).astype(np.float32)

    def round(self, x: np.ndarray, layer: int | None, where: str, token_axis: int = 0) -> np.ndarray:
        """``x`` itself, or rounded to float16, recording the first value beyond its range."""
        if not self.fp16:
            return x
        if self.overflow is None:
            self._check(x, layer, where, token_axis)
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(np.float32)

    def _check(self, x: np.ndarray, layer: int | None, where: str, token_axis: int) -> None:
        magnitude = np.abs(x)
        # NaN compares False, so a NaN born of an earlier inf is not reported as a new overflow
        if not np.any(magnitude > FP16_MAX):
            return
        index = np.unravel_index(int(np.nanargmax(magnitude)), x.shape)
        token = int(index[token_axis])
        position = int(self.positions[token]) if self.positions is not None else token
        self.overflow = Overflow(layer, position, float(x[index]), where)
