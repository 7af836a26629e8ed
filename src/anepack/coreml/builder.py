"""Core ML shards from a recipe's weights: MIL graphs of the transformer layers and the LM head,
grouped into ``.mlpackage`` files under a size budget, plus the host embedding table and the
manifest (docs/coreml-shards.md is the contract with the interpreter, lint and runtime).

    manifest = build_shards(gguf, RecipeWeights(gguf, recipe), "out/", alpha=choose_alpha(peak))

Every graph is float16 (iOS18 opset) and built only from the ops in ``EMITTED_OPS``. Each
weight is the quantization engine's own constexpr op(s) (``anepack.coreml.weights``). A layer
shard has two functions over shared weights, ``prefill`` (``chunk`` tokens) and ``decode``
(one token); the KV cache enters and leaves as plain tensors owned by the host.

fp16 range: the residual stream is multiplied by ``alpha`` (host embeddings; Gemma's
post-attention and post-FFN norm gains; a ``mul`` on Llama's branch outputs). RMSNorm over
the residual stream reads ``alpha * x`` with epsilon ``eps * alpha**2``, so its output is
unchanged; it is computed as ``layer_norm`` of ``[x, -x]`` (mean exactly 0, variance = mean
of squares), so no graph tensor ever holds a square of the residual stream.
"""

from __future__ import annotations

import filecmp
import gc
import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import coremltools as ct
import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Var, types

import anepack
from anepack.atomic import temporary_path
from anepack.coreml.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    FunctionSpec,
    Manifest,
    ShardEntry,
    TensorSpec,
    WeightFormat,
    write_manifest,
)
from anepack.coreml.package import (
    content_hash,
    package_metadata,
    remove_path,
    remove_temporaries,
    save_package,
    size_bytes,
)
from anepack.coreml import moe
from anepack.coreml.moe import EMBEDDED, PER_LAYER_NORM, PER_LAYER_PROJECTION
from anepack.coreml.weights import emit_weight
from anepack.quant.packing import weight_rows
from anepack.errors import AnepackError, UnsupportedModelError
from anepack.quant import Format, LutFormat, QuantizedTensor, VectorLutFormat, parse_format, quantize
from anepack.source.config import Gemma3Config, Gemma4Config, LlamaConfig, ModelConfig
from anepack.source.fingerprint import file_fingerprint
from anepack.source.gguf_file import GGUFFile
from anepack.source.weights import EMBEDDING, LM_HEAD, PER_LAYER_EMBEDDING, stored_name
from anepack.validate.weights import RecipeWeights, one_scale_per_tensor

# Every MIL op type a shard contains; the interpreter and the lint rely on this list.
EMITTED_OPS = frozenset({
    "const",
    "constexpr_blockwise_shift_scale",
    "constexpr_lut_to_dense",
    "linear",
    "matmul",
    "mul",
    "add",
    "layer_norm",
    "softmax",
    "gelu",
    "tanh",
    "silu",
    "reshape",
    "transpose",
    "concat",
    "split",
})

FP16_MAX = float(np.finfo(np.float16).max)
FP16_TINY = float(np.finfo(np.float16).smallest_subnormal)
MASK_HIDDEN = -30000.0  # additive mask: exp(-30000 - max) is 0 in fp16, and -30000 + score stays finite
MAX_VOCAB_CHUNK = 16384  # ANE limit for every dimension but N and C
DEFAULT_ALPHA_MARGIN = 4.0
FUNCTIONS = ("prefill", "decode")
EMBEDDINGS_FILE = "embeddings.npy"
PER_LAYER_EMBEDDINGS_FILE = "per_layer_embeddings.npy"
FLOAT16 = parse_format("fp16")
# Part of every build key: bump when a graph changes, so resumed builds do not reuse old shards.
GRAPH_VERSION = 1
BUILD_KEY_METADATA = "anepack.build_key"
_SHARD_FILE = re.compile(r"(layers_\d+_\d+|experts_\d+_\d+_\d+|head_\d+)\.mlpackage")
_BUDGET_BLOB_OVERHEAD = 128  # weight.bin: 64-byte blob metadata + up to 64 bytes of alignment
_ROW_BLOCK = 16384  # rows of the embedding table read and scaled at a time


def choose_alpha(max_abs_residual: float, margin: float = DEFAULT_ALPHA_MARGIN) -> float:
    """The residual-stream scale: 1 when ``max_abs_residual * margin`` fits fp16, else the
    largest power of two that brings it under 65504 (a power of two scales fp16 exactly)."""
    if not math.isfinite(max_abs_residual) or max_abs_residual <= 0:
        raise AnepackError(None, f"the measured residual maximum must be positive and finite, not {max_abs_residual}")
    if not math.isfinite(margin) or margin < 1:
        raise AnepackError(None, f"the fp16 margin must be at least 1, not {margin}")
    limit = FP16_MAX / margin
    if max_abs_residual <= limit:
        return 1.0
    return 2.0 ** math.floor(math.log2(limit / max_abs_residual))


# ---------------------------------------------------------------------------------------
# Attention variants and the host's per-call inputs


@dataclass(frozen=True)
class AttentionVariant:
    """A kind of attention layer: its RoPE table and its mask (``window`` None: full causal).

    ``proportional``: every pair's angle is divided by the model's ``rope_freqs`` factor
    (Gemma 4's global layers, Llama 3.1+), which the host must be given.
    """

    name: str
    rope_base: float
    freq_scale: float
    window: int | None
    head_dim: int
    n_rot: int
    proportional: bool = False


def _gemma3_variants(config: Gemma3Config) -> tuple[AttentionVariant, ...]:
    hd = config.head_dim
    local = AttentionVariant("local", config.rope_base_local, 1.0, config.sliding_window, hd, hd)
    full = AttentionVariant("global", config.rope_base, config.rope_freq_scale, None, hd, hd)
    return tuple(local if config.is_sliding(il) else full for il in range(config.n_layers))


def _llama_variants(config: LlamaConfig) -> tuple[AttentionVariant, ...]:
    full = AttentionVariant("global", config.rope_base, config.rope_freq_scale, None, config.head_dim, config.rope_dim,
                            proportional=config.rope_freqs)
    return (full,) * config.n_layers


def _gemma4_variants(config: Gemma4Config) -> tuple[AttentionVariant, ...]:
    local = AttentionVariant(
        "local", config.rope_base_local, 1.0, config.sliding_window, config.head_dim_local, config.n_rot_local
    )
    full = AttentionVariant(
        "global", config.rope_base, config.rope_freq_scale, None, config.head_dim_global, config.n_rot_global, True
    )
    return tuple(local if config.is_sliding(il) else full for il in range(config.n_layers))


def _distinct(variants: tuple[AttentionVariant, ...]) -> list[AttentionVariant]:
    return list(dict.fromkeys(variants))


def _rope_table(variant: AttentionVariant, positions: np.ndarray, neox: bool, freq_factors: np.ndarray | None):
    """``cos``, ``sin`` ``[T, head_dim]`` such that ``rope(x) = x * cos + swap(x) * sin``.

    ``swap`` exchanges the halves (NEOX) or the members of each adjacent pair (NORM); the
    sine carries the sign (``-sin`` on the first member). Angles as the reference computes them.
    """
    head_dim, n_rot = variant.head_dim, variant.n_rot
    inv_freq = variant.rope_base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    if variant.proportional:
        inv_freq = inv_freq / np.asarray(freq_factors, dtype=np.float64)
    angles = (positions.astype(np.float64) * variant.freq_scale)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    if neox:
        return np.concatenate([cos, cos], axis=1), np.concatenate([-sin, sin], axis=1)
    cos_table = np.ones((len(positions), head_dim), np.float32)
    sin_table = np.zeros((len(positions), head_dim), np.float32)
    cos_table[:, 0:n_rot:2] = cos_table[:, 1:n_rot:2] = cos
    sin_table[:, 0:n_rot:2], sin_table[:, 1:n_rot:2] = -sin, sin
    return cos_table, sin_table


def _mask(variant: AttentionVariant, start: int, tokens: int, context: int) -> np.ndarray:
    """Additive ``[T, C + T]``: cache slots ``j < start`` hold position j; then the chunk's own keys."""
    query = start + np.arange(tokens)[:, None]
    keys = np.concatenate([np.arange(context), start + np.arange(tokens)])[None, :]
    distance = query - keys
    visible = distance >= 0
    visible[:, :context] &= keys[:, :context] < start
    if variant.window is not None:
        visible &= distance < variant.window
    return np.where(visible, 0.0, MASK_HIDDEN).astype(np.float16)


def host_inputs(
    config: ModelConfig, start: int, tokens: int, context: int, rope_freqs: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """RoPE tables and masks for a call over positions ``start .. start + tokens - 1``, float16.

    Keys ``cos_<v>``, ``sin_<v>``, ``mask_<v>`` for each attention variant v of the model; a
    shard function takes those of its layers (see the manifest). The cache holds positions
    ``0 .. start - 1`` in slots of the same number; the call's keys follow. ``rope_freqs`` (the
    manifest's copy of the model's tensor) is required by Gemma 4's global layers.
    """
    if start < 0 or tokens < 1 or start + tokens > context:
        raise AnepackError(None, f"positions {start}..{start + tokens - 1} do not fit a context of {context}")
    arch = architecture(config)
    positions = start + np.arange(tokens)
    inputs = {}
    for variant in _distinct(arch.variants(config)):
        if variant.proportional and rope_freqs is None:
            raise AnepackError(None, f"the {variant.name} attention layers need the model's rope_freqs factors")
        cos, sin = _rope_table(variant, positions, arch.neox, rope_freqs)
        inputs[f"cos_{variant.name}"] = cos.astype(np.float16)
        inputs[f"sin_{variant.name}"] = sin.astype(np.float16)
        inputs[f"mask_{variant.name}"] = _mask(variant, start, tokens, context)
    return inputs


# ---------------------------------------------------------------------------------------
# Graph building blocks


def mil_name(tensor: str) -> str:
    """The MIL name of a weight: ``blk.3.attn_q.weight`` -> ``blk_3_attn_q_weight``."""
    return tensor.replace(".", "_")


@contextmanager
def _fresh_op_names():
    # The MIL builder numbers implicit names with a process-wide counter; starting every
    # function from zero keeps names (and so bytes) independent of what was built before.
    mb.name_count.clear()
    try:
        yield
    finally:
        mb.name_count.clear()


def _fp16(value: float) -> np.float16:
    return np.float16(value)


def stored_matrix(weights: RecipeWeights, tensor: str, rows: tuple[int, int] | None = None) -> QuantizedTensor:
    """A matrix (or its output rows ``start:stop``) as a shard stores it, equal to
    ``weights.compressed(tensor)`` (float16 for what a recipe never compresses: the router).

    From ``weights``' store when it has one (the gate quantized it there), else quantized from
    the GGUF and not cached (unless the validators quantized it already), so a build holds the
    weights of one package at a time; only a format with one scale or LUT per tensor is
    quantized whole (once, by ``weights``) and then cut.
    """
    fmt = tensor_format(weights, tensor)
    if one_scale_per_tensor(fmt):
        q = weights.compressed(tensor)
        return q if rows is None else weight_rows(q, *rows)
    if tensor in weights.quantizable:
        return weights.quantized_matrix(tensor, rows)
    source = stored_name(weights.gguf, tensor)
    return quantize(weights.gguf.tensor(source) if rows is None else weights.gguf.rows(source, *rows), fmt)


def tensor_format(weights: RecipeWeights, tensor: str) -> Format:
    return weights.recipe.format_for(tensor) if tensor in weights.quantizable else FLOAT16


class Graph:
    """One MIL function under construction: weights, norms, RoPE and attention, all named.

    ``stored`` (matrix and rows -> stored form) is shared by the functions of one package, so
    each matrix is quantized once per package, not once per function.
    """

    def __init__(
        self, config: ModelConfig, weights: RecipeWeights, alpha: float, tokens: int, context: int,
        stored: dict[tuple[str, tuple[int, int] | None], QuantizedTensor] | None = None,
    ):
        self.config = config
        self.weights = weights
        self.stored = {} if stored is None else stored
        self.alpha = alpha
        self.tokens = tokens
        self.context = context
        self.arch = architecture(config)
        self.variants = self.arch.variants(config)
        # Norms that read the residual stream see alpha * x: epsilon scales by alpha^2 so the
        # output is unchanged (kept above zero so an all-zero row cannot divide 0 by 0).
        self.residual_eps = max(float(_fp16(config.rms_eps * alpha * alpha)), FP16_TINY)
        self.inputs: dict[str, Var] = {}
        self.new_cache: dict[int, tuple[Var, Var]] = {}  # layer -> (k_new, v_new) outputs
        self._gains: dict[tuple[str, float], Var] = {}

    def weight(self, tensor: str, name: str, rows: tuple[int, int] | None) -> Var:
        if (tensor, rows) not in self.stored:
            self.stored[tensor, rows] = stored_matrix(self.weights, tensor, rows)
        return emit_weight(self.stored[tensor, rows], name)

    def gain(self, tensor: str, scale: float = 1.0) -> Var:
        """A norm gain as an fp16 const, times ``scale`` in float32 before the one rounding (one
        const per function, however many layers read it)."""
        if (tensor, scale) not in self._gains:
            values = (self.weights.exact(tensor) * np.float32(scale)).astype(np.float16)
            const = mb.const(val=values, name=mil_name(tensor))
            const.op.weight_id = const.name
            self._gains[tensor, scale] = const
        return self._gains[tensor, scale]

    def linear(self, x: Var, tensor: str, name: str, rows: tuple[int, int] | None = None) -> Var:
        weight_name = mil_name(tensor) if rows is None else f"{mil_name(tensor)}_{rows[0]}_{rows[1]}"
        return self.project(x, self.weight(tensor, weight_name, rows), weight_name, name)

    def project(self, x: Var, weight: Var, weight_name: str, name: str) -> Var:
        """``x @ weight.T`` as ``linear``, whose bias is an explicit zero const shared by both functions."""
        bias = mb.const(val=np.zeros(weight.shape[0], np.float16), name=f"{weight_name}_bias")
        bias.op.weight_id = bias.name
        return mb.linear(x=x, weight=weight, bias=bias, name=name)

    def gelu_mlp(self, x: Var, il: int, prefix: str) -> Var:
        """Gemma's dense MLP: ``down(gelu_tanh(gate(x)) * up(x))``."""
        gate = self.linear(x, f"blk.{il}.ffn_gate.weight", f"{prefix}ffn_gate")
        up = self.linear(x, f"blk.{il}.ffn_up.weight", f"{prefix}ffn_up")
        act = mb.mul(x=mb.gelu(x=gate, mode="TANH_APPROXIMATION", name=f"{prefix}ffn_gelu"), y=up,
                     name=f"{prefix}ffn_geglu")
        return self.linear(act, f"blk.{il}.ffn_down.weight", f"{prefix}ffn_down")

    def rms_norm(self, x: Var, gain: Var | None, eps: float, name: str) -> Var:
        """RMSNorm over the last axis as ``layer_norm([x, -x])``: no square of x is ever a tensor.
        Without ``gain`` the norm is weightless (Gemma 4's V norm and router input)."""
        negated = mb.mul(x=x, y=_fp16(-1.0), name=f"{name}_neg")
        mirrored = mb.concat(values=[x, negated], axis=-1, name=f"{name}_mirrored")
        normed = mb.layer_norm(x=mirrored, axes=[-1], epsilon=_fp16(eps), name=f"{name}_ln")
        if gain is None:
            half, _ = mb.split(x=normed, num_splits=2, axis=-1, name=name)
            return half
        half, _ = mb.split(x=normed, num_splits=2, axis=-1, name=f"{name}_half")
        return mb.mul(x=half, y=gain, name=name)

    def residual_branch(self, x: Var, name: str) -> Var:
        """A branch output scaled onto the residual stream (no op when alpha is 1)."""
        if self.alpha == 1.0:
            return x
        return mb.mul(x=x, y=_fp16(self.alpha), name=name)

    def heads(self, x: Var, count: int, head_dim: int, name: str) -> Var:
        return mb.reshape(x=x, shape=[1, self.tokens, count, head_dim], name=name)

    def rope(self, x: Var, il: int, name: str) -> Var:
        """``x [1, T, heads, head_dim]`` rotated: ``x * cos + swap(x) * sin`` (tables from the host)."""
        variant = self.variants[il].name
        cos, sin = self.inputs[f"cos_{variant}_heads"], self.inputs[f"sin_{variant}_heads"]
        heads, head_dim = x.shape[2], x.shape[3]
        if self.arch.neox:
            first, second = mb.split(x=x, num_splits=2, axis=-1, name=f"{name}_halves")
            swapped = mb.concat(values=[second, first], axis=-1, name=f"{name}_swapped")
        else:
            pairs = mb.reshape(x=x, shape=[1, self.tokens, heads, head_dim // 2, 2], name=f"{name}_pairs")
            first, second = mb.split(x=pairs, num_splits=2, axis=-1, name=f"{name}_members")
            crossed = mb.concat(values=[second, first], axis=-1, name=f"{name}_crossed")
            swapped = mb.reshape(x=crossed, shape=[1, self.tokens, heads, head_dim], name=f"{name}_swapped")
        return mb.add(
            x=mb.mul(x=x, y=cos, name=f"{name}_cos"), y=mb.mul(x=swapped, y=sin, name=f"{name}_sin"), name=name
        )

    def attention(self, il: int, q: Var, k: Var | None, v: Var | None, prefix: str) -> Var:
        """Grouped-query attention of ``q [1, T, H, d]`` over the cache and the chunk's ``k, v
        [1, T, Hkv, d]``; emits ``k_new_<il>``, ``v_new_<il>`` and returns ``[1, T, H * d]``.

        A layer that reuses another's keys and values (``k``, ``v`` None) attends to that
        layer's cache and its keys of this call: built in this function, or (the source ran in
        an earlier package) the inputs ``k_shared_<source>``, ``v_shared_<source>``."""
        tokens = self.tokens
        source = kv_source(self.config, il)
        n_head, _, _ = self.arch.attention_dims(self.config, il)
        _, n_kv, head_dim = self.arch.attention_dims(self.config, source)
        group, keys_total = n_head // n_kv, self.context + tokens
        if source == il:
            k_new = mb.transpose(x=k, perm=[0, 2, 1, 3], name=f"k_new_{il}")
            v_new = mb.transpose(x=v, perm=[0, 2, 1, 3], name=f"v_new_{il}")
            self.new_cache[il] = (k_new, v_new)
        elif source in self.new_cache:
            k_new, v_new = self.new_cache[source]
        else:
            k_new, v_new = self.inputs[f"k_shared_{source}"], self.inputs[f"v_shared_{source}"]
        keys = mb.concat(values=[self.inputs[f"k_cache_{source}"], k_new], axis=2, name=f"{prefix}keys")
        values = mb.concat(values=[self.inputs[f"v_cache_{source}"], v_new], axis=2, name=f"{prefix}values")
        # Query heads h = kv * group + g line up under their shared key/value head.
        queries = mb.transpose(x=q, perm=[0, 2, 1, 3], name=f"{prefix}q_heads_first")
        queries = mb.reshape(x=queries, shape=[1, n_kv, group * tokens, head_dim], name=f"{prefix}q_grouped")
        scores = mb.matmul(x=queries, y=keys, transpose_y=True, name=f"{prefix}scores")
        scores = mb.reshape(x=scores, shape=[n_kv, group, tokens, keys_total], name=f"{prefix}scores_split")
        mask = self.inputs[f"mask_{self.variants[il].name}"]
        scores = mb.add(x=scores, y=mask, name=f"{prefix}scores_masked")
        weights = mb.softmax(x=scores, axis=-1, name=f"{prefix}attn_weights")
        weights = mb.reshape(x=weights, shape=[1, n_kv, group * tokens, keys_total], name=f"{prefix}weights_grouped")
        mixed = mb.matmul(x=weights, y=values, name=f"{prefix}mixed")
        mixed = mb.reshape(x=mixed, shape=[1, n_head, tokens, head_dim], name=f"{prefix}mixed_heads")
        mixed = mb.transpose(x=mixed, perm=[0, 2, 1, 3], name=f"{prefix}mixed_tokens_first")
        return mb.reshape(x=mixed, shape=[1, tokens, n_head * head_dim], name=f"{prefix}mixed_flat")

    def qkv(self, il: int, x: Var, prefix: str) -> tuple[Var, Var, Var]:
        n_head, n_kv, head_dim = self.arch.attention_dims(self.config, il)
        q = self.linear(x, f"blk.{il}.attn_q.weight", f"{prefix}q")
        k = self.linear(x, f"blk.{il}.attn_k.weight", f"{prefix}k")
        v = self.linear(x, f"blk.{il}.attn_v.weight", f"{prefix}v")
        return (
            self.heads(q, n_head, head_dim, f"{prefix}q_split"),
            self.heads(k, n_kv, head_dim, f"{prefix}k_split"),
            self.heads(v, n_kv, head_dim, f"{prefix}v_split"),
        )


# ---------------------------------------------------------------------------------------
# Layer blocks, one per architecture (following anepack.reference step by step)


def gemma3_layer(g: Graph, il: int, hidden: Var, out_name: str) -> Var:
    cfg, p = g.config, f"blk_{il}_"
    x = g.rms_norm(hidden, g.gain(f"blk.{il}.attn_norm.weight"), g.residual_eps, f"{p}attn_norm")
    q, k, v = g.qkv(il, x, p)
    q = g.rms_norm(q, g.gain(f"blk.{il}.attn_q_norm.weight"), cfg.rms_eps, f"{p}q_norm")
    k = g.rms_norm(k, g.gain(f"blk.{il}.attn_k_norm.weight"), cfg.rms_eps, f"{p}k_norm")
    q = mb.mul(x=g.rope(q, il, f"{p}q_rope"), y=_fp16(cfg.attention_scale), name=f"{p}q_scaled")
    k = g.rope(k, il, f"{p}k_rope")
    attn = g.linear(g.attention(il, q, k, v, p), f"blk.{il}.attn_output.weight", f"{p}attn_output")
    # Gemma's post-norms feed the residual adds: their gains carry alpha.
    post_gain = g.gain(f"blk.{il}.post_attention_norm.weight", g.alpha)
    attn = g.rms_norm(attn, post_gain, cfg.rms_eps, f"{p}post_attention_norm")
    hidden = mb.add(x=hidden, y=attn, name=f"{p}attn_residual")

    x = g.rms_norm(hidden, g.gain(f"blk.{il}.ffn_norm.weight"), g.residual_eps, f"{p}ffn_norm")
    down = g.gelu_mlp(x, il, p)
    down = g.rms_norm(down, g.gain(f"blk.{il}.post_ffw_norm.weight", g.alpha), cfg.rms_eps, f"{p}post_ffw_norm")
    return mb.add(x=hidden, y=down, name=out_name)


def llama_layer(g: Graph, il: int, hidden: Var, out_name: str) -> Var:
    cfg, p = g.config, f"blk_{il}_"
    x = g.rms_norm(hidden, g.gain(f"blk.{il}.attn_norm.weight"), g.residual_eps, f"{p}attn_norm")
    q, k, v = g.qkv(il, x, p)
    q = mb.mul(x=g.rope(q, il, f"{p}q_rope"), y=_fp16(1.0 / math.sqrt(cfg.head_dim)), name=f"{p}q_scaled")
    k = g.rope(k, il, f"{p}k_rope")
    attn = g.linear(g.attention(il, q, k, v, p), f"blk.{il}.attn_output.weight", f"{p}attn_output")
    hidden = mb.add(x=hidden, y=g.residual_branch(attn, f"{p}attn_scaled"), name=f"{p}attn_residual")

    x = g.rms_norm(hidden, g.gain(f"blk.{il}.ffn_norm.weight"), g.residual_eps, f"{p}ffn_norm")
    gate = g.linear(x, f"blk.{il}.ffn_gate.weight", f"{p}ffn_gate")
    up = g.linear(x, f"blk.{il}.ffn_up.weight", f"{p}ffn_up")
    act = mb.mul(x=mb.silu(x=gate, name=f"{p}ffn_silu"), y=up, name=f"{p}ffn_swiglu")
    down = g.linear(act, f"blk.{il}.ffn_down.weight", f"{p}ffn_down")
    return mb.add(x=hidden, y=g.residual_branch(down, f"{p}ffn_scaled"), name=out_name)


def _uniform_dims(config: Gemma3Config | LlamaConfig, il: int) -> tuple[int, int, int]:
    return config.n_head, config.n_head_kv, config.head_dim


def _gemma4_dims(config: Gemma4Config, il: int) -> tuple[int, int, int]:
    return config.n_head[il], config.n_head_kv[il], config.head_dim(il)


def _no_moe(config: ModelConfig) -> tuple[bool, ...]:
    return (False,) * config.n_layers


@dataclass(frozen=True)
class Architecture:
    """What differs between the architectures' graphs; everything else is shared."""

    layer: Callable[[Graph, int, Var, str], Var]
    variants: Callable[[ModelConfig], tuple[AttentionVariant, ...]]
    neox: bool  # RoPE pairs (i, i + d/2) rather than (2i, 2i + 1)
    embed_scale: Callable[[ModelConfig], float]
    attention_dims: Callable[[ModelConfig, int], tuple[int, int, int]]  # (heads, KV heads, head size) of a layer
    moe_layers: Callable[[ModelConfig], tuple[bool, ...]] = _no_moe  # layers with routed experts
    final_softcap: Callable[[ModelConfig], float | None] = lambda cfg: None


ARCHITECTURES: dict[type, Architecture] = {
    Gemma3Config: Architecture(
        gemma3_layer, _gemma3_variants, neox=True, embed_scale=lambda cfg: cfg.embed_scale,
        attention_dims=_uniform_dims,
    ),
    LlamaConfig: Architecture(
        llama_layer, _llama_variants, neox=False, embed_scale=lambda cfg: 1.0, attention_dims=_uniform_dims,
    ),
    Gemma4Config: Architecture(
        moe.gemma4_layer, _gemma4_variants, neox=True, embed_scale=lambda cfg: cfg.embed_scale,
        attention_dims=_gemma4_dims, moe_layers=lambda cfg: cfg.moe_layers,
        final_softcap=lambda cfg: cfg.final_logit_softcap,
    ),
}


def architecture(config: ModelConfig) -> Architecture:
    arch = ARCHITECTURES.get(type(config))
    if arch is None:
        raise UnsupportedModelError(None, f"no Core ML graph for {type(config).__name__}")
    return arch


def moe_layers(config: ModelConfig) -> tuple[bool, ...]:
    """Per layer: whether it routes tokens to experts (its package ends before them)."""
    return architecture(config).moe_layers(config)


def kv_source(config: ModelConfig, il: int) -> int:
    """The layer whose keys and values layer ``il`` attends to: itself, or for Gemma 4 E2B/E4B's
    KV-shared layers an earlier layer of the same kind."""
    return config.kv_source(il) if isinstance(config, Gemma4Config) else il


def kv_layers(config: ModelConfig) -> list[int]:
    """The layers with a KV cache of their own."""
    return [il for il in range(config.n_layers) if kv_source(config, il) == il]


def per_layer_width(config: ModelConfig) -> int:
    """Gemma 4 E2B/E4B's per-layer input width; 0 for models without per-layer embeddings."""
    return config.n_embd_per_layer if isinstance(config, Gemma4Config) else 0


def cache_shape(config: ModelConfig, il: int, length: int) -> tuple[int, int, int, int]:
    """``[1, KV heads, length, head size]`` of layer ``il``'s keys or values."""
    _, n_kv, head_dim = architecture(config).attention_dims(config, il)
    return (1, n_kv, length, head_dim)


def check_build_options(chunk: int, context: int, max_shard_mb: float) -> None:
    """Refuse, in one line, a prefill chunk, KV cache length or shard budget no build can use."""
    if chunk < 1 or context < chunk:
        raise AnepackError(None, f"need 1 <= chunk <= context, got chunk {chunk}, context {context}")
    if not max_shard_mb > 0:
        raise AnepackError(None, f"--max-shard-mb must be positive, not {max_shard_mb}")


def check_supported(config: ModelConfig, path: str | Path | None = None) -> None:
    """Refuse, in one line, the models whose shards this builder cannot make."""
    arch = architecture(config)
    if arch.neox and any(v.n_rot != v.head_dim for v in arch.variants(config)):
        raise UnsupportedModelError(path, "partial NEOX RoPE (rope dimension below the head size) has no Core ML graph yet")


# ---------------------------------------------------------------------------------------
# Shards: plan, I/O, graphs


@dataclass(frozen=True)
class ShardPlan:
    """One package to build: its layers, its LM-head row chunks ``(start, stop)``, or (kind
    ``experts``) experts ``experts[0] .. experts[1] - 1`` of MoE layer ``layers[0]``.

    ``moe_in``: the MoE layer whose experts ran on the host just before; a layers or head
    package with it opens with that layer's combine instead of reading ``hidden``.
    """

    file: str
    kind: str
    layers: tuple[int, ...] = ()
    chunks: tuple[tuple[int, int], ...] = ()
    first_chunk: int = 0  # global number of the first logits output
    moe_in: int | None = None
    experts: tuple[int, int] | None = None

    @property
    def vocab(self) -> tuple[int, int] | None:
        return (self.chunks[0][0], self.chunks[-1][1]) if self.chunks else None


def _layer_tensors(config: ModelConfig, il: int) -> list[str]:
    """What a layers package stores of layer ``il``; of an MoE layer only the trunk (its banks
    go to expert packages, its combine to the next package, ``ffn_down_exps.scale`` to the host)."""
    names = [name for name in config.expected_shapes() if name.startswith(f"blk.{il}.")]
    if not moe_layers(config)[il]:
        return names
    elsewhere = {*moe.expert_banks(config, il), *moe.combine_tensors(config, il), f"blk.{il}.ffn_down_exps.scale"}
    return [name for name in names if name not in elsewhere]


def _head_tensors() -> list[str]:
    return ["output_norm.weight", LM_HEAD]


def plan_tensors(config: ModelConfig, plan: ShardPlan) -> list[str]:
    if plan.kind == "experts":
        return moe.expert_banks(config, plan.layers[0])
    opening = [] if plan.moe_in is None else moe.combine_tensors(config, plan.moe_in)
    if plan.kind == "layers":
        per_layer = [PER_LAYER_PROJECTION, PER_LAYER_NORM] if per_layer_width(config) else []
        return opening + [name for il in plan.layers for name in _layer_tensors(config, il)] + per_layer
    return opening + _head_tensors()


def plan_functions(plan: ShardPlan, chunk: int) -> dict[str, int]:
    """Each function of the package with its token count, the default (first) one first."""
    counts = dict(zip(FUNCTIONS, (chunk, 1)))
    if plan.kind != "experts":
        return counts
    return {moe.expert_function(e, mode): tokens for e in range(*plan.experts) for mode, tokens in counts.items()}


def _stored_bytes(fmt: Format, shape: tuple[int, ...]) -> int:
    return fmt.payload_bytes(shape) + 4 * _BUDGET_BLOB_OVERHEAD


def _row_block(fmt: Format) -> int:
    """Rows a slice of a weight in ``fmt`` must be a multiple of (a LUT group or a vector)."""
    if isinstance(fmt, LutFormat):
        return fmt.group_size or 1
    if isinstance(fmt, VectorLutFormat):
        return fmt.vector_size
    return 1


def plan_shards(config: ModelConfig, gguf: GGUFFile, weights: RecipeWeights, max_bytes: int) -> list[ShardPlan]:
    """Consecutive layers per package while their stored weights fit ``max_bytes`` (a package
    ends after an MoE layer's trunk, followed by that layer's expert packages); then the LM head
    in row chunks of at most 16384, as many chunks per package as fit."""
    shapes = config.expected_shapes()
    routed = moe_layers(config)

    def tensor_bytes(name: str) -> int:
        shape = shapes[stored_name(gguf, name)]
        if len(shape) == 1:
            return 2 * shape[0] + _BUDGET_BLOB_OVERHEAD
        return _stored_bytes(tensor_format(weights, name), shape)

    def opening(il: int) -> int | None:
        return il - 1 if il > 0 and routed[il - 1] else None

    def opening_bytes(moe_in: int | None) -> int:
        return 0 if moe_in is None else sum(tensor_bytes(name) for name in moe.combine_tensors(config, moe_in))

    # E2B/E4B: each layer's rows of the per-layer projection live with the layer (and the norm
    # gain once per package, within the rounding of the budget)
    per_layer = per_layer_width(config)
    per_layer_bytes = 0
    if per_layer:
        projection = tensor_format(weights, PER_LAYER_PROJECTION)
        if per_layer % _row_block(projection):
            raise AnepackError(None, f"{PER_LAYER_PROJECTION} in {projection.spec} cannot be cut into the "
                                     f"{per_layer}-row slices of single layers")
        per_layer_bytes = _stored_bytes(projection, (per_layer, config.n_embd)) + tensor_bytes(PER_LAYER_NORM)

    digits = max(2, len(str(config.n_layers - 1)))
    groups: list[list[int]] = []
    used = 0
    for il in range(config.n_layers):
        size = (sum(tensor_bytes(name) for name in _layer_tensors(config, il)) + opening_bytes(opening(il))
                + per_layer_bytes)
        if size > max_bytes:
            raise AnepackError(None, f"layer {il} needs {size / 2**20:.1f} MB, more than the shard budget")
        if groups and opening(il) is None and used + size <= max_bytes:
            groups[-1].append(il)
            used += size
        else:
            groups.append([il])
            used = size
    plans = []
    for group in groups:
        plans.append(ShardPlan(f"layers_{group[0]:0{digits}d}_{group[-1]:0{digits}d}.mlpackage", "layers",
                               tuple(group), moe_in=opening(group[0])))
        if routed[group[-1]]:
            plans += _expert_plans(config, weights, group[-1], max_bytes, digits)

    head_fmt = weights.recipe.format_for(LM_HEAD)
    vocab, width = config.vocab_size, config.n_embd
    block = _row_block(head_fmt)
    chunk_rows = MAX_VOCAB_CHUNK - MAX_VOCAB_CHUNK % block
    chunks = [(start, min(start + chunk_rows, vocab)) for start in range(0, vocab, chunk_rows)]
    head_in = opening(config.n_layers)
    norm_bytes = tensor_bytes("output_norm.weight") + opening_bytes(head_in)
    head_groups: list[list[tuple[int, int]]] = []
    used = 0
    for start, stop in chunks:
        size = _stored_bytes(head_fmt, (stop - start, width))
        if size + norm_bytes > max_bytes:
            raise AnepackError(
                None, f"LM head rows {start}:{stop} need {size / 2**20:.1f} MB, more than the shard budget"
            )
        if head_groups and used + size <= max_bytes:
            head_groups[-1].append((start, stop))
            used += size
        else:
            head_groups.append([(start, stop)])
            used = norm_bytes + size
    first = 0
    for number, group in enumerate(head_groups):
        plans.append(ShardPlan(f"head_{number:02d}.mlpackage", "head", chunks=tuple(group), first_chunk=first,
                               moe_in=head_in))
        first += len(group)
    return plans


def _expert_plans(config: ModelConfig, weights: RecipeWeights, il: int, max_bytes: int, digits: int) -> list[ShardPlan]:
    """Layer ``il``'s experts in consecutive runs, as many per package as the budget holds."""
    shapes = config.expected_shapes()
    per_expert = sum(
        _stored_bytes(tensor_format(weights, bank), shapes[bank][1:]) for bank in moe.expert_banks(config, il)
    )
    if per_expert > max_bytes:
        raise AnepackError(None, f"one expert of layer {il} needs {per_expert / 2**20:.1f} MB, more than the shard budget")
    per_package = max_bytes // per_expert
    return [
        ShardPlan(f"experts_{il:0{digits}d}_{start:03d}_{stop - 1:03d}.mlpackage", "experts", (il,),
                  experts=(start, stop))
        for start in range(0, config.n_expert, per_package)
        for stop in [min(start + per_package, config.n_expert)]
    ]


def function_io(config: ModelConfig, plan: ShardPlan, tokens: int, context: int) -> FunctionSpec:
    """The inputs and outputs of a shard function over ``tokens`` tokens, in order."""
    width = (1, tokens, config.n_embd)
    if plan.kind == "experts":
        return FunctionSpec((TensorSpec(moe.EXPERT_INPUT, width),), (TensorSpec(moe.EXPERT_OUTPUT, width),))
    names = ("hidden",) if plan.moe_in is None else moe.COMBINE_INPUTS
    boundary = [TensorSpec(name, width) for name in names]
    if plan.kind == "head":
        outputs = tuple(
            TensorSpec(f"logits_{plan.first_chunk + number}", (1, tokens, stop - start))
            for number, (start, stop) in enumerate(plan.chunks)
        )
        return FunctionSpec(tuple(boundary), outputs)
    variants = architecture(config).variants(config)
    per_layer = per_layer_width(config)
    inputs = boundary + ([TensorSpec(EMBEDDED, width)] if per_layer else [])
    for variant in _distinct(tuple(variants[il] for il in plan.layers)):
        inputs += [
            TensorSpec(f"cos_{variant.name}", (tokens, variant.head_dim)),
            TensorSpec(f"sin_{variant.name}", (tokens, variant.head_dim)),
            TensorSpec(f"mask_{variant.name}", (tokens, context + tokens)),
        ]
    if per_layer:
        inputs += [TensorSpec(f"per_layer_{il}", (1, tokens, per_layer)) for il in plan.layers]
    if moe_layers(config)[plan.layers[-1]]:
        *trunk, logits = moe.TRUNK_OUTPUTS
        outputs = [TensorSpec(name, width) for name in trunk] + [TensorSpec(logits, (1, tokens, config.n_expert))]
    else:
        outputs = [TensorSpec("hidden_out", width)]
    for il in plan.layers:
        if kv_source(config, il) == il:
            cache, new = cache_shape(config, il, context), cache_shape(config, il, tokens)
            inputs += [TensorSpec(f"k_cache_{il}", cache), TensorSpec(f"v_cache_{il}", cache)]
            outputs += [TensorSpec(f"k_new_{il}", new), TensorSpec(f"v_new_{il}", new)]
    # KV-shared layers whose source ran in an earlier package: its cache and its keys of this call
    for source in dict.fromkeys(kv_source(config, il) for il in plan.layers):
        if source not in plan.layers:
            cache, new = cache_shape(config, source, context), cache_shape(config, source, tokens)
            inputs += [TensorSpec(f"k_cache_{source}", cache), TensorSpec(f"v_cache_{source}", cache),
                       TensorSpec(f"k_shared_{source}", new), TensorSpec(f"v_shared_{source}", new)]
    return FunctionSpec(tuple(inputs), tuple(outputs))


def build_function(
    config: ModelConfig, weights: RecipeWeights, plan: ShardPlan, alpha: float, tokens: int, context: int,
    expert: tuple[int, dict[str, QuantizedTensor]] | None = None,
    stored: dict[tuple[str, tuple[int, int] | None], QuantizedTensor] | None = None,
) -> Function:
    """The MIL function of ``plan`` over ``tokens`` tokens (prefill: the chunk; decode: 1); in
    an expert package, of ``expert`` = (index, its stored matrix per bank). ``stored``: the
    matrices already quantized for the package's other functions (``Graph``)."""
    io_spec = function_io(config, plan, tokens, context)
    placeholders = {spec.name: mb.TensorSpec(spec.shape, dtype=types.fp16) for spec in io_spec.inputs}
    with _fresh_op_names(), Function(placeholders, opset_version=ct.target.iOS18) as function:
        g = Graph(config, weights, alpha, tokens, context, stored)
        g.inputs = dict(function.inputs)
        if plan.kind == "head":
            outputs = _head(g, plan)
        elif plan.kind == "experts":
            outputs = [moe.expert(g, plan.layers[0], expert[0], g.inputs[moe.EXPERT_INPUT], expert[1])]
        else:
            outputs = _layers(g, plan)
        function.set_outputs(outputs)
    produced = [var.name for var in function.outputs]
    expected = [spec.name for spec in io_spec.outputs]
    if produced != expected:  # a graph and its declared I/O must never drift apart
        raise AssertionError(f"shard {plan.file} outputs {produced}, declared {expected}")
    return function


def _opening(g: Graph, plan: ShardPlan, out_name: str) -> Var:
    """The residual stream a layers or head package starts from."""
    if plan.moe_in is None:
        return g.inputs["hidden"]
    return moe.moe_combine(g, plan.moe_in, *(g.inputs[name] for name in moe.COMBINE_INPUTS), out_name)


def _layers(g: Graph, plan: ShardPlan) -> list[Var]:
    for name in list(g.inputs):
        if name.startswith(("cos_", "sin_")):
            g.inputs[f"{name}_heads"] = mb.reshape(
                x=g.inputs[name], shape=[1, g.tokens, 1, g.inputs[name].shape[-1]], name=f"{name}_heads"
            )
    hidden = _opening(g, plan, f"blk_{plan.moe_in}_out")
    routed = moe_layers(g.config)
    for il in plan.layers:
        if routed[il]:  # the planner ends a package at its MoE layer
            boundary = moe.moe_trunk(g, il, hidden)
        else:
            hidden = g.arch.layer(g, il, hidden, "hidden_out" if il == plan.layers[-1] else f"blk_{il}_out")
            boundary = [hidden]
    return boundary + [var for il in plan.layers if il in g.new_cache for var in g.new_cache[il]]


def _head(g: Graph, plan: ShardPlan) -> list[Var]:
    hidden = _opening(g, plan, "final_hidden")
    x = g.rms_norm(hidden, g.gain("output_norm.weight"), g.residual_eps, "output_norm")
    cap = g.arch.final_softcap(g.config)
    outputs = []
    for number, (start, stop) in enumerate(plan.chunks):
        name = f"logits_{plan.first_chunk + number}"
        logits = g.linear(x, LM_HEAD, name if cap is None else f"{name}_uncapped", (start, stop))
        if cap is not None:  # Gemma's final soft-cap: cap * tanh(logits / cap)
            scaled = mb.mul(x=logits, y=_fp16(1.0 / cap), name=f"{name}_scaled")
            logits = mb.mul(x=mb.tanh(x=scaled, name=f"{name}_tanh"), y=_fp16(cap), name=name)
        outputs.append(logits)
    return outputs


# ---------------------------------------------------------------------------------------
# The build: embeddings, shards, manifest


@dataclass(frozen=True)
class BuildStep:
    """Reported after each file: ``rebuilt`` is False when an unchanged file was kept."""

    file: str
    index: int
    total: int
    rebuilt: bool


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _importance_digest(weights: RecipeWeights, tensor: str) -> str | None:
    columns = None if weights.importance is None else weights.importance.get(tensor)
    return None if columns is None else hashlib.sha256(np.ascontiguousarray(columns, np.float32).tobytes()).hexdigest()


def _build_key(common: dict, plan: ShardPlan, config: ModelConfig, weights: RecipeWeights) -> str:
    """Everything a shard's bytes depend on: a shard whose key is unchanged is not rebuilt."""
    tensors = {
        name: [weights.recipe.format_for(name).spec, _importance_digest(weights, name)]
        if name in weights.quantizable else None
        for name in plan_tensors(config, plan)
    }
    return _digest({**common, "plan": asdict(plan), "tensors": tensors})


def _scaled_rows(gguf: GGUFFile, tensor: str, scale: float, what: str):
    """A vocabulary table's rows times ``scale`` as float16, a block of rows at a time, in order:
    a real table is gigabytes as float32."""
    for start in range(0, gguf.info(tensor).shape[0], _ROW_BLOCK):
        scaled = gguf.rows(tensor, start, start + _ROW_BLOCK) * np.float32(scale)
        peak = float(np.abs(scaled).max(initial=0.0))
        if peak > FP16_MAX:
            raise AnepackError(gguf.path, f"{what} reach {peak:.0f}, beyond fp16")
        yield scaled.astype(np.float16)


def _write_host_table(path: Path, shape: tuple[int, int], blocks, resume: bool) -> bool:
    """Write a float16 ``.npy`` table from its blocks of rows in order, one block in memory at a
    time, unless an identical file is already there; True when written."""
    partial = temporary_path(path)
    try:
        with open(partial, "wb") as handle:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
                      "shape": tuple(shape)}
            np.lib.format.write_array_header_1_0(handle, header)
            written = 0
            for rows in blocks:
                handle.write(np.ascontiguousarray(rows, dtype=np.float16).tobytes())
                written += len(rows)
        if written != shape[0]:
            raise AnepackError(path, f"wrote {written} of {shape[0]} rows")
        if resume and path.is_file() and filecmp.cmp(partial, path, shallow=False):
            return False
        os.replace(partial, path)
        return True
    finally:
        partial.unlink(missing_ok=True)


def _host_tables(gguf: GGUFFile, config: ModelConfig, alpha: float) -> dict[str, tuple]:
    """The host tables to write: file -> (source tensor, scale, what overflowing would be)."""
    embed_scale = float(np.float32(architecture(config).embed_scale(config)) * np.float32(alpha))
    tables = {EMBEDDINGS_FILE: (stored_name(gguf, EMBEDDING), embed_scale,
                                "embeddings times alpha")}
    if per_layer_width(config):
        # the per-layer rows are scaled by sqrt(n_embd_per_layer) and do not join the residual stream
        tables[PER_LAYER_EMBEDDINGS_FILE] = (PER_LAYER_EMBEDDING, math.sqrt(per_layer_width(config)),
                                             "per-layer embeddings")
    return tables


def _weight_formats(
    config: ModelConfig, gguf: GGUFFile, weights: RecipeWeights, plans: list[ShardPlan]
) -> dict[str, WeightFormat]:
    """Format and exact bits per weight of every matrix the shards store (from the formats, so
    a resumed build quantizes nothing it does not rebuild)."""
    shapes = config.expected_shapes()
    formats = {}
    for plan in plans:
        for name in plan_tensors(config, plan):
            shape = shapes[stored_name(gguf, name)]
            if len(shape) < 2:
                continue
            fmt = tensor_format(weights, name)
            formats[name] = WeightFormat(fmt.spec, 8.0 * fmt.payload_bytes(shape) / math.prod(shape), shape)
    return formats


def _plan_functions(
    config: ModelConfig, weights: RecipeWeights, plan: ShardPlan, alpha: float, chunk: int, context: int
) -> dict[str, Function]:
    """Every function of a package; each matrix is quantized once for its prefill and decode
    functions, an expert package's one expert at a time."""
    if plan.kind != "experts":
        stored = {}
        return {
            name: build_function(config, weights, plan, alpha, tokens, context, stored=stored)
            for name, tokens in plan_functions(plan, chunk).items()
        }
    functions = {}
    banks = moe.expert_banks(config, plan.layers[0])
    for index in range(*plan.experts):
        expert = (index, {bank: moe.stored_expert(weights, bank, index) for bank in banks})
        for mode, tokens in zip(FUNCTIONS, (chunk, 1)):
            functions[moe.expert_function(index, mode)] = build_function(
                config, weights, plan, alpha, tokens, context, expert
            )
    return functions


def _rope_freqs(config: ModelConfig, weights: RecipeWeights) -> tuple[float, ...] | None:
    """The host's copy of the proportional-RoPE factors, when a layer uses them."""
    if not any(variant.proportional for variant in architecture(config).variants(config)):
        return None
    return tuple(float(value) for value in weights.exact("rope_freqs.weight"))


def _expert_down_scales(config: ModelConfig, weights: RecipeWeights) -> dict[int, tuple[float, ...]]:
    """Per MoE layer with ``ffn_down_exps.scale``: the factors the host applies per expert."""
    routed = moe_layers(config)
    return {
        il: tuple(float(value) for value in weights.exact(f"blk.{il}.ffn_down_exps.scale"))
        for il in range(config.n_layers) if routed[il] and config.expert_scales[il]
    }


def build_shards(
    gguf: GGUFFile,
    weights: RecipeWeights,
    out_dir: str | Path,
    *,
    alpha: float,
    chunk: int = 64,
    context: int = 512,
    max_shard_mb: float = 1024,
    progress: Callable[[BuildStep], None] | None = None,
    resume: bool = True,
    validation: dict | None = None,
) -> Manifest:
    """Write ``embeddings.npy``, the layer and head shards and ``manifest.json`` into ``out_dir``.

    ``alpha`` scales the residual stream (``choose_alpha``); ``chunk`` is the prefill length,
    ``context`` the KV cache length; ``max_shard_mb`` (MiB) bounds each package's stored
    weights. With ``resume``, a file whose build key (source fingerprint, recipe formats and
    importance of its tensors, alpha, shapes, anepack and graph version) is unchanged is kept.
    The manifest is removed first and written last: the directory is complete only with it.
    ``validation`` (results measured by the caller) is recorded in the manifest as given.
    """
    config = gguf.config
    check_supported(config, gguf.path)
    if not (math.isfinite(alpha) and alpha > 0):
        raise AnepackError(None, f"alpha must be positive and finite, not {alpha}")
    check_build_options(chunk, context, max_shard_mb)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AnepackError(out, "the output path exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    remove_temporaries(out)

    fingerprint = file_fingerprint(gguf.path)
    plans = plan_shards(config, gguf, weights, int(max_shard_mb * 2**20))
    common = {
        "anepack": anepack.__version__, "graph": GRAPH_VERSION, "source": fingerprint,
        "config": asdict(config), "alpha": alpha, "chunk": chunk, "context": context,
        "whole_banks": weights.whole_banks,
    }
    total = len(plans) + 1

    host_tables = {}
    for file, (tensor, scale, what) in _host_tables(gguf, config, alpha).items():
        path = out / file
        written = _write_host_table(path, gguf.info(tensor).shape, _scaled_rows(gguf, tensor, scale, what), resume)
        host_tables[file] = ShardEntry(
            file=file, kind="embeddings", bytes=size_bytes(path), sha256=content_hash(path),
            build_key=_digest({**common, "embeddings": tensor}),
        )
        if progress is not None:
            progress(BuildStep(file, 0, total, written))

    entries = []
    for index, plan in enumerate(plans, start=1):
        path = out / plan.file
        key = _build_key(common, plan, config, weights)
        rebuild = not (resume and path.is_dir() and package_metadata(path).get(BUILD_KEY_METADATA) == key)
        if rebuild:
            metadata = {BUILD_KEY_METADATA: key, "anepack.version": anepack.__version__, "anepack.shard": plan.file}
            # No name keeps the graphs alive, but MIL graphs hold reference cycles: collected now,
            # one package's weights are in memory at a time.
            save_package(_plan_functions(config, weights, plan, alpha, chunk, context), path, metadata)
            gc.collect()
        entries.append(ShardEntry(
            file=plan.file, kind=plan.kind, bytes=size_bytes(path), sha256=content_hash(path), build_key=key,
            layers=plan.layers, vocab=plan.vocab, tensors=tuple(plan_tensors(config, plan)), experts=plan.experts,
            functions={
                name: function_io(config, plan, tokens, context) for name, tokens in plan_functions(plan, chunk).items()
            },
        ))
        if progress is not None:
            progress(BuildStep(plan.file, index, total, rebuild))

    planned = {plan.file for plan in plans}
    for entry in out.iterdir():
        if _SHARD_FILE.fullmatch(entry.name) and entry.name not in planned:
            remove_path(entry)  # a shard of an earlier build with another grouping

    manifest = Manifest(
        format=MANIFEST_FORMAT,
        anepack_version=anepack.__version__,
        architecture=config.architecture,
        source_file=Path(gguf.path).name,
        source_fingerprint=fingerprint,
        recipe_name=weights.recipe.name,
        recipe_toml=weights.recipe.text or weights.recipe.to_toml(),
        alpha=alpha,
        chunk=chunk,
        context=context,
        max_shard_mb=max_shard_mb,
        embeddings=host_tables[EMBEDDINGS_FILE],
        shards=tuple(entries),
        weights=_weight_formats(config, gguf, weights, plans),
        validation=dict(validation or {}),
        rope_freqs=_rope_freqs(config, weights),
        expert_down_scales=_expert_down_scales(config, weights),
        per_layer_embeddings=host_tables.get(PER_LAYER_EMBEDDINGS_FILE),
    )
    write_manifest(manifest, out)
    return manifest
