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
    """Llama-family decoder: RMSNorm, SiLU-gated MLP, GQA, NORM RoPE."""

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

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {
            "token_embd.weight": (self.vocab_size, self.n_embd),
            "output_norm.weight": (self.n_embd,),
        }
        if not self.tied_embeddings:
            shapes["output.weight"] = (self.vocab_size, self.n_embd)
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


ModelConfig = Union[LlamaConfig, Gemma3Config]


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


def _vocab_size(gguf: GGUFFile) -> int:
    return gguf.info("token_embd.weight").shape[0]


def _parse_llama(gguf: GGUFFile) -> LlamaConfig:
    keys = _Keys(gguf, "llama")
    if "rope_freqs.weight" in gguf.tensors:
        raise UnsupportedModelError(
            gguf.path, "per-frequency RoPE factors (rope_freqs.weight, Llama 3.1+) are not supported yet"
        )
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


PARSERS: dict[str, Callable[[GGUFFile], ModelConfig]] = {
    "llama": _parse_llama,
    "gemma3": _parse_gemma3,
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
