"""Typed, frozen model configs built from GGUF metadata, one per architecture.

Each architecture registers a parser that reads its hyperparameters (with llama.cpp's key
names and defaults) and names the tensors the forward pass needs; ``config_from_gguf`` checks
that those tensors exist with the shapes the hyperparameters imply, so a malformed model fails
here with one line instead of deep inside a matmul.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Union

from anepack.errors import UnsupportedModelError

if TYPE_CHECKING:
    from anepack.source.gguf_file import GGUFFile


@dataclass(frozen=True)
class LlamaConfig:
    """Llama-family decoder: RMSNorm, SiLU-gated MLP, GQA, NORM RoPE (Llama 3.1+: every pair's
    angle divided by its ``rope_freqs`` factor)."""

    architecture: ClassVar[str] = "llama"

    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    vocab_size: int
    rms_eps: float
    rope_base: float
    rope_dim: int
    rope_freq_scale: float
    context_length: int
    tied_embeddings: bool
    rope_freqs: bool = False  # per-pair RoPE factors (``rope_freqs.weight``: Llama 3.1+'s long-context scaling)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {
            "token_embd.weight": (self.vocab_size, self.n_embd),
            "output_norm.weight": (self.n_embd,),
        }
        if not self.tied_embeddings:
            shapes["output.weight"] = (self.vocab_size, self.n_embd)
        if self.rope_freqs:
            shapes["rope_freqs.weight"] = (self.rope_dim // 2,)
        for il in range(self.n_layers):
            shapes |= {
                f"blk.{il}.attn_norm.weight": (self.n_embd,),
                f"blk.{il}.attn_q.weight": (self.n_head * self.head_dim, self.n_embd),
                f"blk.{il}.attn_k.weight": (self.n_head_kv * self.head_dim, self.n_embd),
                f"blk.{il}.attn_v.weight": (self.n_head_kv * self.head_dim, self.n_embd),
                f"blk.{il}.attn_output.weight": (self.n_embd, self.n_head * self.head_dim),
                f"blk.{il}.ffn_norm.weight": (self.n_embd,),
                f"blk.{il}.ffn_gate.weight": (self.n_ff, self.n_embd),
                f"blk.{il}.ffn_up.weight": (self.n_ff, self.n_embd),
                f"blk.{il}.ffn_down.weight": (self.n_embd, self.n_ff),
            }
        return shapes


@dataclass(frozen=True)
class Gemma3Config:
    """Gemma 3: sliding-window and global layers, q/k norms, GELU-tanh, post-norms, tied embeddings."""

    architecture: ClassVar[str] = "gemma3"

    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    vocab_size: int
    rms_eps: float
    rope_base: float  # global (full-attention) layers
    rope_base_local: float  # sliding-window layers
    rope_freq_scale: float  # global layers only (linear RoPE scaling of the larger models)
    sliding_window: int
    sliding_layers: tuple[bool, ...]  # per layer: True where attention is windowed
    attention_scale: float
    context_length: int

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_layers[layer]

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.n_embd)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {
            "token_embd.weight": (self.vocab_size, self.n_embd),
            "output_norm.weight": (self.n_embd,),
        }
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        for il in range(self.n_layers):
            shapes |= {
                f"blk.{il}.attn_norm.weight": (self.n_embd,),
                f"blk.{il}.attn_q.weight": (q_dim, self.n_embd),
                f"blk.{il}.attn_k.weight": (kv_dim, self.n_embd),
                f"blk.{il}.attn_v.weight": (kv_dim, self.n_embd),
                f"blk.{il}.attn_q_norm.weight": (self.head_dim,),
                f"blk.{il}.attn_k_norm.weight": (self.head_dim,),
                f"blk.{il}.attn_output.weight": (self.n_embd, q_dim),
                f"blk.{il}.post_attention_norm.weight": (self.n_embd,),
                f"blk.{il}.ffn_norm.weight": (self.n_embd,),
                f"blk.{il}.ffn_gate.weight": (self.n_ff, self.n_embd),
                f"blk.{il}.ffn_up.weight": (self.n_ff, self.n_embd),
                f"blk.{il}.ffn_down.weight": (self.n_embd, self.n_ff),
                f"blk.{il}.post_ffw_norm.weight": (self.n_embd,),
            }
        return shapes


@dataclass(frozen=True)
class Gemma4Config:
    """Gemma 4: per-layer attention shapes, proportional RoPE, optional MoE, per-layer embeddings
    and KV sharing. Per-layer tuples are indexed by layer; which optional tensors a layer carries
    (``attn_v``, the MoE bank layout, scales) is read from the tensor table, as llama.cpp does."""

    architecture: ClassVar[str] = "gemma4"

    n_layers: int
    n_embd: int
    vocab_size: int
    rms_eps: float
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    head_dim_global: int
    head_dim_local: int
    n_rot_global: int
    n_rot_local: int
    sliding_window: int
    sliding_layers: tuple[bool, ...]
    rope_base: float  # global layers, which also divide their angles by rope_freqs
    rope_base_local: float
    rope_freq_scale: float  # global layers only
    n_ff: tuple[int, ...]  # the dense MLP, present in every layer
    n_expert: int
    n_expert_used: tuple[int, ...]
    n_ff_exp: tuple[int, ...]
    moe_layers: tuple[bool, ...]  # layers with a router (ffn_gate_inp)
    fused_gate_up: tuple[bool, ...]  # ffn_gate_up_exps rather than ffn_gate_exps + ffn_up_exps
    expert_scales: tuple[bool, ...]  # ffn_down_exps.scale present
    value_projections: tuple[bool, ...]  # attn_v present; without it V is K's projection
    output_scales: tuple[bool, ...]  # layer_output_scale present
    n_kv_shared_layers: int  # the last ones, reusing earlier layers' keys and values
    n_embd_per_layer: int  # per-layer embedding width; 0 without per-layer embeddings
    final_logit_softcap: float | None
    context_length: int
    tied_embeddings: bool

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_layers[layer]

    def head_dim(self, layer: int) -> int:
        return self.head_dim_local if self.sliding_layers[layer] else self.head_dim_global

    def n_rot(self, layer: int) -> int:
        return self.n_rot_local if self.sliding_layers[layer] else self.n_rot_global

    @property
    def first_shared_layer(self) -> int:
        return self.n_layers - self.n_kv_shared_layers

    def has_kv(self, layer: int) -> bool:
        """Whether the layer projects its own keys and values."""
        return layer < self.first_shared_layer

    def kv_source(self, layer: int) -> int:
        """The layer whose keys and values ``layer`` attends to (llama.cpp's reuse rule: the
        last sliding or the last global layer before the shared ones, matching its own kind)."""
        if self.has_kv(layer):
            return layer
        return self.first_shared_layer - (2 if self.sliding_layers[layer] else 1)

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.n_embd)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        embd = self.n_embd
        shapes: dict[str, tuple[int, ...]] = {
            "token_embd.weight": (self.vocab_size, embd),
            "output_norm.weight": (embd,),
        }
        if not self.tied_embeddings:
            shapes["output.weight"] = (self.vocab_size, embd)
        if not all(self.sliding_layers):
            shapes["rope_freqs.weight"] = (self.head_dim_global // 2,)
        if self.n_embd_per_layer:
            per_layer = self.n_embd_per_layer
            shapes |= {
                "per_layer_token_embd.weight": (self.vocab_size, self.n_layers * per_layer),
                "per_layer_model_proj.weight": (self.n_layers * per_layer, embd),
                "per_layer_proj_norm.weight": (per_layer,),
            }
        for il in range(self.n_layers):
            hd, n_ff = self.head_dim(il), self.n_ff[il]
            q_dim, kv_dim = self.n_head[il] * hd, self.n_head_kv[il] * hd
            blk = f"blk.{il}"
            shapes |= {
                f"{blk}.attn_norm.weight": (embd,),
                f"{blk}.attn_q.weight": (q_dim, embd),
                f"{blk}.attn_q_norm.weight": (hd,),
                f"{blk}.attn_output.weight": (embd, q_dim),
                f"{blk}.post_attention_norm.weight": (embd,),
                f"{blk}.ffn_norm.weight": (embd,),
                f"{blk}.ffn_gate.weight": (n_ff, embd),
                f"{blk}.ffn_up.weight": (n_ff, embd),
                f"{blk}.ffn_down.weight": (embd, n_ff),
                f"{blk}.post_ffw_norm.weight": (embd,),
            }
            if self.has_kv(il):
                shapes[f"{blk}.attn_k.weight"] = (kv_dim, embd)
                shapes[f"{blk}.attn_k_norm.weight"] = (hd,)
                if self.value_projections[il]:
                    shapes[f"{blk}.attn_v.weight"] = (kv_dim, embd)
            if self.output_scales[il]:
                shapes[f"{blk}.layer_output_scale.weight"] = (1,)
            if self.moe_layers[il]:
                n_expert, n_ff_exp = self.n_expert, self.n_ff_exp[il]
                shapes |= {
                    f"{blk}.ffn_gate_inp.weight": (n_expert, embd),
                    f"{blk}.ffn_gate_inp.scale": (embd,),
                    f"{blk}.pre_ffw_norm_2.weight": (embd,),
                    f"{blk}.post_ffw_norm_1.weight": (embd,),
                    f"{blk}.post_ffw_norm_2.weight": (embd,),
                    f"{blk}.ffn_down_exps.weight": (n_expert, embd, n_ff_exp),
                }
                if self.fused_gate_up[il]:
                    shapes[f"{blk}.ffn_gate_up_exps.weight"] = (n_expert, 2 * n_ff_exp, embd)
                else:
                    shapes[f"{blk}.ffn_gate_exps.weight"] = (n_expert, n_ff_exp, embd)
                    shapes[f"{blk}.ffn_up_exps.weight"] = (n_expert, n_ff_exp, embd)
                if self.expert_scales[il]:
                    shapes[f"{blk}.ffn_down_exps.scale"] = (n_expert,)
            if self.n_embd_per_layer:
                shapes |= {
                    f"{blk}.inp_gate.weight": (self.n_embd_per_layer, embd),
                    f"{blk}.proj.weight": (embd, self.n_embd_per_layer),
                    f"{blk}.post_norm.weight": (embd,),
                }
        return shapes


ModelConfig = Union[LlamaConfig, Gemma3Config, Gemma4Config]


def routes_experts(config: ModelConfig) -> bool:
    """True for a Mixture-of-Experts model (only Gemma 4 configs have routers)."""
    return isinstance(config, Gemma4Config) and any(config.moe_layers)


class _Keys:
    """Typed access to ``<arch>.<key>`` metadata with one-line errors naming the file."""

    def __init__(self, gguf: GGUFFile, arch: str):
        self.gguf = gguf
        self.arch = arch

    def get(self, key: str, kind: type, default: Any = None) -> Any:
        full = f"{self.arch}.{key}"
        value = self.gguf.metadata.get(full, default)
        if value is None:
            raise UnsupportedModelError(self.gguf.path, f"metadata has no {full}")
        if isinstance(value, list):  # per-layer arrays: the configs here need them uniform
            if not value or any(v != value[0] for v in value):
                raise UnsupportedModelError(self.gguf.path, f"{full} varies per layer: {value}")
            value = value[0]
        if kind is int and isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UnsupportedModelError(self.gguf.path, f"{full} should be a number, got {value!r}")
        if kind is int and (value != int(value) or value <= 0):
            raise UnsupportedModelError(self.gguf.path, f"{full} should be a positive integer, got {value!r}")
        return kind(value)

    def per_layer(self, key: str, n_layers: int, default: Any = None) -> tuple[int, ...]:
        """llama.cpp's ``get_key_or_arr``: one positive integer for all layers, or an array of
        exactly one per layer."""
        full = f"{self.arch}.{key}"
        value = self.gguf.metadata.get(full, default)
        if value is None:
            raise UnsupportedModelError(self.gguf.path, f"metadata has no {full}")
        values = value if isinstance(value, list) else [value] * n_layers
        if len(values) != n_layers:
            raise UnsupportedModelError(self.gguf.path, f"{full} has {len(values)} entries for {n_layers} layers")
        for item in values:
            if isinstance(item, bool) or not isinstance(item, int) or item <= 0:
                raise UnsupportedModelError(self.gguf.path, f"{full} should hold positive integers, got {value!r}")
        return tuple(values)


def _vocab_size(gguf: GGUFFile) -> int:
    return gguf.info("token_embd.weight").shape[0]


def _parse_llama(gguf: GGUFFile) -> LlamaConfig:
    keys = _Keys(gguf, "llama")
    n_embd = keys.get("embedding_length", int)
    n_head = keys.get("attention.head_count", int)
    head_dim = keys.get("attention.key_length", int, n_embd // n_head)
    return LlamaConfig(
        n_layers=keys.get("block_count", int),
        n_embd=n_embd,
        n_ff=keys.get("feed_forward_length", int),
        n_head=n_head,
        n_head_kv=keys.get("attention.head_count_kv", int, n_head),
        head_dim=head_dim,
        vocab_size=_vocab_size(gguf),
        rms_eps=keys.get("attention.layer_norm_rms_epsilon", float),
        rope_base=keys.get("rope.freq_base", float, 10000.0),
        rope_dim=keys.get("rope.dimension_count", int, head_dim),
        rope_freq_scale=1.0 / _linear_rope_factor(gguf, keys),
        context_length=keys.get("context_length", int, 2048),
        tied_embeddings="output.weight" not in gguf.tensors,
        rope_freqs="rope_freqs.weight" in gguf.tensors,
    )


def _sliding_layers(gguf: GGUFFile, arch: str, n_layers: int, window: int, default_period: int) -> tuple[bool, ...]:
    """llama.cpp's swa pattern: a period (layer il is windowed unless il % period == period - 1),
    or an explicit per-layer array; no window at all when the window size is 0."""
    if window == 0:
        return (False,) * n_layers
    pattern = gguf.metadata.get(f"{arch}.attention.sliding_window_pattern", default_period)
    if isinstance(pattern, list):
        if len(pattern) != n_layers:
            raise UnsupportedModelError(
                gguf.path, f"{arch}.attention.sliding_window_pattern has {len(pattern)} entries for {n_layers} layers"
            )
        return tuple(bool(flag) for flag in pattern)
    if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern <= 0:
        raise UnsupportedModelError(gguf.path, f"{arch}.attention.sliding_window_pattern {pattern!r} is not a period")
    return tuple(il % pattern < pattern - 1 for il in range(n_layers))


def _linear_rope_factor(gguf: GGUFFile, keys: _Keys) -> float:
    """llama.cpp's default RoPE scaling type is linear: a factor applies unless the type says otherwise."""
    scaling = gguf.metadata.get(f"{keys.arch}.rope.scaling.type", "linear")
    if scaling == "none":
        return 1.0
    if scaling != "linear":
        raise UnsupportedModelError(gguf.path, f"RoPE scaling type {scaling!r} is not supported (only linear)")
    return keys.get("rope.scaling.factor", float, 1.0)


def _parse_gemma3(gguf: GGUFFile) -> Gemma3Config:
    keys = _Keys(gguf, "gemma3")
    n_embd = keys.get("embedding_length", int)
    n_head = keys.get("attention.head_count", int)
    head_dim = keys.get("attention.key_length", int, n_embd // n_head)
    n_layers = keys.get("block_count", int)
    window = gguf.metadata.get("gemma3.attention.sliding_window", 0)
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise UnsupportedModelError(gguf.path, f"gemma3.attention.sliding_window {window!r} is not a size")
    # llama.cpp: Gemma 3 27B scales queries by 1/sqrt(n_embd / n_head), the others by 1/sqrt(head_dim)
    is_27b = n_layers == 62
    return Gemma3Config(
        n_layers=n_layers,
        n_embd=n_embd,
        n_ff=keys.get("feed_forward_length", int),
        n_head=n_head,
        n_head_kv=keys.get("attention.head_count_kv", int, n_head),
        head_dim=head_dim,
        vocab_size=_vocab_size(gguf),
        rms_eps=keys.get("attention.layer_norm_rms_epsilon", float),
        rope_base=keys.get("rope.freq_base", float, 10000.0),
        rope_base_local=keys.get("rope.freq_base_swa", float, 10000.0),
        rope_freq_scale=1.0 / _linear_rope_factor(gguf, keys),
        sliding_window=window,
        sliding_layers=_sliding_layers(gguf, "gemma3", n_layers, window, default_period=6),
        attention_scale=1.0 / math.sqrt(n_embd / n_head if is_27b else head_dim),
        context_length=keys.get("context_length", int, 32768),
    )


# The ``.scale`` tensors of a gemma4 file the reference applies; any other (an NVFP4 second-level
# scale, say) would change the arithmetic and is refused rather than silently ignored.
_GEMMA4_SCALES = ("ffn_gate_inp.scale", "ffn_down_exps.scale")


def _non_negative(gguf: GGUFFile, key: str, default: int | None) -> int:
    """A count that may be 0 (``default`` None: the key is required)."""
    value = gguf.metadata.get(key, default)
    if value is None:
        raise UnsupportedModelError(gguf.path, f"metadata has no {key}")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UnsupportedModelError(gguf.path, f"{key} should be a non-negative integer, got {value!r}")
    return value


def _parse_gemma4(gguf: GGUFFile) -> Gemma4Config:
    keys = _Keys(gguf, "gemma4")
    tensors = gguf.tensors
    n_layers = keys.get("block_count", int)
    n_embd = keys.get("embedding_length", int)
    n_head = keys.per_layer("attention.head_count", n_layers)
    n_head_kv = keys.per_layer("attention.head_count_kv", n_layers, list(n_head))
    head_dim_global = keys.get("attention.key_length", int, n_embd // n_head[0])
    head_dim_local = keys.get("attention.key_length_swa", int)
    if keys.get("attention.value_length", int, head_dim_global) != head_dim_global or (
        keys.get("attention.value_length_swa", int) != head_dim_local
    ):
        raise UnsupportedModelError(gguf.path, "gemma4 needs value_length == key_length (global and sliding)")
    n_rot_global = keys.get("rope.dimension_count", int, head_dim_global)
    n_rot_local = keys.get("rope.dimension_count_swa", int, n_rot_global)

    pattern = gguf.metadata.get("gemma4.attention.sliding_window_pattern")
    if not isinstance(pattern, list) or len(pattern) != n_layers:
        raise UnsupportedModelError(
            gguf.path, f"gemma4.attention.sliding_window_pattern should list {n_layers} per-layer flags, got {pattern!r}"
        )
    sliding_layers = tuple(bool(flag) for flag in pattern)
    window = keys.get("attention.sliding_window", int)

    moe_layers = tuple(f"blk.{il}.ffn_gate_inp.weight" in tensors for il in range(n_layers))
    n_expert = _non_negative(gguf, "gemma4.expert_count", 0)
    if any(moe_layers):
        n_expert = keys.get("expert_count", int)
        n_expert_used = keys.per_layer("expert_used_count", n_layers)
        n_ff_exp = keys.per_layer("expert_feed_forward_length", n_layers)
    else:
        n_expert_used = n_ff_exp = (0,) * n_layers
    # llama.cpp's default cap is 30; a stored 0 turns soft-capping off
    softcap = gguf.metadata.get("gemma4.final_logit_softcapping", 30.0)
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or softcap < 0:
        raise UnsupportedModelError(gguf.path, f"gemma4.final_logit_softcapping should be >= 0, got {softcap!r}")

    config = Gemma4Config(
        n_layers=n_layers,
        n_embd=n_embd,
        vocab_size=_vocab_size(gguf),
        rms_eps=keys.get("attention.layer_norm_rms_epsilon", float),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_global=head_dim_global,
        head_dim_local=head_dim_local,
        n_rot_global=n_rot_global,
        n_rot_local=n_rot_local,
        sliding_window=window,
        sliding_layers=sliding_layers,
        rope_base=keys.get("rope.freq_base", float, 10000.0),
        rope_base_local=keys.get("rope.freq_base_swa", float, 10000.0),
        rope_freq_scale=1.0 / _linear_rope_factor(gguf, keys),
        n_ff=keys.per_layer("feed_forward_length", n_layers),
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        n_ff_exp=n_ff_exp,
        moe_layers=moe_layers,
        fused_gate_up=tuple(f"blk.{il}.ffn_gate_up_exps.weight" in tensors for il in range(n_layers)),
        expert_scales=tuple(f"blk.{il}.ffn_down_exps.scale" in tensors for il in range(n_layers)),
        value_projections=tuple(f"blk.{il}.attn_v.weight" in tensors for il in range(n_layers)),
        output_scales=tuple(f"blk.{il}.layer_output_scale.weight" in tensors for il in range(n_layers)),
        n_kv_shared_layers=_non_negative(gguf, "gemma4.attention.shared_kv_layers", 0),
        n_embd_per_layer=_non_negative(gguf, "gemma4.embedding_length_per_layer_input", None),
        final_logit_softcap=float(softcap) or None,
        context_length=keys.get("context_length", int),
        tied_embeddings="output.weight" not in tensors,
    )
    problem = _gemma4_problem(config, tensors)
    if problem:
        raise UnsupportedModelError(gguf.path, problem)
    return config


def _gemma4_problem(config: Gemma4Config, tensors: dict[str, Any]) -> str | None:
    """What llama.cpp would refuse (or silently compute differently) in a gemma4 file, if anything."""
    for name in tensors:
        if name.endswith(".scale") and not name.endswith(_GEMMA4_SCALES):
            return f"tensor {name!r}: per-tensor weight scales are not supported"
        if name.endswith("attn_qkv.weight"):
            return f"tensor {name!r}: fused QKV projections are not supported"
    for il in range(config.n_layers):
        if config.n_head[il] % config.n_head_kv[il]:
            return f"layer {il}: {config.n_head[il]} heads are not a multiple of {config.n_head_kv[il]} KV heads"
        n_rot, head_dim = config.n_rot(il), config.head_dim(il)
        if n_rot % 2 or n_rot > head_dim:
            return f"layer {il}: RoPE dimension {n_rot} must be even and at most the head size {head_dim}"
        if config.moe_layers[il] and not 0 < config.n_expert_used[il] <= config.n_expert:
            return f"layer {il}: routes to {config.n_expert_used[il]} of {config.n_expert} experts"
    if config.first_shared_layer < 2:
        return f"{config.n_kv_shared_layers} KV-shared layers leave fewer than 2 of {config.n_layers} with their own KV"
    for il in range(config.first_shared_layer, config.n_layers):
        source = config.kv_source(il)
        if config.sliding_layers[source] != config.sliding_layers[il] or config.n_head_kv[source] != config.n_head_kv[il]:
            return f"layer {il} shares the keys and values of layer {source}, whose attention differs in kind or shape"
    return None


PARSERS: dict[str, Callable[[GGUFFile], ModelConfig]] = {
    "llama": _parse_llama,
    "gemma3": _parse_gemma3,
    "gemma4": _parse_gemma4,
}


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    """Parse the architecture's hyperparameters and check its tensors' presence and shapes."""
    arch = gguf.architecture
    parser = PARSERS.get(arch)
    if parser is None:
        raise UnsupportedModelError(
            gguf.path, f"unknown architecture {arch!r} (supported: {', '.join(sorted(PARSERS))})"
        )
    config = parser(gguf)
    for name, shape in config.expected_shapes().items():
        actual = gguf.info(name).shape
        if actual != shape:
            raise UnsupportedModelError(
                gguf.path, f"tensor {name!r} has shape {list(actual)}, expected {list(shape)}"
            )
    return config
