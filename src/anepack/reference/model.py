"""What every reference model shares: lazy weight cache, precision, and the forward loop.

An architecture subclasses ``ReferenceModel`` and writes ``embed_tokens``, ``block`` and
``head``; the base class wraps them as ``embed``, ``layer`` and ``final``, and ``forward``
chains those. ``layer`` works alone from a given hidden state, because the validators run
single layers with substituted (quantized) weights. ``embed_many`` and ``layer_many`` do the
same for several prompts at once, layer by layer: the results are each prompt's own, and an
architecture may share work between the prompts (an MoE layer reads each routed expert once for
all of them instead of once per prompt).

The vocab-sized tables (``STREAMED_WEIGHTS``: the embedding, the LM head, Gemma 4's per-layer
embeddings; the largest tensors by far) are read by rows when the weight source offers ``rows(name, start, stop)``:
the lookup gathers the prompt's rows and the head multiplies chunk by chunk, so no float32
copy of the whole table is held. Other sources are read whole. Weights read whole are kept in
a cache bounded in bytes (``weight_cache``), so a deep model is not held whole in float32.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from anepack.reference.common import Overflow, Precision, gelu_tanh
from anepack.reference.weight_cache import WeightCache
from anepack.source.weights import EMBEDDING, LM_HEAD, PER_LAYER_EMBEDDING
from anepack.tokenizer import checked_tokens

WeightSource = Callable[[str], np.ndarray]

# The vocab-sized tables, read by rows from a source that serves them.
STREAMED_WEIGHTS = frozenset({EMBEDDING, LM_HEAD, PER_LAYER_EMBEDDING})
# LM-head rows per matmul: a power of two, so it falls on the BLAS kernel's column tiles and
# on every format's blocks of rows (LUT groups, vectors); a float32 chunk of a 640-wide head
# is 42 MB.
HEAD_CHUNK_ROWS = 16384


class Arithmetic(Protocol):
    """Another engine's arithmetic for the ops where it departs from exact float32."""

    def linear(self, x: np.ndarray, weight: np.ndarray, name: str) -> np.ndarray: ...

    def gelu_tanh(self, x: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class ForwardResult:
    """Logits ``[T, vocab]``, the hidden state ``[T, n_embd]`` after each layer, first fp16 overflow."""

    logits: np.ndarray
    hidden_states: list[np.ndarray]
    overflow: Overflow | None


@dataclass
class Prompts:
    """Several prompts part way through the model: each one's hidden state ``[T_i, n_embd]`` and
    the per-sequence state its ``embed`` left (None for architectures that keep none)."""

    hidden: list[np.ndarray]
    sequences: list[object]

    def at(self, hidden: list[np.ndarray]) -> Prompts:
        """The same prompts at other hidden states (another layer's input or output)."""
        return Prompts(hidden, self.sequences)


class ReferenceModel(ABC):
    """Base of the per-architecture models: subclasses define ``embed_tokens``, ``block``, ``head``."""

    # What later layers of the current sequence read besides the hidden state (see Gemma 4).
    sequence: object | None = None

    def __init__(self, config, weights: WeightSource, fp16: bool = False, emulate: Arithmetic | None = None):
        self.config = config
        self._source = weights
        self._cache = WeightCache()
        self._tables: dict[str, np.ndarray] = {}  # vocab-sized tables read whole
        self.precision = Precision(fp16)
        # Called with (weight name, input rows) before every matmul: calibration collects
        # per-column activation statistics through it.
        self.observer: Callable[[str, np.ndarray], None] | None = None
        # None: exact float32. Otherwise another engine's arithmetic (llama.cpp's activation
        # quantization and GELU table) replaces the exact matmul and GELU.
        self.emulate = emulate

    @property
    def overflow(self) -> Overflow | None:
        """First float16 overflow since the last ``forward`` (or since construction)."""
        return self.precision.overflow

    def weight(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32 (float16-valued in fp16 mode), read from the source again
        only when the bounded cache has dropped it."""
        table = name in STREAMED_WEIGHTS
        cached = self._tables.get(name) if table else self._cache.get(name)
        if cached is None:
            cached = self.precision.weight(np.asarray(self._source(name), dtype=np.float32))
            if table:
                # Read whole only where it cannot stream (a source without ``rows``, emulated
                # arithmetic), and then needed whole on every pass: kept.
                self._tables[name] = cached
            else:
                self._cache.put(name, cached)
        return cached

    def streams(self, name: str) -> bool:
        """True when ``name`` is read by rows from the source, never whole."""
        return name in STREAMED_WEIGHTS and name not in self._tables and hasattr(self._source, "rows")

    def _source_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.precision.weight(np.asarray(self._source.rows(name, start, stop), dtype=np.float32))

    def gather(self, name: str, indices: np.ndarray) -> np.ndarray:
        """Rows ``indices`` of weight ``name`` (an embedding lookup), streamed when possible."""
        if not self.streams(name):
            return self.weight(name)[indices]
        unique, inverse = np.unique(indices, return_inverse=True)
        rows = np.concatenate([self._source_rows(name, int(row), int(row) + 1) for row in unique])
        return rows[inverse.reshape(-1)]

    def layer_weight(self, il: int, name: str) -> np.ndarray:
        """Weight ``blk.<il>.<name>.weight``."""
        return self.weight(f"blk.{il}.{name}.weight")

    def linear(self, x: np.ndarray, name: str) -> np.ndarray:
        """``x @ W.T`` for the weight ``name`` (numpy order ``[out, in]``), seen by the observer."""
        if self.observer is not None:
            self.observer(name, x)
        if self.emulate is not None:
            return self.emulate.linear(x, self.weight(name), name)
        if self.streams(name):
            # Each output column is its own dot product over the same inputs: the chunks join
            # into the whole product, bit for bit while chunk boundaries fall on the BLAS
            # kernel's column tiles, as 16384 does (tests/test_streamed_weights.py).
            vocab = self.config.vocab_size
            out = np.empty((*x.shape[:-1], vocab), dtype=np.float32)
            for start in range(0, vocab, HEAD_CHUNK_ROWS):
                stop = min(start + HEAD_CHUNK_ROWS, vocab)
                out[..., start:stop] = x @ self._source_rows(name, start, stop).T
            return out
        return x @ self.weight(name).T

    def gelu_tanh(self, x: np.ndarray) -> np.ndarray:
        """Tanh-approximated GELU, exact or as the emulated engine computes it."""
        return gelu_tanh(x) if self.emulate is None else self.emulate.gelu_tanh(x)

    def round(self, x: np.ndarray, layer: int | None, where: str) -> np.ndarray:
        return self.precision.round(x, layer, where)

    def check_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """``tokens`` as a 1-D int64 array, or an error naming the first id outside the vocabulary."""
        return checked_tokens(tokens, self.config.vocab_size)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """Token ids ``[T]`` -> input hidden state ``[T, n_embd]``."""
        tokens = self.check_tokens(tokens)
        self.precision.positions = None
        with self._numerics():
            return self.embed_tokens(tokens)

    def layer(self, il: int, hidden: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """Layer ``il`` alone on hidden state ``[T, n_embd]`` at ``positions`` (default 0..T-1)."""
        positions = np.arange(hidden.shape[0]) if positions is None else np.asarray(positions)
        self.precision.positions = positions
        with self._numerics():
            return self.block(il, np.asarray(hidden, dtype=np.float32), positions)

    def embed_many(self, token_lists: list[np.ndarray]) -> Prompts:
        """``embed`` for each prompt, keeping each one's per-sequence state."""
        hidden, sequences = [], []
        for tokens in token_lists:
            hidden.append(self.embed(tokens))
            sequences.append(self.sequence)
        return Prompts(hidden, sequences)

    def layer_many(self, il: int, prompts: Prompts) -> Prompts:
        """Layer ``il`` on every prompt (each from position 0): the same outputs as ``layer`` on
        each; architectures override it where prompts can share work."""
        outputs = []
        for hidden, sequence in zip(prompts.hidden, prompts.sequences):
            self.sequence = sequence
            outputs.append(self.layer(il, hidden))
        return prompts.at(outputs)

    def final(self, hidden: np.ndarray) -> np.ndarray:
        """Last hidden state ``[T, n_embd]`` -> logits ``[T, vocab]``."""
        self.precision.positions = None
        with self._numerics():
            return self.head(np.asarray(hidden, dtype=np.float32))

    def _numerics(self) -> np.errstate:
        # In fp16 mode an overflow is recorded once and then flows on as inf/NaN, as on the
        # ANE; numpy's warnings about it would only repeat what ``overflow`` reports.
        return np.errstate(over="ignore", invalid="ignore") if self.precision.fp16 else np.errstate()

    @abstractmethod
    def embed_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Checked token ids ``[T]`` -> input hidden state ``[T, n_embd]``."""

    @abstractmethod
    def block(self, il: int, hidden: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Layer ``il``: hidden state ``[T, n_embd]`` at token ``positions`` -> ``[T, n_embd]``."""

    @abstractmethod
    def head(self, hidden: np.ndarray) -> np.ndarray:
        """Last hidden state ``[T, n_embd]`` -> logits ``[T, vocab]``."""

    def forward(self, tokens: np.ndarray) -> ForwardResult:
        """Prefill over ``tokens`` from position 0: logits, every layer's output, first overflow."""
        self.precision.overflow = None
        hidden_states = self._through_layers(tokens)
        logits = self.final(hidden_states[-1])
        return ForwardResult(logits, hidden_states[1:], self.precision.overflow)

    def prompt_logits(self, token_lists: list[np.ndarray]) -> list[np.ndarray]:
        """Each prompt's logits ``[T, vocab]`` (each from position 0), the same as ``forward``'s.
        The prompts go through the layers together (``layer_many``) and the LM head runs once
        over every prompt's last hidden state, so a streamed head is read once for all prompts
        instead of once per prompt."""
        self.precision.overflow = None
        prompts = self.embed_many(token_lists)
        for il in range(self.config.n_layers):
            prompts = self.layer_many(il, prompts)
        last = prompts.hidden
        logits = self.final(np.concatenate(last))
        return np.split(logits, np.cumsum([len(hidden) for hidden in last])[:-1])

    def _through_layers(self, tokens: np.ndarray) -> list[np.ndarray]:
        """The embedded prompt, then the hidden state after every layer."""
        hidden = self.embed(tokens)
        positions = np.arange(hidden.shape[0])
        hidden_states = [hidden]
        for il in range(self.config.n_layers):
            hidden = self.layer(il, hidden, positions)
            hidden_states.append(hidden)
        return hidden_states
